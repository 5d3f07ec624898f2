"""Mixture of Experts of DeepSeek-V2/V3: routed + shared SwiGLU experts, group-limited top-k routing, load balancing.

Balancing comes in two kinds, both optional:

- the auxiliary-loss-free routing bias of DeepSeek-V3 (arXiv:2412.19437, section 2.1.2): a per-expert bias is added to
  the scores for *selection only* and, after each optimizer step (`update_bias`), moved by
  `router_bias_update_rate` against the sign of the expert's load error over that step (never by gradient);
- the sequence-wise auxiliary balance loss (DeepSeek-V3 eq. 17-20, DeepSeek-V2 eq. 23), weighted by `aux_loss_alpha`,
  attached to the layer output by `AddAuxLoss` so that any training loop's `loss.backward()` includes it.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from verse.config import ModelArgs
from verse.model.ffn import MLP

# an expert is "overloaded" when it receives more than this multiple of the mean load
OVERLOAD_FACTOR = 2.0


def has_router_bias(args: ModelArgs) -> bool:
    """Whether the router carries the DeepSeek-V3 selection bias (sigmoid scoring, or bias balancing switched on)."""
    return args.score_func == "sigmoid" or args.router_bias_update_rate > 0


class Gate(nn.Module):
    """Router: scores every expert, keeps the best `n_limited_groups` groups, picks `n_activated_experts` experts.

    Group score is the top-1 score of the group (DeepSeek-V2) without a bias, the sum of its top-2 biased scores
    (DeepSeek-V3) with one. Scores, top-k and weights are float32; under bf16 autocast the router's matmul itself
    runs in bf16, as transformers' DeepseekV3 router does (DeepSeek's reference keeps it in float32).

    Args:
        args (ModelArgs): `dim`, `n_routed_experts`, `n_activated_experts`, `score_func`, `n_expert_groups`,
            `n_limited_groups`, `route_scale`, `norm_topk_prob`, `router_bias_update_rate`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.norm_topk_prob = args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # not trained by gradient: moved by `MoE.update_bias`
        self.bias = (nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
                     if has_router_bias(args) else None)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Router weight ~ N(0, std), bias 0."""
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens `x` [N, dim].

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: routing weights [N, k] (float32, scaled by
            `route_scale`), expert indices [N, k], and the unbiased scores of all experts [N, n_routed_experts].
        """
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias.float()
        if self.n_groups > 1:
            grouped = choice.view(x.size(0), self.n_groups, -1)
            group_scores = grouped.amax(dim=-1) if self.bias is None else grouped.topk(2, dim=-1)[0].sum(dim=-1)
            kept = group_scores.topk(self.topk_groups, dim=-1)[1]
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class Experts(nn.Module):
    """`n_experts` SwiGLU experts with stacked weights, applied to tokens already sorted by expert.

    Uses `torch.nn.functional.grouped_mm` (one kernel for all experts, CPU and CUDA) for bfloat16 with 16-byte aligned
    widths, what its CUDA kernel and torch.compile accept, fp32 parameters under bf16 autocast included; otherwise a
    loop over the experts' contiguous token groups (never over tokens).

    Args:
        n_experts (int): number of experts.
        dim (int): model width.
        inter_dim (int): hidden width of each expert.
        out_scale (float): `init_weights` std multiplier of the down projections (residual outputs).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, out_scale: float = 1.0):
        super().__init__()
        self.out_scale = out_scale
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Weights ~ N(0, std); the down projection (a residual output) ~ N(0, std * out_scale)."""
        nn.init.normal_(self.w1, mean=0.0, std=std)
        nn.init.normal_(self.w3, mean=0.0, std=std)
        nn.init.normal_(self.w2, mean=0.0, std=std * self.out_scale)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether `grouped_mm` can run on `x`: bfloat16, rows of 16-byte multiples."""
        if not hasattr(F, "grouped_mm") or x.dtype != torch.bfloat16:
            return False
        return (self.w1.size(2) * 2) % 16 == 0 and (self.w1.size(1) * 2) % 16 == 0

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its rows of `x`.

        Args:
            x (torch.Tensor): [M, dim], rows grouped by expert in order 0..n_experts-1.
            counts (torch.Tensor): rows per expert [n_experts].

        Returns:
            torch.Tensor: [M, dim].
        """
        # this rank's experts: all of them, or its block of an expert-parallel split (verse.train.parallelize)
        w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w2, self.w3))
        if torch.is_autocast_enabled(x.device.type):
            # grouped_mm is on none of autocast's lists: cast as autocast casts a linear's operands, so that fp32
            # parameters trained under bf16 autocast take the one-kernel path too (not a loop over the experts)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
        if self.use_grouped_mm(x):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(F.grouped_mm(x, w1.mT, offs=offs)) * F.grouped_mm(x, w3.mT, offs=offs)
            return F.grouped_mm(h, w2.mT, offs=offs)
        groups = x.split(counts.tolist())
        return torch.cat([F.linear(F.silu(F.linear(xe, a)) * F.linear(xe, c), b)
                          for xe, a, b, c in zip(groups, w1, w2, w3)])


class AddAuxLoss(torch.autograd.Function):
    """Identity on `x` whose backward also feeds gradient 1 into `aux_loss` (DeepSeek-V2's `AddAuxiliaryLoss`).

    d(total)/d(theta) = d(loss)/d(theta) + d(aux_loss)/d(theta), without the training loop adding the term.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux_loss.dtype
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


def balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (DeepSeek-V3 eq. 17-20).

    f_i = E / (k T) * (tokens of the sequence routed to expert i), P_i = mean over the sequence of the normalized
    score s_i / sum_j s_j. It is 1 for perfectly uniform routing and grows with imbalance.

    Args:
        scores (torch.Tensor): router scores [B, T, E] (float32).
        indices (torch.Tensor): chosen experts [B, T, k].

    Returns:
        torch.Tensor: scalar loss (not yet multiplied by `aux_loss_alpha`).
    """
    B, T, E = scores.shape
    k = indices.size(-1)
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, indices.reshape(B, -1), torch.ones(B, T * k, device=scores.device))
    f = counts * (E / (k * T))
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


def load_stats(load: torch.Tensor) -> Dict[str, float]:
    """Summary of tokens per expert.

    Args:
        load (torch.Tensor): tokens routed to each expert [E].

    Returns:
        Dict[str, float]: `load_min` / `load_max` (fewest / most tokens of an expert over the mean), `entropy`
        (of the load distribution over log E: 1 = perfectly balanced), `dropped` (experts that received no token),
        `overloaded` (experts above `OVERLOAD_FACTOR` times the mean).
    """
    load = load.float()
    total = load.sum().clamp_min(1.0)
    mean = total / load.numel()
    p = load / total
    entropy = -(p * p.clamp_min(1e-30).log()).sum() / math.log(load.numel()) if load.numel() > 1 else p.new_ones(())
    return {
        "load_min": (load.min() / mean).item(),
        "load_max": (load.max() / mean).item(),
        "entropy": entropy.item(),
        "dropped": int((load == 0).sum()),
        "overloaded": int((load > OVERLOAD_FACTOR * mean).sum()),
    }


class MoE(nn.Module):
    """DeepSeek MoE layer: y = sum_k g_k * expert_k(x) + shared_experts(x).

    While training it accumulates tokens per expert (for `stats()` and `update_bias()`) and, with
    `aux_loss_alpha` > 0, adds the weighted balance loss to the backward pass (kept in `aux_loss` for logging),
    times the `aux_loss_scale` given to `forward`.

    Args:
        args (ModelArgs): `dim`, `moe_inter_dim`, `n_routed_experts`, `n_shared_experts`, routing fields,
            `aux_loss_alpha`, `router_bias_update_rate`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.aux_loss_alpha = args.aux_loss_alpha
        self.bias_update_rate = args.router_bias_update_rate
        self.gate = Gate(args)
        out_scale = (2 * args.n_layers) ** -0.5  # residual output projections (GPT-2)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, out_scale)
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, out_scale)
                               if args.n_shared_experts > 0 else None)
        # tokens per expert while training: since the last `stats()` and since the last `update_bias()`
        self.register_buffer("expert_load", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("bias_load", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None

    def reset_stats(self) -> None:
        """Zero the load counters, on the weights' device (also after a `meta`-device build)."""
        device = self.gate.weight.device
        self.expert_load = torch.zeros(self.n_experts, dtype=torch.float32, device=device)
        self.bias_load = torch.zeros(self.n_experts, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor, aux_loss_scale: float = 1.0) -> torch.Tensor:
        """Apply the layer to `x` [B, T, dim].

        Args:
            x (torch.Tensor): input [B, T, dim].
            aux_loss_scale (float): weight of this forward's balance loss in the gradient; a trainer passes
                1 / micro-batches so that an accumulated step averages it, like the token-normalised loss.

        Returns:
            torch.Tensor: [B, T, dim].
        """
        B, T, D = x.shape
        x = x.view(-1, D)
        weights, indices, scores = self.gate(x)
        flat = indices.flatten()
        counts = torch.bincount(flat, minlength=self.n_experts)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // indices.size(1)
        y = self.experts(x[token], counts) * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training:
            with torch.no_grad():
                self.expert_load += counts
                self.bias_load += counts
            if self.aux_loss_alpha > 0:
                self.aux_loss = self.aux_loss_alpha * balance_loss(scores.view(B, T, -1), indices.view(B, T, -1))
                out = AddAuxLoss.apply(out, self.aux_loss * aux_loss_scale)
        return out.view(B, T, D)

    @property
    def balances_by_bias(self) -> bool:
        """Whether `update_bias` moves this layer's router bias (a bias exists and its update rate is > 0)."""
        return self.gate.bias is not None and self.bias_update_rate > 0

    def stats(self, reset: bool = True) -> Dict[str, float]:
        """Load statistics since the last reset (see `load_stats`)."""
        stats = load_stats(self.expert_load)
        if reset:
            self.expert_load.zero_()
        return stats

    @torch.no_grad()
    def update_bias(self, load: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing step: b_i += rate * sign(mean load - load_i), then reset the load counter.

        Args:
            load (Optional[torch.Tensor]): tokens per expert [n_experts] since the last update; default this
                layer's own count `bias_load`. Data-parallel training passes the count summed over the ranks
                (`verse.train.parallelize.update_router_bias`), so that every rank applies the same update.
        """
        if not self.balances_by_bias:
            return
        load = self.bias_load if load is None else load
        self.gate.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.bias_load.zero_()
