"""Qwen2/2.5, Qwen3, Qwen3-MoE and Llama 3.x (issue #19): the ModelArgs fields, Hugging Face directories both ways
against transformers' logits and greedy text, `verse train` SFT, and the presets' parameter counts."""

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.config import count_params
from verse.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=96, max_seq_len=128,
             dtype="float32")


@pytest.mark.parametrize("changes, field", [
    (dict(arch="qwen4"), "arch"),
    (dict(qkv_bias=1), "qkv_bias"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(mlp_only_layers=[0, 2]), "mlp_only_layers"),
    (dict(mlp_only_layers=[True]), "mlp_only_layers"),
    (dict(mlp_only_layers=3), "mlp_only_layers"),
    (dict(attention="mla", qk_norm=True), "qk_norm"),
])
def test_new_fields_are_validated_with_one_line(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelArgs(**{**SMALL, **changes})
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize("changes", [
    dict(qkv_bias=True), dict(qk_norm=True, head_dim=32), dict(tie_embeddings=True),
    dict(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, mlp_only_layers=[1]),
    dict(n_layers=4, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, n_dense_layers=1, moe_layer_freq=2),
])
def test_count_params_matches_the_built_model(changes):
    args = ModelArgs(**{**SMALL, **changes})
    assert count_params(args) == ReasoningLLM(args).num_params()


def test_moe_layers_follow_mlp_only_layers_and_the_sparse_step():
    # Qwen3-MoE: layer i is sparse when i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    args = ModelArgs(**{**SMALL, "n_layers": 6}, n_routed_experts=4, n_activated_experts=2, n_dense_layers=1,
                     moe_layer_freq=2, mlp_only_layers=[3])
    step, only = 2, [3]
    assert [args.is_moe_layer(i) for i in range(6)] == [i not in only and (i + 1) % step == 0 for i in range(6)]


def test_qk_norm_and_bias_are_the_plain_math():
    """One attention layer against its formula written out in torch: per-head RMSNorm of q and k, biases."""
    from verse.model.attention import Attention
    from verse.model.rope import apply_rope, rope_cos_sin

    args = ModelArgs(**SMALL, head_dim=24, qkv_bias=True, qk_norm=True)
    torch.manual_seed(0)
    attn = Attention(args)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 5, args.dim)
    cos, sin = rope_cos_sin(args, args.head_dim, length=5)
    cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)

    def heads(w, norm=None):
        y = (x @ w.weight.T + w.bias).view(2, 5, -1, 24)
        if norm is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + args.norm_eps) * norm.weight
        return y.transpose(1, 2)

    q = apply_rope(heads(attn.wq, attn.q_norm), cos, sin)
    k = apply_rope(heads(attn.wk, attn.k_norm), cos, sin).repeat_interleave(2, dim=1)
    v = heads(attn.wv).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 24 ** 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, -1) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-4, rtol=1e-4)
