"""DeepSeek FP8 checkpoints: `verse fp8-to-bf16` on tiny FP8 checkpoints (2 shards + index) made here, through the
CLI, compared with dequantizing by hand; bad inputs exit 2 with one line naming the tensor or file; FP8 weights
loaded as they are, run in both `gemm_impl`s against transformers with the hand-dequantized weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from verse.cli import main

B = 128


def hand_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.size(0)):
        for j in range(s.size(1)):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] = q[i * B:(i + 1) * B, j * B:(j + 1) * B].float() * s[i, j]
    return out.to(dtype)


def fp8_weight(out_features: int, in_features: int):
    q = (torch.randn(out_features, in_features) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(-(-out_features // B), -(-in_features // B)) * 1e-2 + 1e-4
    return q, s


def write_checkpoint(path: Path) -> dict:
    """Two shards; one FP8 weight's scale lives in the other shard (as in the real DeepSeek-V3 files)."""
    torch.manual_seed(0)
    q_proj, q_scale = fp8_weight(300, 200)
    down, down_scale = fp8_weight(256, 384)
    shard1 = {
        "model.embed_tokens.weight": torch.randn(64, 200).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": q_proj,
        "model.layers.0.self_attn.q_proj.weight_scale_inv": q_scale,
        "model.layers.0.mlp.down_proj.weight": down,
    }
    shard2 = {
        "model.layers.0.mlp.down_proj.weight_scale_inv": down_scale,
        "model.layers.0.input_layernorm.weight": torch.rand(200).to(torch.bfloat16),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8),
    }
    path.mkdir()
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                   "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "torch_dtype": "bfloat16", "hidden_size": 200,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return {**shard1, **shard2}


def read_dir(path: Path) -> dict:
    tensors = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_fp8_to_bf16_equals_hand_dequantization(tmp_path, capsys):
    src, dst = tmp_path / "fp8", tmp_path / "bf16"
    original = write_checkpoint(src)
    assert main(["fp8-to-bf16", str(src), str(dst)]) == 0
    assert "2 dequantized" in capsys.readouterr().out
    out = read_dir(dst)
    assert set(out) == {k for k in original if not k.endswith("_scale_inv")}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], hand_dequant(original[name], original[name + "_scale_inv"]))
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.mlp.gate.e_score_correction_bias"):
        assert torch.equal(out[name], original[name])
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    for name, shard in index["weight_map"].items():
        with safe_open(str(dst / shard), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "deepseek_v3"
    assert (dst / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp8"]  # no temp dir left behind


def drop_tensor(src: Path, name: str) -> None:
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"].pop(name)
    with safe_open(str(shard), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(kept, str(shard))
    index_path.write_text(json.dumps(index))


def break_missing_scale(src: Path) -> str:
    drop_tensor(src, "model.layers.0.mlp.down_proj.weight_scale_inv")
    return "model.layers.0.mlp.down_proj.weight"


def break_missing_shard(src: Path) -> str:
    (src / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def break_unlisted_shard(src: Path) -> str:
    save_file({"extra": torch.zeros(2)}, str(src / "model-extra.safetensors"))
    return "model-extra.safetensors"


def break_scale_shape(src: Path) -> str:
    shard = src / "model-00002-of-00002.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, str(shard))
    return "model.layers.0.mlp.down_proj.weight_scale_inv"


def break_corrupt_shard(src: Path) -> str:
    shard = src / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    return "model-00001-of-00002.safetensors"


def break_index_lists_absent_tensor(src: Path) -> str:
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    return "model.layers.0.ghost.weight"


@pytest.mark.parametrize("breaker", [break_missing_scale, break_missing_shard, break_unlisted_shard,
                                     break_scale_shape, break_corrupt_shard, break_index_lists_absent_tensor])
def test_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys, breaker):
    src, dst = tmp_path / "fp8", tmp_path / "bf16"
    write_checkpoint(src)
    culprit = breaker(src)
    assert main(["fp8-to-bf16", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err, err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]


def test_bad_paths_exit_2(tmp_path, capsys):
    assert main(["fp8-to-bf16", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
    src = tmp_path / "fp8"
    write_checkpoint(src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["fp8-to-bf16", str(src), str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["fp8-to-bf16", str(src), str(tmp_path / "out"), "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err


def deepseek_fp8_checkpoint(path: Path, experts_fp8: bool = True, reference_dtype: torch.dtype = torch.bfloat16):
    """A tiny transformers DeepseekV3 model saved in the FP8 layout of the real checkpoint: every projection FP8
    with its `weight_scale_inv` (embeddings, norms, router and head not), 2 shards, some scales in the other shard.
    Also writes `path/by-hand`: the same model with every FP8 weight dequantized by hand to `reference_dtype`.

    Returns:
        Tuple[Path, Any]: the FP8 checkpoint directory and the oracle transformers model (float32).
    """
    transformers = pytest.importorskip("transformers")
    from verse.fp8 import weight_quant

    torch.manual_seed(0)
    # every projection input a multiple of 128, as in DeepSeek-V3, so activations quantize in whole blocks
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, max_position_embeddings=64, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    src, reference = path / "fp8", path / "by-hand"
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(src)
    state = {}
    for file in src.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
        file.unlink()
    for file in src.glob("*.index.json"):
        file.unlink()
    fp8_names = [n for n in state if n.endswith(("proj.weight", "proj_with_mqa.weight"))
                 and (experts_fp8 or ".experts." not in n)]
    for name in fp8_names:
        state[name], state[name + "_scale_inv"] = weight_quant(state[name].float())
    names = sorted(state)
    weight_map = {}
    for shard, members in (("model-00001-of-00002.safetensors", names[::2]),
                           ("model-00002-of-00002.safetensors", names[1::2])):
        save_file({n: state[n].contiguous() for n in members}, str(src / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    assert any(weight_map[n] != weight_map[n + "_scale_inv"] for n in fp8_names)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_config = json.loads((src / "config.json").read_text())
    hf_config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(hf_config))
    reference.mkdir()
    save_file({n: hand_dequant(t, state[n + "_scale_inv"], reference_dtype) if n in fp8_names else t
               for n, t in state.items() if not n.endswith("_scale_inv")}, str(reference / "model.safetensors"))
    config.save_pretrained(reference)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return src, oracle


def test_deepseek_v3_fp8_checkpoint_converts_and_loads(tmp_path):
    """fp8-to-bf16 output loads in transformers and in `verse.load` with the logits of the hand-dequantized model."""
    import transformers

    import verse

    src, oracle = deepseek_fp8_checkpoint(tmp_path)
    dst = tmp_path / "bf16"
    assert main(["fp8-to-bf16", str(src), str(dst)]) == 0
    tokens = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = oracle(tokens).logits
        converted = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)(tokens).logits
        torch.testing.assert_close(converted, expected, rtol=0, atol=0)
        torch.testing.assert_close(verse.load(dst, dtype=torch.float32)(tokens), expected, rtol=0, atol=1e-4)


def test_deepseek_v3_fp8_weights_run_in_both_gemm_impls(tmp_path):
    """FP8 weights load as they are (with their scales, via the DeepSeek adapter) and run in either `gemm_impl`."""
    from verse import ReasoningLLM
    from verse.interop import deepseek
    from verse.interop.fp8_cast import read_weight_map
    from verse.model.linear import fp8_layers, quantize_, set_gemm_impl

    src, oracle = deepseek_fp8_checkpoint(tmp_path, experts_fp8=False, reference_dtype=torch.float32)
    args = deepseek.args_from_hf(json.loads((src / "config.json").read_text())).replace(dtype="float32")
    hf_state = {}
    for shard in set(read_weight_map(src).values()):
        with safe_open(str(src / shard), framework="pt") as f:
            hf_state.update({k: f.get_tensor(k) for k in f.keys()})
    state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in deepseek.to_verse(hf_state, args).items()}
    assert "layers.0.attn.wq_b.scale" in state and state["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    with torch.device("meta"):
        model = ReasoningLLM(args)
    quantize_(model, fp8_layers(state))
    model.load_state_dict(state, assign=True)
    model.reset_buffers()
    tokens = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = oracle(tokens).logits
        torch.testing.assert_close(set_gemm_impl(model, "bf16")(tokens), expected, rtol=0, atol=1e-4)
        got = set_gemm_impl(model, "fp8")(tokens)
    # activations quantized per token and 128 channels: a few percent, as measured for fp8_gemm itself
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"gemm_impl=fp8 logits relative error vs the dequantized model: {rel:.4f}")
    assert rel < 0.1


@pytest.mark.parametrize("gemm_impl", ["bf16", "fp8"])
def test_verse_load_opens_an_fp8_checkpoint(tmp_path, gemm_impl):
    """`verse.load` keeps FP8 weights with their float32 block scales and runs them in the chosen `gemm_impl`."""
    import verse

    src, oracle = deepseek_fp8_checkpoint(tmp_path, experts_fp8=False, reference_dtype=torch.float32)
    tokens = torch.randint(0, 96, (2, 9))
    model = verse.load(src, dtype=torch.float32, gemm_impl=gemm_impl)
    wq_b = model.layers[0].attn.wq_b
    assert wq_b.weight.dtype == torch.float8_e4m3fn and wq_b.scale.dtype == torch.float32
    assert wq_b.gemm_impl == gemm_impl
    with torch.no_grad():
        got, expected = model(tokens), oracle(tokens).logits
    if gemm_impl == "bf16":
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    else:  # activations quantized to e4m3 as well: the per-GEMM error of `fp8_gemm` (a few %), not more
        assert (got - expected).norm() / expected.norm() < 0.1
