"""Next-token selection: repetition penalty, temperature, top-k and top-p (nucleus) sampling, or greedy."""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass
class SamplingParams:
    """How the next token is picked from the logits.

    Args:
        temperature (float): softmax temperature; 0 picks the most likely token (greedy).
        top_k (int): sample among the `top_k` most likely tokens; 0 = all.
        top_p (float): sample among the smallest set of tokens whose probability reaches `top_p`; 1 = all.
        repetition_penalty (float): divide positive (multiply negative) logits of tokens already in the
            prompt or output by this (Keskar et al., 2019, CTRL); 1 = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        from verse.errors import VerseError

        # written so that NaN fails every check (NaN compares false)
        if not 0 <= self.temperature < math.inf:
            raise VerseError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.top_k:
            raise VerseError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise VerseError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise VerseError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_seed(seed: Optional[int]) -> None:
    """Raise `VerseError` unless `seed` is None or an integer `torch.Generator.manual_seed` takes (0 .. 2**64 - 1)."""
    from verse.errors import VerseError

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise VerseError(f"seed must be an integer in 0 .. 2**64 - 1, got {seed!r:.40}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize the logits of tokens already seen, in place.

    Args:
        logits (torch.Tensor): float logits [B, V].
        seen (torch.Tensor): bool [B, V], True for tokens in the prompt or output so far.
        penalty (float): > 1 discourages repeats.

    Returns:
        torch.Tensor: `logits`, modified.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return logits.copy_(torch.where(seen, penalized, logits))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k / nucleus (Holtzman et al., 2020) to -inf, in place.

    Args:
        logits (torch.Tensor): float logits [B, V] (already divided by the temperature).
        top_k (int): keep this many most likely tokens; 0 = all.
        top_p (float): keep the most likely tokens until their probability mass reaches `top_p`.

    Returns:
        torch.Tensor: `logits`, filtered; at least one token per row survives.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (so the top one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill_(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
           generator: Union[torch.Generator, Sequence[torch.Generator], None] = None) -> torch.Tensor:
    """Pick the next token of every row.

    Args:
        logits (torch.Tensor): logits of the last position [B, V], any float dtype.
        params (SamplingParams): temperature, top-k, top-p, repetition penalty.
        seen (Optional[torch.Tensor]): bool [B, V] tokens seen so far (needed for the repetition penalty).
        generator (Union[torch.Generator, Sequence[torch.Generator], None]): random source, for reproducible
            sampling; a sequence of k sources splits the rows into k equal blocks, each drawn from its own, so a
            block's tokens never depend on the other rows (GRPO: one source per prompt's group, whichever rank or
            batch the group is sampled in).

    Returns:
        torch.Tensor: token ids [B].
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = top_k_top_p_filter(logits.div_(params.temperature), params.top_k, params.top_p).softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    blocks = probs.view(len(generator), -1, probs.size(-1)).unbind(0)  # one draw per block (a handful of groups)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(blocks, generator)]).squeeze(-1)
