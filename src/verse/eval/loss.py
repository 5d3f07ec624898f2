"""Held-out loss and perplexity on the assistant tokens of a data source."""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from verse.data.packing import IGNORE_INDEX
from verse.train.loss import batch_loss


@dataclass
class LossResult:
    """Mean token cross-entropy over the loss tokens (assistant content and its end token for chat data).

    Attributes:
        loss (float): mean negative log-likelihood per loss token (nats); NaN without loss tokens.
        perplexity (float): exp(loss).
        tokens (int): loss tokens scored.
        sequences (int): rows scored.
    """

    loss: float
    perplexity: float
    tokens: int
    sequences: int


@torch.inference_mode()
def heldout_loss(model, batches, limit: Optional[int] = None, progress: bool = False) -> LossResult:
    """Mean cross-entropy of `model` over batches from `verse.data.build_loader` (labels already shifted).

    Args:
        model (ReasoningLLM): the model.
        batches (Iterable[dict]): `input_ids`, `labels` (-100 = no loss) and, when packed, `position_ids`.
        limit (Optional[int]): most sequences scored; None = all.
        progress (bool): show a tqdm progress bar.

    Returns:
        LossResult: loss, perplexity and counts.
    """
    from tqdm.auto import tqdm

    device = model.embed.weight.device
    total, tokens, sequences = 0.0, 0, 0
    with tqdm(total=limit, desc="loss", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            if limit is not None and sequences >= limit:
                break
            take = batch["input_ids"].size(0) if limit is None else min(batch["input_ids"].size(0), limit - sequences)
            rows = {k: v[:take].to(device) for k, v in batch.items()
                    if k in ("input_ids", "labels", "position_ids") and torch.is_tensor(v)}
            total += batch_loss(model, rows).item()
            tokens += int((rows["labels"] != IGNORE_INDEX).sum())
            sequences += take
            bar.update(take)
    loss = total / tokens if tokens else float("nan")
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 50.0)) if tokens else float("nan"), tokens=tokens,
                      sequences=sequences)
