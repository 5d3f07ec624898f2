"""The dense ReasoningLLM core: RoPE scalings vs transformers' RoPE functions, layers vs plain torch math,
KV cache vs full recompute, masks, activation checkpointing, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from verse import ModelArgs, ReasoningLLM
from verse.model.masks import causal_mask, document_mask
from verse.model.norm import RMSNorm
from verse.model.rope import rope_frequencies
from verse.train.parallelize import apply_ac


def _hf_inv_freq(rope_type: str, args: ModelArgs, **params) -> tuple[torch.Tensor, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=args.dim, num_attention_heads=args.n_heads, max_position_embeddings=args.max_seq_len,
                         rope_theta=args.rope_theta,
                         rope_scaling={"rope_type": rope_type, "factor": args.rope_factor, **params})
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


@pytest.mark.parametrize("scaling", ["linear", "llama3", "yarn"])
def test_rope_scaling_matches_transformers(scaling):
    args = ModelArgs(dim=512, n_heads=4, inter_dim=64, vocab_size=64, n_layers=1, max_seq_len=8192,
                     rope_theta=500000.0, rope_scaling=scaling, rope_factor=8.0, original_seq_len=1024)
    params = {}
    if scaling == "llama3":
        params = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024)
    elif scaling == "yarn":
        params = dict(beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=1024)
    expected, _ = _hf_inv_freq(scaling, args, **params)
    torch.testing.assert_close(rope_frequencies(args, args.head_dim), expected.float(), rtol=1e-6, atol=0)


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def _reference_forward(model: ReasoningLLM, ids: torch.Tensor) -> torch.Tensor:
    """Plain-math Llama forward (explicit repeat of KV heads, explicit softmax) over the model's own weights."""
    a = model.args
    T = ids.size(1)
    inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2).float() / a.head_dim))
    ang = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t[..., : a.head_dim // 2], t[..., a.head_dim // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    h = model.embed.weight[ids]
    causal = torch.ones(T, T).tril().bool()
    for layer in model.layers:
        x = rms(h, layer.attn_norm.weight)
        q = (x @ layer.attn.wq.weight.T).view(1, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = (x @ layer.attn.wk.weight.T).view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = (x @ layer.attn.wv.weight.T).view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(a.head_dim)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(1, T, -1) @ layer.attn.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        h = h + (F.silu(x @ layer.ffn.w1.weight.T) * (x @ layer.ffn.w3.weight.T)) @ layer.ffn.w2.weight.T
    return rms(h, model.norm.weight) @ model.head.weight.T


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_plain_math(tie):
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", tie_embeddings=tie)).eval()
    ids = torch.randint(0, model.args.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _reference_forward(model, ids), rtol=1e-4, atol=1e-4)
    assert (model.head.weight is model.embed.weight) == tie


def test_kv_cache_matches_full_recompute(tiny_args):
    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args).eval()
    ids = torch.randint(0, tiny_args.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 32)
        parts = [model(ids[:, :9], input_pos=torch.arange(9))]
        parts += [model(ids[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_sliding_window_mask():
    mask = causal_mask(torch.arange(5), 5, sliding_window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)


def test_sliding_window_changes_only_far_tokens():
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny", dtype="float32")
    model = ReasoningLLM(args).eval()
    windowed = ReasoningLLM(args.replace(sliding_window=4)).eval()
    windowed.load_state_dict(model.state_dict())
    ids = torch.randint(0, args.vocab_size, (1, 10))
    with torch.no_grad():
        a, b = model(ids), windowed(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_document_mask_isolates_packed_documents(tiny_args):
    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args).eval()
    doc1, doc2 = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 7))
    packed = torch.cat([doc1, doc2], 1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    assert document_mask(position_ids)[0, 0, 6].tolist() == [False] * 5 + [True, True] + [False] * 5
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, attn_mask=document_mask(position_ids))
        torch.testing.assert_close(out[:, :5], model(doc1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 5:], model(doc2), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_same_gradients(tiny_args):
    torch.manual_seed(0)
    plain = ReasoningLLM(tiny_args).train()
    ckpt = apply_ac(ReasoningLLM(tiny_args).train())
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 512, (2, 12))
    for model in (plain, ckpt):
        model(ids).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_is_the_default_dtype():
    model = ReasoningLLM(ModelArgs.from_preset("tiny"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(torch.randint(0, 512, (1, 4)))
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 4, 512)
    assert torch.get_default_dtype() == torch.float32  # construction leaves the global default alone


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = ReasoningLLM(ModelArgs.from_preset("llama-2-7b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == 6_738_415_616


@pytest.mark.parametrize("heads, kv_heads, T", [(6, 2, 150), (4, 4, 64), (3, 1, 20)])
def test_blocked_causal_attention_matches_plain_math(heads, kv_heads, T):
    """CPU's blocked causal attention (forward and its hand-written backward) against softmax(q k^T / sqrt(d)) v
    written out in float64 and differentiated by autograd: GQA, MHA, a sequence that is not a multiple of the block
    (150 = 64 + 64 + 22) and one shorter than a block."""
    from verse.model.attention import BlockedCausalAttention

    torch.manual_seed(0)
    B, D = 2, 16
    q = torch.randn(B, heads, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, T, D, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, T, heads * D, dtype=torch.float64)
    G = heads // kv_heads
    scores = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v.repeat_interleave(G, 1)).transpose(1, 2).reshape(B, T, heads * D)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out = BlockedCausalAttention.apply(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # the softmax runs in float32
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_training_attention_matches_sdpa_under_bf16_autocast(tiny_args, monkeypatch):
    """The model's CPU path (blocked attention) against the same model with SDPA's kernel, under bf16 autocast:
    the loss and every gradient agree to bf16 rounding."""
    from verse.model import attention

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args).train()
    ids = torch.randint(0, tiny_args.vocab_size, (2, 40))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    blocked = loss_and_grads()
    calls = []

    def via_sdpa(q, k, v):  # SDPA's kernel in the blocked function's place
        calls.append(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(q.size(0), q.size(2), -1)

    monkeypatch.setattr(attention.BlockedCausalAttention, "apply", via_sdpa)
    reference = loss_and_grads()
    assert calls == [torch.bfloat16] * tiny_args.n_layers  # every layer took the blocked path, in bf16
    torch.testing.assert_close(blocked[0], reference[0], atol=1e-2, rtol=1e-2)
    for got, want in zip(blocked[1], reference[1]):
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-6
