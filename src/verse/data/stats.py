"""Dry run over a data config: what the trainer would see, counted (`verse data stats`)."""

import dataclasses
from typing import Any, Dict, Optional

import numpy as np
from tqdm import tqdm

from verse.data.config import DataConfig
from verse.data.loader import DataLoader

PERCENTILES = (50, 90, 99)


def data_stats(cfg: DataConfig, tokenizer: Any, *, max_seq_len: Optional[int] = None, limit: Optional[int] = None,
               seed: int = 0, micro_batch_size: int = 8, progress: bool = True) -> Dict[str, Any]:
    """Read every source once (or the first `limit` examples) through the real pipeline and count.

    Args:
        cfg: the data config.
        tokenizer: the tokenizer.
        max_seq_len: sequence length (default `cfg.max_seq_len`).
        limit: stop after this many examples (None = all).
        seed: mixing and shuffle seed.
        micro_batch_size: rows per batch (only changes the padding of unpacked batches).
        progress: show a tqdm bar.

    Returns:
        Dict[str, Any]: records (kept), bad_records, bad_by_reason, dropped_too_long, dropped_no_loss_tokens,
        tokens, loss_tokens, loss_token_fraction, length_percentiles (tokens before truncation), truncated,
        truncated_tokens_lost, split (texts cut into chunks), rows, padding_fraction (padding or packing
        waste), records_by_source. With `limit`, bad records are those met while reading (whole shuffle blocks).
    """
    loader = DataLoader(dataclasses.replace(cfg, cycle=False), tokenizer, max_seq_len=max_seq_len or cfg.max_seq_len,
                        micro_batch_size=micro_batch_size, seed=seed)
    loader.lengths = []
    loader.limit = limit
    with tqdm(total=limit, unit=" examples", disable=not progress, dynamic_ncols=True) as bar:
        for _ in loader:
            bar.update(loader.counters["examples"] - bar.n)
        bar.update(loader.counters["examples"] - bar.n)
    c = loader.counters
    bad = loader.bad_by_reason
    lengths = np.asarray(loader.lengths or [0])
    return {
        "records": c["records"],
        "bad_records": sum(bad.values()),
        "bad_by_reason": bad,
        "dropped_too_long": c["dropped_too_long"],
        "dropped_no_loss_tokens": c["dropped_no_loss_tokens"],
        "tokens": c["tokens"],
        "loss_tokens": c["loss_tokens"],
        "loss_token_fraction": c["loss_tokens"] / max(c["tokens"], 1),
        "length_percentiles": {**{f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES},
                               "max": int(lengths.max())},
        "truncated": c["truncated"],
        "truncated_tokens_lost": c["truncated_tokens"],
        "split": c["split"],
        "max_seq_len": loader.max_seq_len,
        "pack": cfg.pack,
        "rows": c["rows"],
        "padding_fraction": c["pad_tokens"] / max(c["row_tokens"], 1),
        "records_by_source": {r.src.label: c[f"records/{r.src.label}"] for r in loader.readers},
    }


def format_stats(s: Dict[str, Any]) -> str:
    """The stats as aligned text lines."""
    pct = s["length_percentiles"]
    waste = "packing waste" if s["pack"] else "padding"
    by_source = ", ".join(f"{k}: {v:,}" for k, v in s["records_by_source"].items())
    by_reason = ", ".join(f"{k}: {v:,}" for k, v in s["bad_by_reason"].items())
    lines = [
        f"records            {s['records']:,}  ({by_source})",
        f"bad records        {s['bad_records']:,}" + (f"  ({by_reason})" if by_reason else ""),
        f"dropped            {s['dropped_too_long']:,} too long, {s['dropped_no_loss_tokens']:,} without loss tokens",
        f"tokens             {s['tokens']:,}",
        f"loss tokens        {s['loss_tokens']:,}  ({s['loss_token_fraction']:.1%} of tokens)",
        f"length (tokens)    p50 {pct['p50']:,}  p90 {pct['p90']:,}  p99 {pct['p99']:,}  max {pct['max']:,}",
        f"truncated          {s['truncated']:,} examples at max_seq_len {s['max_seq_len']:,}, "
        f"{s['truncated_tokens_lost']:,} tokens lost",
        f"{waste:<18} {s['padding_fraction']:.1%} of {s['rows']:,} rows x {s['max_seq_len']:,}"
        if s["pack"] else f"{waste:<18} {s['padding_fraction']:.1%} of the tokens in {s['rows']:,} rows",
    ]
    return "\n".join(lines)
