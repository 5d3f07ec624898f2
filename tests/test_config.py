"""ModelArgs: presets match the published parameter counts; invalid configs fail with one line naming the field."""

import pytest

from verse import ModelArgs, ReasoningLLM
from verse.config import count_params, list_presets
from verse.errors import ConfigError

# Published parameter counts (model cards / safetensors metadata of the original checkpoints).
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "llama-3-8b": 8_030_261_248,
    "llama-2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    assert count_params(ModelArgs.from_preset(name)) == pytest.approx(PUBLISHED[name], rel=1e-3)


def test_count_params_equals_instantiated_model():
    args = ModelArgs.from_preset("tiny", tie_embeddings=True)
    assert count_params(args) == ReasoningLLM(args).num_params()


def test_all_dense_presets_load():
    names = set(list_presets())
    assert {"tiny", "smollm2-135m", "llama-2-7b", "mistral-7b", "llama-3-8b", "llama-2-70b"} <= names


@pytest.mark.parametrize("changes, field", [
    (dict(dim=100, n_heads=3, n_kv_heads=1), "dim"),
    (dict(dim=66, n_heads=6, n_kv_heads=1), "head_dim"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(dtype="float8"), "dtype"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(n_routed_experts=4, n_activated_experts=5), "n_activated_experts"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_preset("tiny", **changes)
    message = str(err.value)
    assert f"ModelArgs.{field}" in message and "\n" not in message


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelArgs.from_preset("nope")
    with pytest.raises(ConfigError, match="unknown ModelArgs field"):
        ModelArgs.from_dict({"dimm": 3})


@pytest.mark.parametrize("preset,named,tokenizer", [("mistral-7b", "o200k", "o200k"), ("tiny", None, "byte")])
def test_train_plan_and_data_agree_on_a_presets_tokenizer(preset, named, tokenizer, tmp_path, capsys):
    import json

    import torch

    from verse.cli import main
    from verse.tokenization import load_tokenizer, tokenizer_vocab
    from verse.train.config import TrainConfig
    from verse.train.loop import build_model
    from verse.train.loop import load_tokenizer as train_tokenizer

    # verse train --preset: the tokenizer it trains with and the model it builds (on meta: no memory)
    cfg = TrainConfig(model=preset, tokenizer=named, max_seq_len=64)
    tok = train_tokenizer(cfg)
    assert tok.name.startswith(tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == tokenizer_vocab(tokenizer)  # o200k answered without loading
    model = build_model(cfg, torch.device("meta"), tok)
    trained = sum(p.numel() for p in model.parameters())
    assert model.args.vocab_size == tok.vocab_size
    # verse plan --preset counts that model
    assert main(["plan", "--preset", preset, "--seq-len", "64", "--json"] + (["--tokenizer", named] if named else [])) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["params"], planned["vocab_size"]) == (trained, tok.vocab_size)
    # verse data stats with `model: PRESET` tokenizes with it: the same counts as naming the tokenizer
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                       {"role": "assistant", "content": f"It is {2 * i}."}]})
                              for i in range(5)) + "\n")
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {preset}\n" + (f"tokenizer: {named}\n" if named else "")
                      + f"data:\n  sources:\n    - {{path: {data}}}\n")
    assert main(["data", "stats", "--config", str(config), "--max-seq-len", "64", "--json"]) == 0
    by_model = json.loads(capsys.readouterr().out)
    assert main(["data", "stats", "--source", str(data), "--tokenizer", tokenizer, "--max-seq-len", "64", "--json"]) == 0
    assert by_model["tokens"] == json.loads(capsys.readouterr().out)["tokens"] > 0
    assert max(load_tokenizer(tokenizer).encode("It is 8.")) < planned["vocab_size"]


def test_a_published_presets_vocabulary_stays_unless_a_tokenizer_is_named(tmp_path, capsys):
    from verse.cli import main

    # the published model: 32,000 ids, 7.24 B params, for verse plan; train and data need its tokenizer named
    published = "the preset keeps its published 32,000-id vocabulary"
    assert abs(count_params(ModelArgs.from_preset("mistral-7b")) / 7.24e9 - 1) < 0.001
    assert main(["plan", "--preset", "mistral-7b", "--seq-len", "2048"]) == 0
    assert "params: 7.242 B total" in capsys.readouterr().out
    assert main(["train", "--preset", "mistral-7b", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert published in err and "tokenizer=o200k (then the model has 200,019 ids, 8.62 B params)" in err
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: mistral-7b\ndata:\n  sources:\n    - {{path: {tmp_path / 'x.jsonl'}}}\n")
    assert main(["data", "stats", "--config", str(config)]) == 2
    assert published in capsys.readouterr().err
    # with o200k named, plan counts what train builds, and says why it is not the published count
    assert main(["plan", "--preset", "mistral-7b", "--tokenizer", "o200k", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "params: 8.618 B total" in out
    assert "vocabulary: 200,019 ids of the o200k tokenizer (the published mistral-7b has 32,000, 7.24 B" in out


def test_dtype_spellings_live_in_one_place():
    import re
    from pathlib import Path

    import torch

    from verse.config import DTYPE_ALIASES, DTYPES, dtype_name
    from verse.interop.load import resolve_dtype

    assert [dtype_name(n) for n in ("bf16", "fp16", "half", "f32", "float32")] == [
        "bfloat16", "float16", "float16", "float32", "float32"]
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="int8"):
        dtype_name("int8")
    with pytest.raises(ConfigError):
        resolve_dtype(torch.int64)
    assert set(DTYPE_ALIASES.values()) <= set(DTYPES)
    # no second alias map or bytes-per-dtype table in the sources
    src = Path(__file__).resolve().parents[1] / "src" / "verse"
    twins = [p.name for p in src.rglob("*.py") if p.name != "config.py"
             and re.search(r"[\"']bf16[\"']\s*:\s*[\"']bfloat16[\"']|[\"']bfloat16[\"']\s*:\s*2\b", p.read_text())]
    assert twins == []
