"""The GRPO policy loss: clipped policy ratio (PPO, Schulman et al. 2017) with decoupled ε_low / ε_high (DAPO,
Yu et al. 2025), an optional k3 KL penalty to a frozen reference (Schulman 2020, "Approximating KL divergence"),
normalised per token.

Normalisation: the loss is the SUM over every completion token of the whole step's batch divided by the number
of those tokens (DAPO's token-level loss), not GRPO's mean of per-sequence means. Per-sequence means give each
token of a long completion less weight than a token of a short one, so long wrong answers are penalised less
and long right ones rewarded less (the length bias Dr. GRPO points out); the token-level sum treats every token
alike, and dividing by the batch's token count (a constant of the step) keeps the gradient scale stable and makes
micro-batching exact: micro-batches pass the step's total as `n_tokens`. Under torchrun that total is the step's
completion tokens over ALL data-parallel ranks (all-reduced before dividing; `verse.rl.trainer.GrpoTrainer.step`),
so with gradients summed over ranks N ranks compute the one-process loss and gradient.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossStats:
    """Sums over the loss tokens of one call (divide by the token count for means).

    Attributes:
        kl (float): sum of the per-token k3 KL estimates (0 without a reference).
        clipped (float): tokens whose clipped term was the active one.
        tokens (int): loss tokens.
    """

    kl: float
    clipped: float
    tokens: int


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                n_tokens: int, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, LossStats]:
    """GRPO's objective, negated for minimisation, summed over the masked tokens and divided by `n_tokens`.

    Per token: -(min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) - β KL_k3), with ρ = exp(logp - old_logp).

    Args:
        logp (torch.Tensor): [B, T] log-probs of the sampled tokens under the policy (with grad).
        old_logp (torch.Tensor): [B, T] the same under the policy that sampled them (no grad).
        advantages (torch.Tensor): [B] one advantage per completion.
        mask (torch.Tensor): [B, T] bool, True on completion tokens.
        n_tokens (int): completion tokens of the whole step (all micro-batches of all ranks), the normaliser.
        eps_low (float): lower clip range.
        eps_high (float): upper clip range (DAPO's clip-higher when > eps_low).
        beta (float): weight of the KL penalty; 0 = none.
        ref_logp (Optional[torch.Tensor]): [B, T] log-probs under the reference (needed when beta > 0).

    Returns:
        tuple[torch.Tensor, LossStats]: the scalar loss and its statistics.
    """
    mask = mask.float()
    adv = advantages.float()[:, None]
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl_sum = 0.0
    if beta > 0:
        kl = k3_kl(logp.float(), ref_logp.float())
        per_token = per_token + beta * kl
        kl_sum = float((kl.detach() * mask).sum())
    loss = (per_token * mask).sum() / max(n_tokens, 1)
    was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, LossStats(kl=kl_sum, clipped=float((was_clipped.float() * mask).sum()), tokens=int(mask.sum()))


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 4096) -> torch.Tensor:
    """Log-probs of each next token of right-padded sequences, at the masked positions only.

    Args:
        model (nn.Module): a `ReasoningLLM`.
        input_ids (torch.Tensor): [B, T] prompt + completion, right-padded (causal attention: padding after a
            row's tokens never reaches them, and positions start at 0 in every row).
        mask (torch.Tensor): [B, T - 1] bool, True where target `input_ids[:, 1:]` is a completion token.
        temperature (float): logits are divided by it, as when sampling (1 for greedy rollouts), so the old
            log-probs are those of the distribution the tokens came from.
        chunk_size (int): positions per chunk of the output head (full logits never exist).

    Returns:
        torch.Tensor: [B, T - 1] float32 log-probs, 0 where `mask` is False.
    """
    hidden = model.hidden_states(input_ids[:, :-1])
    keep = mask.reshape(-1)
    h = hidden.reshape(-1, hidden.size(-1))[keep]
    targets = input_ids[:, 1:].reshape(-1)[keep]
    scale = 1.0 / temperature if temperature > 0 else 1.0
    picked = [-F.cross_entropy(model.head(hc).float() * scale, yc, reduction="none")
              for hc, yc in zip(h.split(chunk_size), targets.split(chunk_size))]
    out = torch.zeros(keep.shape, dtype=torch.float32, device=input_ids.device)
    if picked:
        out = out.masked_scatter(keep, torch.cat(picked))
    return out.view(mask.shape)
