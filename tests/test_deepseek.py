"""DeepSeek-V2/V3 checkpoints in and out, against transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import verse
from verse import ModelArgs, ReasoningLLM
from verse.config import count_params
from verse.errors import CheckpointError
from verse.interop import deepseek

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
              max_position_embeddings=128, first_k_dense_replace=1, tie_word_embeddings=False)


def hf_v3(q_lora_rank=24, rope=YARN, **kw):
    """Sigmoid scoring, expert groups, a shared expert, a random routing bias."""
    config = transformers.DeepseekV3Config(**{**COMMON, **dict(
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=q_lora_rank, rope_parameters=rope), **kw})
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model.eval()


def hf_v2(q_lora_rank=None, topk_method="greedy", rope=YARN, **kw):
    """Softmax scoring, two shared experts, no query compression by default (like DeepSeek-V2-Lite)."""
    config = transformers.DeepseekV2Config(**{**COMMON, **dict(
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method=topk_method, routed_scaling_factor=1.0, q_lora_rank=q_lora_rank, rope_parameters=rope), **kw})
    return transformers.DeepseekV2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """A saved tiny DeepseekV3ForCausalLM (q_lora on, YaRN on) and the model itself."""
    torch.manual_seed(1)
    hf = hf_v3()
    path = tmp_path_factory.mktemp("v3")
    hf.save_pretrained(path)
    return hf, path


def assert_same_logits(hf_model, path, tokens):
    with torch.no_grad():
        expected = hf_model(tokens).logits
        for impl in ("naive", "absorb"):
            got = verse.load(path, dtype=torch.float32, attn_impl=impl)(tokens)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=lambda m: f"attn_impl={impl}: {m}")


def test_v3_hf_to_verse_logits(v3_dir, tokens):
    assert_same_logits(*v3_dir, tokens)


def test_v3_without_query_compression(tmp_path, tokens):
    torch.manual_seed(2)
    hf = hf_v3(q_lora_rank=None, rope={"rope_type": "default", "rope_theta": 10000.0})
    hf.save_pretrained(tmp_path)
    assert_same_logits(hf, tmp_path, tokens)


@pytest.mark.parametrize("topk_method,q_lora_rank,rope", [
    ("greedy", None, YARN), ("group_limited_greedy", 24, {"rope_type": "default", "rope_theta": 10000.0})])
def test_v2_hf_to_verse_logits(tmp_path, tokens, topk_method, q_lora_rank, rope):
    torch.manual_seed(3)
    hf = hf_v2(q_lora_rank=q_lora_rank, topk_method=topk_method, rope=rope)
    hf.save_pretrained(tmp_path)
    assert_same_logits(hf, tmp_path, tokens)


def test_hub_spelling_config_and_mtp_layer(v3_dir, tmp_path, tokens):
    """A config.json in DeepSeek's own spelling (rope_theta + rope_scaling) and an extra MTP layer (dropped)."""
    hf, source = v3_dir
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = YARN["rope_theta"]
    config["rope_scaling"] = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")} | {"type": "yarn"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(source / "model.safetensors")
    weights["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # DeepSeek-V3's multi-token-prediction layer
    save_file(weights, tmp_path / "model.safetensors")
    assert_same_logits(hf, tmp_path, tokens)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_verse_to_hf(tmp_path, tokens, arch):
    v3 = arch == "deepseek_v3"
    args = ModelArgs(arch=arch, vocab_size=96, dim=32, n_layers=3, n_heads=4, inter_dim=48, attention="mla",
                     q_lora_rank=24 if v3 else 0, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16,
                     n_dense_layers=1, score_func="sigmoid" if v3 else "softmax", n_expert_groups=4 if v3 else 1,
                     n_limited_groups=2 if v3 else 1, route_scale=2.5 if v3 else 1.0, norm_topk_prob=v3,
                     rope_scaling="yarn", rope_factor=4.0, original_seq_len=32, mscale=0.707, mscale_all_dim=0.707,
                     max_seq_len=128, dtype="float32")
    torch.manual_seed(4)
    model = ReasoningLLM(args).eval()
    if v3:
        with torch.no_grad():
            for moe in model.moe_layers.values():
                moe.gate.bias.uniform_(-0.05, 0.05)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == deepseek.ARCHITECTURES[arch]
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)


def test_adapter_round_trip_is_exact(v3_dir):
    path = v3_dir[1]
    state = load_file(path / "model.safetensors")
    args = deepseek.args_from_hf(json.loads((path / "config.json").read_text()))
    back = deepseek.to_hf(deepseek.to_verse(dict(state), args), args)
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    # the interleaved rotary rows really are reordered on the way in (nope rows are not)
    verse_state = deepseek.to_verse(dict(state), args)
    wkv_a = state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    ours = verse_state["layers.0.attn.wkv_a.weight"]
    assert torch.equal(ours[:16], wkv_a[:16])
    assert torch.equal(ours[16:20], wkv_a[16::2]) and torch.equal(ours[20:], wkv_a[17::2])


def test_missing_expert_is_a_clear_error(v3_dir, tmp_path):
    (tmp_path / "config.json").write_text((v3_dir[1] / "config.json").read_text())
    weights = load_file(v3_dir[1] / "model.safetensors")
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        verse.load(tmp_path)


def test_bytegpt_tiny_preset():
    args = ModelArgs.from_preset("bytegpt-tiny")
    assert args.vocab_size == verse.load_tokenizer("byte").vocab_size
    assert args.attention == "mla"
    kinds = [args.is_moe_layer(i) for i in range(args.n_layers)]
    assert kinds == [False, True, False, True]  # MoE alternates with dense after the first dense layer
    model = ReasoningLLM(args.replace(dtype="float32"))
    assert [type(layer.ffn).__name__ for layer in model.layers] == ["MLP", "MoE", "MLP", "MoE"]


def meta_counts(args: ModelArgs) -> tuple[int, int]:
    """Oracle: total parameters of the model built on `meta`, and that minus the unused routed experts."""
    with torch.device("meta"):
        model = ReasoningLLM(args)
    total = sum(p.numel() for p in model.parameters())
    unused = sum(moe.experts.w1[0].numel() * 3 * (args.n_routed_experts - args.n_activated_experts)
                 for moe in model.moe_layers.values())
    return total, total - unused


# published sizes: DeepSeek-V3 "671B total, 37B activated", DeepSeek-V2-Lite "15.7B total, 2.4B activated"
@pytest.mark.parametrize("preset,total,active",
                         [("deepseek-v3-671b", 671e9, 37e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)])
def test_preset_parameter_counts(preset, total, active):
    args = ModelArgs.from_preset(preset)
    assert (count_params(args), count_params(args, active=True)) == meta_counts(args)
    assert abs(count_params(args) - total) / total < 1e-3
    # The published activated counts are rounded to 2 significant digits and leave out the input embedding (a
    # lookup, not a matmul): V3 36.63B -> "37B", V2-Lite 2.45B -> "2.4B".
    embedding = args.vocab_size * args.dim
    assert abs(count_params(args, active=True) - embedding - active) / active < 0.025


def hand_dequant(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight times its 128x128 block scales, written out."""
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:weight.size(0), :weight.size(1)]
    return weight.float() * full


def test_fp8_checkpoint_through_the_adapter(v3_dir, tmp_path, tokens):
    """DeepSeek FP8 layout: experts dequantized on the way in, other projections stay FP8 with their scales;
    both attn_impls then match transformers running the hand-dequantized weights."""
    from verse.fp8 import weight_quant
    from verse.model.linear import fp8_layers, quantize_

    path = v3_dir[1]
    state = load_file(path / "model.safetensors")
    fp8 = {}
    for name, tensor in state.items():
        if name.endswith(("experts.3.up_proj.weight", "kv_b_proj.weight", "q_b_proj.weight")):
            q, s = weight_quant(tensor)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            state[name] = hand_dequant(q, s)  # what the FP8 file means
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    args = deepseek.args_from_hf(json.loads((path / "config.json").read_text())).replace(dtype="float32")
    ours = deepseek.to_verse({**state, **fp8}, args)
    assert ours["layers.1.attn.wkv_b.weight"].dtype == torch.float8_e4m3fn and "layers.1.attn.wkv_b.scale" in ours
    torch.testing.assert_close(ours["layers.2.ffn.experts.w3"][3], state["model.layers.2.mlp.experts.3.up_proj.weight"])
    with torch.no_grad():
        expected = hf_ref(tokens).logits
        for impl in ("naive", "absorb"):
            with torch.device("meta"):
                model = ReasoningLLM(args.replace(attn_impl=impl))
            quantize_(model, fp8_layers(ours))
            model.load_state_dict(ours, assign=True)
            model.reset_buffers()
            torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0, msg=lambda m: f"{impl}: {m}")


# config.json of deepseek-ai/DeepSeek-V3 and deepseek-ai/DeepSeek-V2-Lite on the Hub (fields Verse reads)
HUB_CONFIGS = {
    "deepseek-v3-671b": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
        first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True,
        hidden_act="silu", max_position_embeddings=163840, rms_norm_eps=1e-06, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, rope_theta=10000, attention_bias=False,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"}),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
        scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
        max_position_embeddings=163840, rms_norm_eps=1e-06, bos_token_id=100000, eos_token_id=100001,
        tie_word_embeddings=False, rope_theta=10000, attention_bias=False,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                      "original_max_position_embeddings": 4096, "type": "yarn"}),
}
TRAINING_ONLY = ("aux_loss_alpha", "router_bias_update_rate")


@pytest.mark.parametrize("preset", sorted(HUB_CONFIGS))
def test_presets_are_the_hub_configs(preset):
    """The adapter reads the Hub config.json into the preset (training-only balancing knobs aside), and back."""
    from_hub = deepseek.args_from_hf(HUB_CONFIGS[preset]).to_dict()
    ours = ModelArgs.from_preset(preset).to_dict()
    differ = {k for k in ours if ours[k] != from_hub[k]}
    assert differ <= set(TRAINING_ONLY), {k: (ours[k], from_hub[k]) for k in differ}
    written = deepseek.hf_config(ModelArgs.from_preset(preset))
    assert deepseek.args_from_hf(written).to_dict() == from_hub | {k: ours[k] for k in TRAINING_ONLY if k in written}
