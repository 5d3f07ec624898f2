"""Rollouts: `group_size` sampled completions per prompt from Verse's batched KV-cache generator, laid out for the
policy loss (prompt + completion right-padded, a mask on the completion tokens)."""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from verse.infer.generate import decode_steps
from verse.infer.sampling import SamplingParams


@dataclass
class Rollout:
    """Completions of a batch of prompts, ready for `verse.rl.loss.token_logprobs`.

    Attributes:
        input_ids (torch.Tensor): [N, T] prompt + completion (including its stop token), right-padded with 0.
        mask (torch.Tensor): [N, T - 1] bool, True where the target `input_ids[:, 1:]` is a completion token.
        completions (List[List[int]]): each completion's ids without the stop token (for decoding and rewards).
        prompt_index (List[int]): which prompt each row answers (`group_size` rows per prompt, side by side).
        truncated (torch.Tensor): [N] bool, True where the completion was cut at `max_new_tokens` (no stop token).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    completions: List[List[int]]
    prompt_index: List[int]
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """[N] completion tokens per row (the stop token included)."""
        return self.mask.sum(dim=1)


def generation_copy(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """The policy to sample from: `model` itself, or a frozen copy of it in the step's compute dtype.

    An fp32 policy trained under bf16 autocast samples from a bf16 copy, as RL trainers sample from an inference
    engine's bf16 weights (1.6x faster batch-32 decoding of SmolLM2 on a 2-core AVX-512-BF16 CPU). The copy is made
    parameter by parameter (`deepcopy` given each parameter's cast), so no second fp32 model ever exists.

    Args:
        model (nn.Module): the policy.
        dtype (Optional[torch.dtype]): the compute dtype (None: sample from `model`).

    Returns:
        nn.Module: `model` when `dtype` is None or float32 or a parameter is not a plain float32 one (an NF4 base,
        a DTensor shard), else the copy.
    """
    params = list(model.parameters())
    plain = all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in params)  # not NF4, not DTensor
    if dtype is None or dtype == torch.float32 or not plain:
        return model
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
    return copy.deepcopy(model, memo)  # buffers (the float32 RoPE tables) are copied as they are


@torch.no_grad()
def rollout(model, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int, stop_ids: Sequence[int],
            temperature: float = 1.0, top_p: float = 1.0,
            generator: Union[torch.Generator, Sequence[torch.Generator], None] = None) -> Rollout:
    """Sample `group_size` completions of every prompt in one generation batch.

    A row ends at its first stop token, which stays in the completion (so the policy learns when to stop);
    a row that never stops is cut at `max_new_tokens`.

    Args:
        model (ReasoningLLM): the policy (put in eval mode for the generation, restored after).
        prompts (Sequence[Sequence[int]]): prompt ids.
        group_size (int): completions per prompt.
        max_new_tokens (int): most tokens per completion.
        stop_ids (Sequence[int]): ids that end a completion.
        temperature (float): sampling temperature (0 = greedy).
        top_p (float): nucleus sampling (1 = off).
        generator (Union[torch.Generator, Sequence[torch.Generator], None]): random source; a sequence holds one per
            prompt, so each group's samples depend only on its own source (seeded per step and global prompt index:
            exact resume, and the same samples whichever rank draws them).

    Returns:
        Rollout: the batch.
    """
    rows = [list(p) for p in prompts for _ in range(group_size)]
    params = SamplingParams(temperature=temperature, top_p=top_p)
    training = model.training
    model.eval()
    device = model.embed.weight.device
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    tokens, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
    steps = decode_steps(model, rows, max_new_tokens, params, generator)
    try:
        for token in steps:
            tokens.append(token)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
    finally:
        steps.close()
        model.train(training)
    new = torch.stack(tokens, dim=1).cpu()  # [N, S]
    is_stop = torch.isin(new, stops.cpu())
    # tokens up to and including the first stop token count; everything after it is discarded
    keep = (is_stop.cumsum(dim=1) - is_stop.int()) == 0
    lengths = keep.sum(dim=1)
    prompt_lens = torch.tensor([len(r) for r in rows])
    T = int((prompt_lens + lengths).max())
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    completions = []
    for i, row in enumerate(rows):  # per row (not per token): a handful of slice copies
        n, p = int(lengths[i]), len(row)
        ids[i, :p] = torch.tensor(row)
        ids[i, p:p + n] = new[i, :n]
        mask[i, p - 1:p - 1 + n] = True
        completions.append(new[i, :n - int(is_stop[i, n - 1])].tolist() if n else [])
    return Rollout(input_ids=ids.to(device), mask=mask.to(device), completions=completions,
                   prompt_index=[i // group_size for i in range(len(rows))], truncated=~is_stop.any(dim=1))
