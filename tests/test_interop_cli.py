"""`verse convert` and bad checkpoints: each user mistake exits 2 with one line naming the file and the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import verse
from verse.cli import main
from verse.errors import CheckpointError

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def convert(capsys, *argv):
    """Run `verse convert ARGV`; return (exit code, error lines, whole stderr)."""
    code = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("verse convert: error:")], err


def assert_one_line_error(capsys, argv, *needles):
    code, errors, err = convert(capsys, *argv)
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_path(tmp_path, capsys):
    assert_one_line_error(capsys, [tmp_path / "nope", tmp_path / "out"], "nope", "no such file")


def test_truncated_and_corrupt_safetensors(hf_dir, tmp_path, capsys):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "model.safetensors", "truncated")
    weights.write_bytes(b"\xff" * 64)
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "model.safetensors", "corrupt")
    assert not (tmp_path / "out").exists()


def test_config_missing_field(hf_dir, tmp_path, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "config.json", "hidden_size")
    (hf_dir / "config.json").write_text("{not json")
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "config.json", "not valid JSON")


def test_unsupported_model_type(hf_dir, tmp_path, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "config.json", "'gpt2'")


def test_tensor_missing_or_wrong_shape(hf_dir, tmp_path, capsys):
    weights = hf_dir / "model.safetensors"
    state = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, weights)
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "model.safetensors", "layers.1.ffn.w3.weight", "missing")
    save_file({**state, name: torch.zeros(95, 64)}, weights)
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "model.safetensors", "layers.1.ffn.w3.weight", "[95, 64]")
    save_file({**state, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, weights)
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "model.layers.0.mlp.extra.weight")


def test_missing_shard_and_pickle_only(hf_dir, tmp_path, capsys):
    verse.load(hf_dir).save_pretrained(tmp_path / "sharded", max_shard_bytes=50_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_one_line_error(capsys, [tmp_path / "sharded", tmp_path / "out"], shard.name, "missing")
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    assert_one_line_error(capsys, [hf_dir, tmp_path / "out"], "safetensors only")


def test_output_must_not_be_a_file(hf_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(capsys, [hf_dir, tmp_path / "file"], "file", "not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_load_rejects_weight_changing_overrides_and_bad_dtype(hf_dir):
    with pytest.raises(verse.errors.ConfigError, match="n_layers"):
        verse.load(hf_dir, n_layers=1)
    with pytest.raises(verse.errors.ConfigError, match="int8"):
        verse.load(hf_dir, dtype="int8")
    with pytest.raises(CheckpointError, match="no such file"):
        verse.load(hf_dir / "missing.gguf")


def test_convert_hf_to_verse_dtype_and_help(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.model.layers[1].self_attn.k_proj.weight,
                       hf.model.layers[1].self_attn.k_proj.weight.bfloat16())
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "kept")]) == 0  # no --dtype: keeps bf16
    assert verse.load(tmp_path / "kept").embed.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "verse convert" in capsys.readouterr().out


def test_convert_model_parallel(hf_dir, tmp_path, capsys):
    from verse.interop.parallel import load_model_parallel

    assert main(["convert", str(hf_dir), str(tmp_path / "mp"), "--model-parallel", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "mp").glob("*.safetensors")) == ["model0-mp2.safetensors",
                                                                               "model1-mp2.safetensors"]
    rank1 = load_model_parallel(tmp_path / "mp", rank=1)
    hf = load_file(hf_dir / "model.safetensors")
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(rank1["layers.0.attn.wq.weight"], q[q.shape[0] // 2:])  # column parallel: second half rows
    assert_one_line_error(capsys, [hf_dir, tmp_path / "x.gguf", "--model-parallel", "2"], "--model-parallel")
