"""Rendered examples with the trained tokens highlighted (`verse data preview`)."""

import dataclasses
from itertools import islice
from typing import Any, List, Optional

import numpy as np

from verse.data.config import DataConfig
from verse.data.encode import Encoded, encode_example
from verse.data.loader import DataLoader, MixedStream
from verse.terminal import escape_controls

TRAINED_ON, TRAINED_OFF = "\033[1;32m", "\033[0m"  # bold green in a terminal
MARK_ON, MARK_OFF = "[[", "]]"


def preview_examples(cfg: DataConfig, tokenizer: Any, *, n: int = 3, max_seq_len: Optional[int] = None,
                     seed: int = 0) -> List[Encoded]:
    """The first `n` examples of the mix, tokenized exactly as for training.

    Args:
        cfg: the data config.
        tokenizer: the tokenizer.
        n: number of examples.
        max_seq_len: truncation length (default `cfg.max_seq_len`).
        seed: mixing and shuffle seed.

    Returns:
        List[Encoded]: the examples (`dropped` set on those the trainer would skip).
    """
    loader = DataLoader(dataclasses.replace(cfg, cycle=False), tokenizer, max_seq_len=max_seq_len or cfg.max_seq_len,
                        micro_batch_size=1, seed=seed)
    stream = MixedStream(loader.readers, loader.weights, seed)
    return [encode_example(tokenizer, example, max_seq_len=loader.max_seq_len, train_on=cfg.train_on,
                           truncation=cfg.truncation, source=i, where=where, enable_thinking=cfg.enable_thinking)
            for i, example, where in islice(stream, n)]


def render(tokenizer: Any, enc: Encoded, color: bool = False) -> str:
    """Decode an example with its trained tokens (the label-bearing ones) highlighted.

    Args:
        tokenizer: the tokenizer that produced it.
        enc: the example.
        color: for a terminal: ANSI colour instead of `[[...]]` markers, and the data's own control characters
            escaped (`verse.terminal.escape_controls`) so that they show instead of acting on the terminal.

    Returns:
        str: the rendered text.
    """
    on, off = (TRAINED_ON, TRAINED_OFF) if color else (MARK_ON, MARK_OFF)
    trained = enc.mask.copy()
    trained[0] = False  # the first token is never a target
    # runs of equal `trained`: boundaries where the flag changes
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    out = []
    for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(trained)]):
        text = tokenizer.decode(enc.ids[start:end].tolist())
        text = escape_controls(text) if color else text
        out.append(f"{on}{text}{off}" if trained[start] else text)
    return "".join(out)
