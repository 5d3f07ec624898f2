"""Mixture of Experts: routing and expert compute vs per-token plain-math oracles, balancing, stats, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from verse import ModelArgs, ReasoningLLM
from verse.model.moe import MoE, balance_loss, load_stats
from verse.train.parallelize import apply_ac


def moe_args(**kw) -> ModelArgs:
    base = dict(arch="deepseek_v3", vocab_size=80, dim=32, n_layers=4, n_heads=4, inter_dim=48, attention="mla",
                q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16, n_dense_layers=1,
                score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5, norm_topk_prob=True,
                max_seq_len=64, dtype="float32")
    return ModelArgs(**{**base, **kw})


def random_moe(args: ModelArgs, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(args)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def reference_route(moe: MoE, x: torch.Tensor):
    """DeepSeek-V3 `Gate.forward` logic token by token, in float64 Python (the oracle)."""
    gate, n = moe.gate, moe.n_experts
    per_group = n // gate.n_groups
    routes = []
    for token in x.double():
        logits = gate.weight.double() @ token
        scores = logits.softmax(0) if gate.score_func == "softmax" else logits.sigmoid()
        biased = scores + (gate.bias.double() if gate.bias is not None else 0)
        groups = [biased[g * per_group:(g + 1) * per_group] for g in range(gate.n_groups)]
        group_score = [sorted(g.tolist())[-2:] if gate.bias is not None else [max(g.tolist())] for g in groups]
        best = sorted(range(gate.n_groups), key=lambda g: -sum(group_score[g]))[:gate.topk_groups]
        allowed = [e for e in range(n) if e // per_group in best]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[:gate.topk]
        weights = [scores[e].item() for e in chosen]
        if gate.norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        routes.append({e: w * gate.route_scale for e, w in zip(chosen, weights)})
    return routes


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum over routed experts of g * SwiGLU_e(x_t) + shared(x_t), token by token."""
    flat = x.view(-1, x.size(-1))
    w1, w2, w3 = (moe.experts.w1.double(), moe.experts.w2.double(), moe.experts.w3.double())
    out = []
    for token, route in zip(flat.double(), reference_route(moe, flat)):
        y = sum(g * (w2[e] @ (F.silu(w1[e] @ token) * (w3[e] @ token))) for e, g in route.items())
        if moe.shared_experts is not None:
            s = moe.shared_experts
            y = y + s.w2.weight.double() @ (F.silu(s.w1.weight.double() @ token) * (s.w3.weight.double() @ token))
        out.append(y)
    return torch.stack(out).view_as(x).float()


@pytest.mark.parametrize("kind", ["sigmoid-groups-bias", "softmax-greedy", "softmax-groups"])
def test_routing_matches_reference(kind):
    args = {"sigmoid-groups-bias": moe_args(),
            "softmax-greedy": moe_args(score_func="softmax", n_expert_groups=1, n_limited_groups=1,
                                       norm_topk_prob=False, route_scale=1.0),
            "softmax-groups": moe_args(score_func="softmax", n_activated_experts=3)}[kind]
    moe = random_moe(args)
    if moe.gate.bias is not None:
        with torch.no_grad():
            moe.gate.bias.uniform_(-0.3, 0.3)
    x = torch.randn(40, args.dim)
    weights, indices, _ = moe.gate(x)
    for t, route in enumerate(reference_route(moe, x)):
        assert set(indices[t].tolist()) == set(route), t
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        for e, w in route.items():
            assert got[e] == pytest.approx(w, rel=1e-5)


@pytest.mark.parametrize("dtype,dim,inter,grouped", [(torch.float32, 32, 16, False), (torch.float32, 12, 6, False),
                                                   (torch.bfloat16, 32, 16, True), (torch.bfloat16, 12, 6, False)])
def test_moe_forward_matches_per_token_oracle(dtype, dim, inter, grouped):
    """Both expert paths: grouped_mm (bfloat16, 16-byte aligned widths) and the per-expert loop (the rest)."""
    args = moe_args(dim=dim, moe_inter_dim=inter, n_heads=2)
    moe = random_moe(args, seed=1).to(dtype)
    x = torch.randn(3, 7, dim).to(dtype)
    assert moe.experts.use_grouped_mm(x) == (grouped and hasattr(F, "grouped_mm"))
    expected = reference_moe(moe, x)
    atol = 1e-4 if dtype == torch.float32 else 1e-2 * expected.abs().max().item()  # bfloat16: 8-bit mantissa
    torch.testing.assert_close(moe(x).float(), expected, atol=atol, rtol=1e-4 if dtype == torch.float32 else 0.0)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm")
def test_fp32_experts_under_bf16_autocast_take_one_grouped_mm(monkeypatch):
    """Training's usual setting (fp32 parameters, bf16 autocast): the experts run as grouped GEMMs (3 calls, no
    per-expert loop or host sync) and still match the per-token oracle, gradients included."""
    args = moe_args(dim=32, moe_inter_dim=16, n_heads=2)
    moe = random_moe(args, seed=1)
    x = torch.randn(3, 7, 32)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("host sync in the experts"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    monkeypatch.undo()
    assert len(calls) == 3
    expected = reference_moe(moe, x)
    torch.testing.assert_close(y.float(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0.0)
    weights = [moe.experts.w1, moe.experts.w2, moe.experts.w3]
    for g, ref in zip(torch.autograd.grad(y.float().sum(), weights), torch.autograd.grad(expected.sum(), weights)):
        torch.testing.assert_close(g, ref, atol=2e-2 * ref.abs().max().item(), rtol=0.0)


def test_bias_changes_selection_not_weights():
    args = moe_args(n_expert_groups=1, n_limited_groups=1, norm_topk_prob=False, route_scale=1.0)
    moe = random_moe(args)
    x = torch.randn(16, args.dim)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[5] = 100.0  # every token now picks expert 5 ...
    weights, indices, scores = moe.gate(x)
    assert (indices == 5).any(dim=1).all()
    picked = (indices == 5).float().argmax(dim=1)
    # ... and its weight is its unbiased sigmoid score
    torch.testing.assert_close(weights[torch.arange(16), picked], torch.sigmoid(x @ moe.gate.weight[5]))


def test_balance_loss_hand_values():
    # uniform routing: f_i = 1 for all experts and P_i = 1/E, so the loss is 1
    E, T = 4, 4
    scores = torch.full((1, T, E), 0.5)
    indices = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    assert balance_loss(scores, indices).item() == pytest.approx(1.0)
    # all tokens to experts 0 and 1 with normalized scores (0.4, 0.4, 0.1, 0.1):
    # f = E/(kT) * counts = 4/8 * (4, 4, 0, 0) = (2, 2, 0, 0); loss = 2*0.4 + 2*0.4 = 1.6
    scores = torch.tensor([0.4, 0.4, 0.1, 0.1]).expand(1, T, E)
    indices = torch.tensor([[0, 1]]).expand(1, T, 2).unsqueeze(0)[0]
    assert balance_loss(scores, indices).item() == pytest.approx(1.6)


def test_load_stats_hand_values():
    stats = load_stats(torch.tensor([0.0, 2.0, 2.0, 12.0]))  # mean 4
    assert stats["load_min"] == 0.0 and stats["load_max"] == 3.0
    assert stats["dropped"] == 1 and stats["overloaded"] == 1
    p = [0.125, 0.125, 0.75]
    assert stats["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    assert load_stats(torch.ones(8))["entropy"] == pytest.approx(1.0)


def test_router_bias_update_follows_load_sign():
    args = moe_args(router_bias_update_rate=0.01)
    model = ReasoningLLM(args).train()
    logits = model(torch.randint(0, 80, (2, 16)))
    moes = model.moe_layers
    loads = {i: moe.bias_load.clone() for i, moe in moes.items()}
    assert all(load.sum() == 2 * 16 * args.n_activated_experts for load in loads.values())
    assert all(not moe.gate.bias.any() for moe in moes.values())  # not moved by the forward itself
    logits.square().mean().backward()
    assert all(not moe.gate.bias.any() for moe in moes.values())  # nor by the backward
    model.update_router_bias()  # after the optimizer step
    for i, moe in moes.items():
        assert moe.bias_load.sum() == 0  # counting restarts
        expected = 0.01 * torch.sign(loads[i].mean() - loads[i])
        assert expected.abs().sum() > 0
        torch.testing.assert_close(moe.gate.bias, expected)
    before = {i: moe.gate.bias.clone() for i, moe in moes.items()}
    model.eval()(torch.randint(0, 80, (2, 16)))
    model.update_router_bias()
    assert all(torch.equal(moe.gate.bias, before[i]) for i, moe in moes.items())  # inference counts no load


def test_moe_stats_per_layer():
    model = ReasoningLLM(moe_args()).train()
    model(torch.randint(0, 80, (2, 10)))
    stats = model.moe_stats()
    assert sorted({key.split("/")[1] for key in stats}) == ["1", "2", "3"]
    assert all(model.moe_stats()[f"moe/{i}/load_max"] == 0 for i in (1, 2, 3))  # reset after reading
    assert ReasoningLLM(moe_args(n_routed_experts=0)).moe_stats() == {}


def test_gradients_reach_every_parameter_but_the_router_bias():
    torch.manual_seed(3)
    model = ReasoningLLM(moe_args(aux_loss_alpha=0.01, router_bias_update_rate=0.001)).train()
    tokens = torch.randint(0, 80, (4, 16))
    logits = model(tokens)
    assert all(moe.aux_loss.item() > 0 for moe in model.moe_layers.values())
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_loss_joins_the_backward_pass(scale):
    """Gradients with the balance loss on == gradients of (loss + scale * alpha * balance losses recomputed by hand);
    the scale is an argument of the forward (a trainer's 1 / micro-batches), not state written into the layers."""
    torch.manual_seed(5)
    alpha = 0.1
    with_aux = ReasoningLLM(moe_args(aux_loss_alpha=alpha)).train()
    without = ReasoningLLM(moe_args()).train()
    without.load_state_dict(with_aux.state_dict())
    tokens = torch.randint(0, 80, (2, 8))
    inputs = []
    for moe in without.moe_layers.values():
        moe.register_forward_hook(lambda module, args, out: inputs.append((module, args[0])))
    loss = without(tokens).square().mean()
    for moe, x in inputs:
        _, indices, scores = moe.gate(x.reshape(-1, x.size(-1)))
        loss = loss + scale * alpha * balance_loss(scores.view(*x.shape[:2], -1), indices.view(*x.shape[:2], -1))
    loss.backward()
    with_aux(tokens, aux_loss_scale=scale).square().mean().backward()
    assert not any(hasattr(moe, "aux_loss_scale") for moe in with_aux.moe_layers.values())
    for (name, a), (_, b) in zip(with_aux.named_parameters(), without.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


BIAS_WORKER = """
import sys
import torch
import torch.distributed as dist
from verse.config import ModelArgs
from verse.model import ReasoningLLM
from verse.train.parallelize import update_router_bias

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = ReasoningLLM(ModelArgs(**{args})).train()
model(torch.load(sys.argv[1], weights_only=True)[rank:rank + 1])
update_router_bias(model)
torch.save({{i: moe.gate.bias for i, moe in model.moe_layers.items()}}, f"{{sys.argv[2]}}.{{rank}}")
dist.destroy_process_group()
"""


def test_router_bias_update_sums_loads_over_ranks(tmp_path):
    """Two gloo ranks (torchrun) see different tokens; both move their biases by the sign of the load error of ALL
    tokens (oracle: one process counting both ranks' tokens), not of their own. The all-reduce is the trainer's
    (`verse.train.parallelize`); the model holds no torch.distributed call."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(7)
    tokens = torch.randint(0, 80, (2, 16))
    torch.save(tokens, tmp_path / "tokens.pt")
    args = moe_args(router_bias_update_rate=0.01).to_dict()
    (tmp_path / "worker.py").write_text(BIAS_WORKER.format(args=repr(args)))
    out = str(tmp_path / "bias")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "tokens.pt"), out],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    def loads_of(rows: torch.Tensor) -> dict:
        torch.manual_seed(0)
        model = ReasoningLLM(moe_args(router_bias_update_rate=0.01)).train()
        for row in rows:
            model(row[None])
        return {i: moe.bias_load for i, moe in model.moe_layers.items()}

    both, own = loads_of(tokens), loads_of(tokens[:1])
    assert any(not torch.equal(torch.sign(both[i].mean() - both[i]), torch.sign(own[i].mean() - own[i]))
               for i in both)  # the test tells summed from local loads apart
    for i, load in both.items():
        expected = 0.01 * torch.sign(load.mean() - load)
        assert torch.equal(ranks[0][i], expected) and torch.equal(ranks[1][i], expected), i


def test_activation_checkpointing_gives_the_same_gradients_and_bias_updates():
    torch.manual_seed(4)
    args = moe_args(aux_loss_alpha=0.01, router_bias_update_rate=0.01)
    plain = ReasoningLLM(args).train()
    ckpt = apply_ac(ReasoningLLM(args).train())
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 80, (2, 12))
    for model in (plain, ckpt):
        model(tokens).square().mean().backward()
        model.update_router_bias()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
        else:  # the router bias moved the same way (recomputed layers count their tokens twice: same sign)
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, b, msg=name)
