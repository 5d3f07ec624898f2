"""Multi-head Latent Attention: naive vs absorb vs plain math, the KV cache of both, cache sizes, gradients."""

import math

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.model.mla import MLA, cache_bytes_per_token, mla_softmax_scale, pads_values
from verse.model.rope import rope_cos_sin


def mla_args(**kw) -> ModelArgs:
    base = dict(arch="deepseek_v3", vocab_size=80, dim=32, n_layers=2, n_heads=4, inter_dim=64, attention="mla",
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                max_seq_len=64, dtype="float32")
    return ModelArgs(**{**base, **kw})


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def plain_mla(m: MLA, x: torch.Tensor, theta: float) -> torch.Tensor:
    """DeepSeek-V2 eq. 37-47 written out head by head, RoPE from first principles (rotate-half pairs i, i + d/2)."""
    B, T, _ = x.shape
    H, dn, dr, dv, r = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(v):  # v [..., T, dr]
        inv = theta ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        a, b = v[..., :dr // 2], v[..., dr // 2:]
        return torch.cat((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()), -1)

    x = x.double()
    w = {k: p.double() for k, p in m.state_dict().items()}
    c_q = rms(x @ w["wq_a.weight"].T, w["q_norm.weight"])
    q = (c_q @ w["wq_b.weight"].T).view(B, T, H, dn + dr)
    kv_a = x @ w["wkv_a.weight"].T
    c_kv, k_r = rms(kv_a[..., :r], w["kv_norm.weight"]), rope(kv_a[..., r:])
    kv = (c_kv @ w["wkv_b.weight"].T).view(B, T, H, dn + dv)
    out = []
    for h in range(H):
        qh = torch.cat((q[:, :, h, :dn], rope(q[:, :, h, dn:])), -1)
        kh = torch.cat((kv[:, :, h, :dn], k_r), -1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(dn + dr)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out.append(scores.softmax(-1) @ kv[:, :, h, dn:])
    return torch.cat(out, -1) @ w["wo.weight"].T


def test_naive_and_absorb_match_plain_math():
    torch.manual_seed(0)
    args = mla_args()
    naive = MLA(args)
    randomize(naive)
    absorb = MLA(args.replace(attn_impl="absorb"))
    absorb.load_state_dict(naive.state_dict())
    x = torch.randn(2, 9, args.dim)
    cos, sin = rope_cos_sin(args, args.qk_rope_head_dim)
    expected = plain_mla(naive, x, args.rope_theta).float()
    for m in (naive, absorb):
        torch.testing.assert_close(m(x, cos[:9][None], sin[:9][None]), expected, atol=1e-4, rtol=1e-4)


def test_padded_values_backward_matches_plain_math():
    """On CPU values narrower than the keys are padded for SDPA's flash kernel (`pads_values`): the input gradient
    equals plain math's (float64 autograd through `plain_mla`)."""
    torch.manual_seed(0)
    args = mla_args()
    m = MLA(args)
    randomize(m)
    assert pads_values(torch.device("cpu"), m.qk_head_dim, m.v_head_dim)
    x = torch.randn(2, 9, args.dim, requires_grad=True)
    g = torch.randn(2, 9, args.dim)
    cos, sin = rope_cos_sin(args, args.qk_rope_head_dim)
    (m(x, cos[:9][None], sin[:9][None]) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (plain_mla(m, x64, args.rope_theta) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-4, rtol=1e-4)


def test_yarn_softmax_scale():
    args = ModelArgs.from_preset("deepseek-v3-671b")
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert mla_softmax_scale(args) == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert mla_softmax_scale(args.replace(rope_scaling="none")) == pytest.approx(192 ** -0.5)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_kv_cache_decoding_matches_full_forward(q_lora_rank):
    torch.manual_seed(1)
    args = mla_args(q_lora_rank=q_lora_rank, rope_scaling="yarn", rope_factor=4.0, original_seq_len=16,
                    mscale=0.707, mscale_all_dim=0.707)
    naive = ReasoningLLM(args).eval()
    absorb = ReasoningLLM(args.replace(attn_impl="absorb")).eval()
    absorb.load_state_dict(naive.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        full = naive(tokens)
        outputs = {}
        for name, model in (("naive", naive), ("absorb", absorb)):
            model.setup_cache(2, 32)
            steps = [model(tokens[:, :5], input_pos=torch.arange(5))]
            for t in range(5, 12):
                steps.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t])))
            outputs[name] = torch.cat(steps, dim=1)
            model.clear_cache()
    torch.testing.assert_close(outputs["naive"], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs["absorb"], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs["absorb"], outputs["naive"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cache_bytes_per_token(impl):
    args = mla_args(attn_impl=impl)
    model = ReasoningLLM(args)
    model.setup_cache(1, 32, dtype=torch.bfloat16)
    allocated = sum(b.numel() * b.element_size() for layer in model.layers for b in layer.attn.cache.buffers())
    assert allocated == cache_bytes_per_token(args, dtype=torch.bfloat16) * 32
    assert model.cache_len == 32


def test_deepseek_v3_cache_sizes():
    args = ModelArgs.from_preset("deepseek-v3-671b")
    # naive: 128 heads x (192 key + 128 value) channels; absorb: 512 latent + 64 RoPE key channels; 61 layers, bf16
    assert cache_bytes_per_token(args, "naive") == 61 * 128 * (192 + 128) * 2
    assert cache_bytes_per_token(args, "absorb") == 61 * (512 + 64) * 2


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_gradients_reach_every_attention_weight(impl):
    torch.manual_seed(2)
    model = ReasoningLLM(mla_args(attn_impl=impl)).train()
    model(torch.randint(0, 80, (2, 7))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_generator_with_padded_batch_matches_greedy_recompute():
    """verse.infer.generate (left-padded batch, latent cache) == greedy decoding by full recomputation."""
    from verse import load_tokenizer
    from verse.infer.generate import generate

    tokenizer = load_tokenizer("byte")  # its stop ids lie outside this model's 80-token vocabulary
    torch.manual_seed(3)
    args = mla_args(n_layers=2)
    prompts = [[5, 9, 13, 2, 7, 7, 1], [4, 8]]
    naive = ReasoningLLM(args).eval()
    with torch.no_grad():
        expected = []
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(6):
                ids.append(int(naive(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    for impl in ("naive", "absorb"):
        model = ReasoningLLM(args.replace(attn_impl=impl)).eval()
        model.load_state_dict(naive.state_dict())
        assert generate(model, tokenizer, prompts, max_new_tokens=6) == expected, impl


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_packed_documents_match_separate_forwards(impl):
    """Packing (position_ids restart + document_mask) == running each document alone."""
    from verse.model.masks import document_mask

    torch.manual_seed(4)
    model = ReasoningLLM(mla_args(attn_impl=impl)).eval()
    docs = [torch.randint(0, 80, (1, n)) for n in (5, 3, 6)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.size(1)) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        got = model(packed, position_ids=position_ids, attn_mask=document_mask(position_ids))
        expected = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
