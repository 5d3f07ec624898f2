"""Held-out loss and perplexity on the assistant tokens of a data source."""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from verse.data.packing import IGNORE_INDEX


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

    from verse.model.masks import document_mask

    device = model.embed.weight.device
    total, tokens, sequences = 0.0, 0, 0
    with tqdm(total=limit, desc="loss", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            if limit is not None and sequences >= limit:
                break
            take = batch["input_ids"].size(0) if limit is None else min(batch["input_ids"].size(0), limit - sequences)
            input_ids, labels = batch["input_ids"][:take].to(device), batch["labels"][:take].to(device)
            position_ids = batch.get("position_ids")
            mask = None
            if position_ids is not None:
                position_ids = position_ids[:take].to(device)
                mask = document_mask(position_ids)
            keep = labels != IGNORE_INDEX
            hidden = model.hidden_states(input_ids, position_ids=position_ids, attn_mask=mask)[keep]
            logits = model.head(hidden).float()
            total += F.cross_entropy(logits, labels[keep], reduction="sum").item()
            tokens += int(keep.sum())
            sequences += take
            bar.update(take)
    loss = total / tokens if tokens else float("nan")
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 50.0)) if tokens else float("nan"), tokens=tokens,
                      sequences=sequences)
