"""GGUF files of llama.cpp's `llama` (Llama 3.x), `qwen2`, `qwen3` and `qwen3moe` architectures written by Verse:
transformers' `gguf_file=` loader gives the same logits, Verse reads them back, and the tokenizer metadata
(gpt2 BPE, pre `qwen2` / `llama-bpe`) encodes as the source tokenizer.

transformers 5.24's GGUF loader reads no `head_dim` for qwen3 and no `expert_feed_forward_length` for qwen3moe (its
config defaults, 128 and 768, apply), and ignores llama's `rope_freqs`; the models below use those sizes, and Llama 3
scaling is checked against transformers' own llama3 frequencies instead.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import verse
from verse import ModelArgs, ReasoningLLM
from verse.errors import ConfigError
from verse.interop.gguf import save_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, inter_dim=96, max_seq_len=64, rope_theta=1e6,
              norm_eps=1e-6, dtype="float32")
FAMILIES = {
    "llama": ("llama-3.1-instruct", dict(arch="llama", tie_embeddings=True)),
    "qwen2": ("qwen2.5-instruct", dict(arch="qwen2", qkv_bias=True)),
    "qwen3": ("qwen3", dict(arch="qwen3", qk_norm=True, head_dim=128)),
    "qwen3moe": ("qwen3", dict(arch="qwen3_moe", qk_norm=True, head_dim=32, n_routed_experts=4,
                               n_activated_experts=2, moe_inter_dim=768, norm_topk_prob=True)),
}


def random_model(args: ModelArgs) -> ReasoningLLM:
    torch.manual_seed(0)
    model = ReasoningLLM(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def write(tmp_path, published_tokenizers, family, dtype=torch.float32, **changes):
    template, fields = FAMILIES[family]
    tok = verse.load_tokenizer(published_tokenizers[template])
    model = random_model(ModelArgs(**{**COMMON, **fields, "vocab_size": tok.vocab_size, **changes}))
    path = tmp_path / f"{family}.gguf"
    save_gguf(model, path, tokenizer=tok, dtype=dtype)
    return model, tok, path


def tokens(vocab: int, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_loads_in_transformers_with_the_same_logits(family, tmp_path, published_tokenizers):
    model, tok, path = write(tmp_path, published_tokenizers, family)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["general.architecture"] == family
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == ("llama-bpe" if family == "llama" else "qwen2")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    expected = {"llama": {"blk.0.attn_q.weight"}, "qwen2": {"blk.0.attn_q.bias", "blk.1.attn_v.bias"},
                "qwen3": {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"},
                "qwen3moe": {"blk.1.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight",
                             "blk.0.ffn_up_exps.weight", "blk.0.attn_q_norm.weight"}}[family]
    assert expected <= names
    if family == "qwen3moe":
        assert (fields["qwen3moe.expert_count"], fields["qwen3moe.expert_used_count"],
                fields["qwen3moe.expert_feed_forward_length"]) == (4, 2, 768)
        assert "blk.0.ffn_gate.weight" not in names
    x = tokens(tok.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}[family]
    with torch.no_grad():
        expected_logits = model(x)
        torch.testing.assert_close(hf(x).logits, expected_logits, atol=1e-4, rtol=1e-4)
        back = verse.load(path)
        assert back.args.arch == model.args.arch and back.args.qkv_bias == model.args.qkv_bias
        torch.testing.assert_close(back(x), expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3moe"])
def test_gguf_f16_matches_transformers(family, tmp_path, published_tokenizers):
    _, tok, path = write(tmp_path, published_tokenizers, family, dtype=torch.float16)
    kinds = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # as llama.cpp keeps 1-D tensors
    if family == "qwen3moe":
        assert kinds["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32  # the router, as llama.cpp
        assert kinds["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.F16
    x = tokens(tok.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(verse.load(path, dtype=torch.float32)(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_gguf_read_without_verse_metadata(tmp_path, published_tokenizers):
    """A qwen3moe file as llama.cpp writes it (no verse.model_args): the configuration comes from the llama.cpp
    keys and tensors alone."""
    model, tok, path = write(tmp_path, published_tokenizers, "qwen3moe")
    reader = gguf.GGUFReader(path)
    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "qwen3moe")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture", "verse.")):
            continue
        value, kind = field.contents(), field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not any(key.startswith("verse.") for key in gguf.GGUFReader(bare).fields)
    back = verse.load(bare)
    args = back.args
    assert (args.arch, args.n_routed_experts, args.n_activated_experts, args.moe_inter_dim, args.head_dim,
            args.qk_norm, args.qkv_bias, args.norm_topk_prob) == ("qwen3_moe", 4, 2, 768, 32, True, False, True)
    x = tokens(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)


def test_gguf_llama3_rope_freqs_are_transformers_llama3_frequencies(tmp_path, published_tokenizers):
    scaling = dict(rope_scaling="llama3", rope_factor=32.0, original_seq_len=64, low_freq_factor=1.0,
                   high_freq_factor=4.0, rope_theta=500000.0)
    model, tok, path = write(tmp_path, published_tokenizers, "llama", **scaling)
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    config = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).config
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = model.args.head_dim
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = plain / scaled.double()
    assert (factors.min(), factors.max()) == (pytest.approx(1.0), pytest.approx(32.0))  # high frequencies kept, low ones scaled by the factor
    torch.testing.assert_close(torch.tensor(np.array(freqs.data), dtype=torch.float64), factors, rtol=1e-5, atol=0)
    back = verse.load(path)
    assert (back.args.rope_scaling, back.args.rope_factor) == ("llama3", 32.0)


def test_gguf_tokenizer_encodes_as_the_source(tmp_path, published_tokenizers):
    texts = ["Hello, how are you today? I'm fine!", "日本語で？ 😀 123456", "<think>\nx\n</think>\n\n4<|im_end|>"]
    for family in ("llama", "qwen3"):
        _, tok, path = write(tmp_path, published_tokenizers, family)
        ours = verse.load_tokenizer(path)
        theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert ours.chat_template == tok.chat_template and ours.add_bos == tok.add_bos
        assert ours.eos_id == tok.eos_id
        for text in texts:
            expected = tok.encode(text, allowed_special="all")
            assert ours.encode(text, allowed_special="all") == expected
            assert theirs.encode(text, add_special_tokens=False) == expected


@pytest.mark.parametrize("changes, field", [
    (dict(arch="llama", qkv_bias=True), "qkv_bias"),
    (dict(arch="qwen3", qk_norm=True, rope_scaling="llama3", rope_factor=8.0), "rope_scaling"),
    (dict(arch="qwen3_moe", qk_norm=True, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32,
          norm_topk_prob=False), "norm_topk_prob"),
    (dict(arch="qwen3_moe", qk_norm=True, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32,
          norm_topk_prob=True, mlp_only_layers=[0]), "mlp_only_layers"),
])
def test_gguf_export_refuses_what_llama_cpp_cannot_hold(changes, field, tmp_path):
    model = ReasoningLLM(ModelArgs(**{**COMMON, "vocab_size": 64, **changes}))
    with pytest.raises(ConfigError, match=field) as info:
        save_gguf(model, tmp_path / "m.gguf")
    assert "\n" not in str(info.value) and not (tmp_path / "m.gguf").exists()


def test_cli_converts_a_transformers_qwen3_moe_directory_to_gguf(tmp_path, published_tokenizers, capsys):
    """transformers -> `verse convert --to gguf` -> transformers' GGUF loader: the same logits end to end."""
    import shutil

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from verse.cli import main

    src = tmp_path / "hf"
    shutil.copytree(published_tokenizers["qwen3"], src)
    vocab = verse.load_tokenizer(src).vocab_size
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=96, moe_intermediate_size=768,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                            rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(config).eval()
    hf.save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out" / "m.gguf"), "--to", "gguf"]) == 0, capsys.readouterr().err
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    x = tokens(vocab)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)
    assert gguf.GGUFReader(tmp_path / "out" / "m.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
