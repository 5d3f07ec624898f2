"""Chunked cross-entropy over `model.hidden_states` + `model.head`: full fp32 logits never exist.

For a 200k vocabulary the logits of one 2048-token sequence are 1.6 GB in fp32 (and as much again for their
gradient). Here the head and the loss run on `chunk_size` tokens at a time, under activation checkpointing when
there is more than one chunk, so only one chunk of logits is alive in forward or backward; positions without a
label (-100) add nothing (on CPU they are dropped first).
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from verse.data.packing import IGNORE_INDEX
from verse.model.masks import document_mask


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits split by vocabulary over tensor-parallel ranks (a DTensor `Shard(-1)`, the
    output of `verse.train.parallelize`'s head), computed by `torch.distributed.tensor.parallel.loss_parallel`:
    each rank exchanges only per-token maxima, sums and target logits, never the full logits.

    `loss_parallel` must be active for the backward too, which the training loop's `backward()` runs elsewhere:
    this function's own backward enters it and recomputes the (cheap) softmax from the logits it saved.
    Returns a plain scalar (the same on every tp rank).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor.parallel import loss_parallel

        ctx.save_for_backward(logits, labels)
        with loss_parallel():
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX).to_local()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        from torch.distributed.tensor.parallel import loss_parallel

        logits, labels = ctx.saved_tensors
        with torch.enable_grad(), loss_parallel():
            logits = logits.detach().requires_grad_()
            loss = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX).to_local()
            return torch.autograd.grad(loss, logits, grad)[0], None


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if hasattr(logits, "placements"):  # split by vocabulary over the tp ranks
        return VocabParallelCrossEntropy.apply(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 4096,
                          ) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `labels`, one chunk of tokens at a time.

    Args:
        hidden (torch.Tensor): final hidden states [B, T, dim].
        labels (torch.Tensor): targets [B, T], already shifted; -100 = no loss.
        head (nn.Module): the output projection (dim -> vocab).
        chunk_size (int): tokens per chunk.

    Returns:
        torch.Tensor: scalar fp32 SUM of the losses (divide by the token count of the whole accumulation
        step to normalise over tokens rather than micro-batches).
    """
    hidden, labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    if hidden.device.type == "cpu":
        # selecting the labelled positions skips the head on the rest; on an accelerator the selection's size would
        # make the host wait for the device, so there cross_entropy ignores them instead (the same sum)
        keep = labels != IGNORE_INDEX
        hidden, labels = hidden[keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    # one chunk: the loss is the last op of the forward and the first of the backward, so its logits are needed at
    # once whether kept or recomputed (the same peak), and recomputing them would only cost a head forward more
    recompute = torch.is_grad_enabled() and hidden.size(0) > chunk_size
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        if recompute:
            # recompute this chunk's logits in backward instead of keeping every chunk's until then
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def batch_loss(model: nn.Module, batch: Dict[str, torch.Tensor], chunk_size: int = 4096,
               aux_loss_scale: float = 1.0) -> torch.Tensor:
    """Summed token loss of one batch: the training loss, training's `eval_every` and `verse eval`'s held-out loss.

    Args:
        model (nn.Module): a `ReasoningLLM`.
        batch (Dict[str, torch.Tensor]): `input_ids`, shifted `labels` (-100 = no loss) and, when packed,
            `position_ids` (then each document attends only to itself).
        chunk_size (int): tokens per chunk of the cross-entropy.
        aux_loss_scale (float): weight of the MoE balance loss (training) in the gradient: a trainer passes
            1 / (micro-batches x data-parallel ranks), so that it is a mean over the step like the token loss.

    Returns:
        torch.Tensor: the sum of the token cross-entropies (divide by the loss tokens for the mean).
    """
    position_ids = batch.get("position_ids")
    mask = document_mask(position_ids) if position_ids is not None else None
    hidden = model.hidden_states(batch["input_ids"], position_ids=position_ids, attn_mask=mask,
                                 aux_loss_scale=aux_loss_scale)
    return chunked_cross_entropy(hidden, batch["labels"], model.head, chunk_size)
