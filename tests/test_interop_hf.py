"""Hugging Face checkpoints in and out, with transformers as the oracle (random-init Llama/Mistral, fp32)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import verse
from verse import ModelArgs, ReasoningLLM
from verse.errors import ConfigError

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

HF_CASES = {
    "llama-gqa-untied": (LlamaConfig, LlamaForCausalLM, dict()),
    "llama-tied-linear": (LlamaConfig, LlamaForCausalLM,
                          dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-llama3-headdim": (LlamaConfig, LlamaForCausalLM,
                             dict(rope_scaling=LLAMA3, head_dim=24, rope_theta=500000.0)),
    "llama-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(sliding_window=8, tie_word_embeddings=False)),
    "mistral-tied": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, tie_word_embeddings=True)),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that any mapping mistake moves the logits far beyond the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.1 * noise)
    return model.eval()


def make_hf(case: str) -> torch.nn.Module:
    config_cls, model_cls, extra = HF_CASES[case]
    config = config_cls(**{**BASE, **extra})
    torch.manual_seed(0)
    return randomize(model_cls(config).float())


def tokens(T: int = 24, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_verse_same_logits(case, tmp_path):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path)
    model = verse.load(tmp_path)
    assert not model.training
    assert model.embed.weight.dtype == torch.float32
    assert model.args.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.head.weight is model.embed.weight) == hf.config.tie_word_embeddings
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


VERSE_CASES = {
    "llama": dict(),
    "llama-tied-llama3": dict(tie_embeddings=True, rope_scaling="llama3", rope_factor=8.0, original_seq_len=16,
                              low_freq_factor=1.0, high_freq_factor=4.0),
    "llama-linear-headdim": dict(rope_scaling="linear", rope_factor=4.0, head_dim=32),
    "mistral": dict(arch="mistral", sliding_window=8),
}


def make_verse(case: str, **extra) -> ReasoningLLM:
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny", dtype="float32", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                 **VERSE_CASES[case], **extra)
    return randomize(ReasoningLLM(args))


@pytest.mark.parametrize("case", sorted(VERSE_CASES))
def test_verse_to_hf_same_logits(case, tmp_path):
    model = make_verse(case)
    model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "verse.json"} <= names
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    expected_class = "MistralForCausalLM" if case == "mistral" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    x = tokens(T=30)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_sharded_save_loads_in_transformers_and_verse(tmp_path):
    model = make_verse("llama")
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / "model.safetensors").exists()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all((ckpt / s).is_file() for s in shards)
    stored = 0
    for shard in shards:
        with safe_open(str(ckpt / shard), "pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == sum(p.numel() for p in model.parameters())
    x = tokens()
    hf = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    reloaded = verse.load(ckpt)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(reloaded(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)


def test_save_into_existing_run_dir_keeps_other_files_and_drops_stale_shards(tmp_path):
    ckpt = tmp_path / "step-0000010"
    (ckpt / "train_state").mkdir(parents=True)
    (ckpt / "train_state" / "optimizer.safetensors").write_bytes(b"x")
    (ckpt / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    model = make_verse("llama")
    model.save_pretrained(ckpt)
    assert (ckpt / "train_state" / "optimizer.safetensors").read_bytes() == b"x"
    assert not (ckpt / "model-00009-of-00009.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    hf = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_dtype_kept_or_converted_and_overrides(tmp_path):
    hf = make_hf("llama-gqa-untied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = verse.load(tmp_path)
    assert model.embed.weight.dtype == torch.bfloat16 and model.args.dtype == "bfloat16"
    assert model.rope(8)[0].dtype == torch.float32  # RoPE tables are computed, not loaded
    model32 = verse.load(tmp_path, dtype=torch.float32, checkpointing=True, max_seq_len=32)
    assert model32.embed.weight.dtype == torch.float32
    assert model32.args.checkpointing and model32.rope(100)[0].shape[0] == 100  # past max_seq_len: as needed
    assert model32.args.max_seq_len == 32 and model32.rope(20)[0].shape[0] == 100
    torch.testing.assert_close(model32.layers[0].attn.wq.weight,
                               hf.model.layers[0].self_attn.q_proj.weight.float(), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="dim"):
        verse.load(tmp_path, dim=128)


def test_verse_json_wins_over_config_json(tmp_path):
    model = make_verse("llama", rope_theta=5000.0, tokenizer="byte")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 5000.0
    config["rope_theta"] = 123.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = verse.load(tmp_path)
    assert loaded.args.rope_theta == 5000.0 and loaded.args.tokenizer == "byte"


def test_run_directory_loads_latest_checkpoint(tmp_path):
    model = make_verse("llama")
    model.save_pretrained(tmp_path / "run" / "step-0000005")
    (tmp_path / "run" / "latest").symlink_to("step-0000005")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step-0000005").float().eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(verse.load(tmp_path / "run")(x), hf(x).logits, atol=1e-4, rtol=0)
