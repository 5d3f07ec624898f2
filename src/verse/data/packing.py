"""Rows of a batch: examples packed into fixed-length rows (position ids restart per example) or padded.

Labels come out already shifted: `labels[t]` is the target of the logits at position t, i.e. the next
token when it is a training target, else -100. The last token of every example has label -100, so no
example ever learns to predict the first token of the next one in a packed row.
"""

from typing import Dict, List

import numpy as np
import torch

from verse.data.encode import Encoded

IGNORE_INDEX = -100  # the label of positions without loss (torch cross_entropy's default ignore_index)


def shifted_labels(enc: Encoded) -> np.ndarray:
    """Labels of one example: `ids[t + 1]` where `mask[t + 1]`, else -100; the last position is -100."""
    labels = np.full(len(enc.ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(enc.mask[1:], enc.ids[1:], IGNORE_INDEX)
    return labels


def packed_row(examples: List[Encoded], length: int, pad_id: int) -> Dict[str, np.ndarray]:
    """Concatenate examples into one row of `length` tokens; the padding tail is its own document.

    Args:
        examples: examples whose lengths sum to at most `length`.
        length: row length.
        pad_id: token id of the padding.

    Returns:
        Dict[str, np.ndarray]: input_ids, labels, position_ids, each int64 [length].
    """
    used = sum(len(e.ids) for e in examples)
    pad = length - used
    ids = np.concatenate([e.ids for e in examples] + [np.full(pad, pad_id, dtype=np.int64)])
    labels = np.concatenate([shifted_labels(e) for e in examples] + [np.full(pad, IGNORE_INDEX, dtype=np.int64)])
    lengths = [len(e.ids) for e in examples] + ([pad] if pad else [])
    # positions restart at 0 for every document: arange(length) minus each document's start offset
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    return {"input_ids": ids, "labels": labels, "position_ids": np.arange(length, dtype=np.int64) - starts}


def padded_row(example: Encoded, length: int, pad_id: int) -> Dict[str, np.ndarray]:
    """One example right-padded to `length` tokens (labels -100 on the padding)."""
    pad = length - len(example.ids)
    return {"input_ids": np.concatenate([example.ids, np.full(pad, pad_id, dtype=np.int64)]),
            "labels": np.concatenate([shifted_labels(example), np.full(pad, IGNORE_INDEX, dtype=np.int64)])}


def collate(rows: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """Stack equal-length rows into LongTensors [B, T]."""
    return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}
