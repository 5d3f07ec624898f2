"""Boolean attention masks (True = may attend) for SDPA: causal, sliding-window and document-aware."""

from typing import Optional

import torch


def causal_mask(q_pos: torch.Tensor, kv_len: int, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Mask letting the query at position p see keys 0..p (or the last `sliding_window` of them).

    Args:
        q_pos (torch.Tensor): absolute positions of the queries, [T] or [B, T].
        kv_len (int): number of key positions (0..kv_len-1).
        sliding_window (Optional[int]): attend to at most this many positions back (Mistral).

    Returns:
        torch.Tensor: bool [T, kv_len] or [B, 1, T, kv_len].
    """
    kv_pos = torch.arange(kv_len, device=q_pos.device)
    q = q_pos.unsqueeze(-1)
    mask = kv_pos <= q
    if sliding_window is not None:
        mask &= kv_pos > q - sliding_window
    return mask if q_pos.dim() == 1 else mask.unsqueeze(1)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask for packed sequences: a token sees only earlier tokens of its own document.

    A new document starts wherever `position_ids` resets to 0.

    Args:
        position_ids (torch.Tensor): [B, T] positions that restart at 0 for each packed document.

    Returns:
        torch.Tensor: bool [B, 1, T, T].
    """
    doc = torch.cumsum(position_ids == 0, dim=-1)
    T = position_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril_()
    return (causal & (doc.unsqueeze(-1) == doc.unsqueeze(-2))).unsqueeze(1)
