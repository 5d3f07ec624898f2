"""Model-parallel shards: `save_model_parallel` -> per-rank slices as DeepSeek's convert.py cuts them ->
`load_model_parallel` gathers an identical state dict and identical logits; per-rank partial computations
(column/row-parallel attention and FFN, vocab-parallel embedding and head) add up to the full layer."""

import json

import pytest
import torch
import torch.nn.functional as F

from verse import ModelArgs, ReasoningLLM
from verse.errors import CheckpointError, ConfigError, VerseError
from verse.interop.parallel import load_model_parallel, save_model_parallel
from verse.model.attention import Attention
from verse.model.linear import fp8_layers, quantize_


def full_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_model(path, model, x):
    gathered = load_model_parallel(path)
    expected = model.state_dict()
    assert set(gathered) == set(expected)
    for name, tensor in expected.items():
        assert gathered[name].dtype == tensor.dtype and torch.equal(gathered[name], tensor), name
    fresh = quantize_(ReasoningLLM(ModelArgs.from_json(path / "verse.json")), fp8_layers(gathered))
    fresh.load_state_dict(gathered)
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_dense_shards_are_deepseek_slices_and_gather_back(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny", dtype="float32")
    model = ReasoningLLM(args)
    files = save_model_parallel(model, tmp_path / "mp", 2)
    assert [f.name for f in files] == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    assert json.loads((tmp_path / "mp" / "verse.json").read_text())["n_heads"] == 4
    state = full_state(model)
    q_rows, kv_rows = 2 * args.head_dim, 1 * args.head_dim  # 4 heads and 2 KV heads over 2 ranks
    for rank in range(2):
        shard = load_model_parallel(tmp_path / "mp", rank=rank)
        assert torch.equal(shard["embed.weight"], state["embed.weight"][rank * 256:(rank + 1) * 256])
        assert torch.equal(shard["head.weight"], state["head.weight"][rank * 256:(rank + 1) * 256])
        assert torch.equal(shard["layers.1.attn.wq.weight"],
                           state["layers.1.attn.wq.weight"][rank * q_rows:(rank + 1) * q_rows])
        assert torch.equal(shard["layers.1.attn.wk.weight"],
                           state["layers.1.attn.wk.weight"][rank * kv_rows:(rank + 1) * kv_rows])
        assert torch.equal(shard["layers.1.attn.wo.weight"],
                           state["layers.1.attn.wo.weight"][:, rank * q_rows:(rank + 1) * q_rows])
        assert torch.equal(shard["layers.0.ffn.w1.weight"], state["layers.0.ffn.w1.weight"][rank * 64:(rank + 1) * 64])
        assert torch.equal(shard["layers.0.ffn.w2.weight"],
                           state["layers.0.ffn.w2.weight"][:, rank * 64:(rank + 1) * 64])
        assert torch.equal(shard["layers.0.attn_norm.weight"], state["layers.0.attn_norm.weight"])
    assert_same_model(tmp_path / "mp", model, torch.randint(0, 512, (2, 13)))


def test_rank_partials_sum_to_full_layers(tmp_path):
    """Tensor parallelism by hand: what each rank computes from its shard adds up (or concatenates) to the full op."""
    torch.manual_seed(1)
    args = ModelArgs.from_preset("tiny", dtype="float32")
    model = ReasoningLLM(args).eval()
    n = 2
    save_model_parallel(model, tmp_path / "mp", n)
    shards = [load_model_parallel(tmp_path / "mp", rank=r) for r in range(n)]
    ids = torch.randint(0, args.vocab_size, (2, 9))
    x = torch.randn(2, 9, args.dim)
    cos, sin = (t[:9].unsqueeze(0) for t in model.rope(9))
    with torch.no_grad():
        # vocab-parallel embedding: each rank looks up its own id range, zeros elsewhere, then all-reduce (sum)
        part = args.vocab_size // n
        emb = sum(F.embedding((ids - r * part).clamp(0, part - 1), s["embed.weight"])
                  * ((ids >= r * part) & (ids < (r + 1) * part)).unsqueeze(-1) for r, s in enumerate(shards))
        assert torch.allclose(emb, model.embed(ids))
        # SwiGLU: column-parallel w1/w3, row-parallel w2, all-reduce
        ffn = sum(F.linear(F.silu(F.linear(x, s["layers.0.ffn.w1.weight"])) * F.linear(x, s["layers.0.ffn.w3.weight"]),
                           s["layers.0.ffn.w2.weight"]) for s in shards)
        torch.testing.assert_close(ffn, model.layers[0].ffn(x), rtol=1e-5, atol=1e-5)
        # attention: each rank runs its heads (a model with n_heads / n heads), outputs summed
        local = Attention(args.replace(n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                                       head_dim=args.head_dim))
        attn = 0
        for s in shards:
            local.load_state_dict({k.removeprefix("layers.0.attn."): v for k, v in s.items()
                                   if k.startswith("layers.0.attn.")})
            attn = attn + local(x, cos, sin)
        torch.testing.assert_close(attn, model.layers[0].attn(x, cos, sin), rtol=1e-5, atol=1e-5)
        # vocab-parallel head: logits concatenated
        logits = torch.cat([F.linear(x, s["head.weight"]) for s in shards], -1)
        torch.testing.assert_close(logits, model.head(x), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_round_trip(tmp_path):
    torch.manual_seed(2)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", tie_embeddings=True))
    save_model_parallel(model, tmp_path / "mp", 2)
    gathered = load_model_parallel(tmp_path / "mp")
    assert gathered["head.weight"] is gathered["embed.weight"]
    assert_same_model(tmp_path / "mp", model, torch.randint(0, 512, (1, 7)))


def test_mla_moe_experts_split_by_rank(tmp_path):
    torch.manual_seed(3)
    args = ModelArgs.from_preset("bytegpt-tiny", vocab_size=264, n_layers=2, dtype="float32")
    model = ReasoningLLM(args)
    save_model_parallel(model, tmp_path / "mp", 2)
    state = full_state(model)
    moe = next(i for i in range(args.n_layers) if args.is_moe_layer(i))
    for rank in range(2):
        shard = load_model_parallel(tmp_path / "mp", rank=rank)
        for w in ("w1", "w2", "w3"):
            full = state[f"layers.{moe}.ffn.experts.{w}"]
            assert torch.equal(shard[f"layers.{moe}.ffn.experts.{w}"], full[rank * 4:(rank + 1) * 4])
        assert torch.equal(shard[f"layers.{moe}.ffn.gate.weight"], state[f"layers.{moe}.ffn.gate.weight"])
        assert torch.equal(shard["layers.0.attn.wkv_a.weight"], state["layers.0.attn.wkv_a.weight"])
        rows = args.n_heads // 2 * (args.qk_nope_head_dim + args.v_head_dim)
        assert torch.equal(shard["layers.0.attn.wkv_b.weight"], state["layers.0.attn.wkv_b.weight"][rank * rows:
                                                                                                   (rank + 1) * rows])
    assert_same_model(tmp_path / "mp", model, torch.randint(0, 256, (2, 11)))


def test_fp8_scales_split_in_whole_blocks(tmp_path):
    torch.manual_seed(4)
    args = ModelArgs.from_preset("tiny", dim=256, n_heads=4, n_kv_heads=4, inter_dim=512, vocab_size=256,
                                 dtype="float32")
    model = quantize_(ReasoningLLM(args), names={"layers.0.attn.wq", "layers.0.ffn.w2"})
    save_model_parallel(model, tmp_path / "mp", 2)
    state = full_state(model)
    shard = load_model_parallel(tmp_path / "mp", rank=1)
    assert shard["layers.0.attn.wq.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(shard["layers.0.attn.wq.scale"], state["layers.0.attn.wq.scale"][1:2])  # rows 128..255
    assert torch.equal(shard["layers.0.ffn.w2.scale"], state["layers.0.ffn.w2.scale"][:, 2:4])  # cols 256..511
    assert_same_model(tmp_path / "mp", model, torch.randint(0, 256, (1, 5)))
    with pytest.raises(ConfigError, match="128-row scale blocks"):
        save_model_parallel(model, tmp_path / "mp4", 4)  # 64 rows per rank would cut a scale block


def test_bad_inputs(tmp_path):
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32"))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        save_model_parallel(model, tmp_path / "a", 4)
    with pytest.raises(ConfigError, match="vocab_size"):
        save_model_parallel(ReasoningLLM(ModelArgs.from_preset("bytegpt-tiny", n_layers=2)), tmp_path / "b", 2)
    save_model_parallel(model, tmp_path / "mp", 2)
    with pytest.raises(VerseError, match="not empty; pass --overwrite"):
        save_model_parallel(model, tmp_path / "mp", 2)
    (tmp_path / "mp" / "model1-mp2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model1-mp2.safetensors: missing"):
        load_model_parallel(tmp_path / "mp")
    with pytest.raises(CheckpointError, match="no model"):
        load_model_parallel(tmp_path)


def test_verse_convert_hf_deepseek_to_model_parallel(tmp_path, capsys):
    """`verse convert HF_DIR DST --model-parallel 2` of a transformers DeepseekV3 model: the gathered shards give
    its logits."""
    transformers = pytest.importorskip("transformers")
    from verse.cli import main

    torch.manual_seed(5)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, max_position_embeddings=64, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mp"), "--model-parallel", "2"]) == 0
    assert "2 shards" in capsys.readouterr().out
    shard = load_model_parallel(tmp_path / "mp", rank=1)
    assert shard["layers.1.ffn.experts.w1"].shape[0] == 4  # experts 4..7
    model = ReasoningLLM(ModelArgs.from_json(tmp_path / "mp" / "verse.json"))
    model.load_state_dict(load_model_parallel(tmp_path / "mp"))
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-4)
