"""Static, preallocated key/value cache (one per attention layer), friendly to torch.compile."""

from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of every position generated so far, written in place at `input_pos`.

    Args:
        max_batch_size (int): batch rows to allocate.
        max_seq_len (int): positions to allocate.
        n_heads (int): cached heads (KV heads for GQA).
        k_dim (int): key width per head.
        v_dim (int): value width per head.
        dtype (torch.dtype): cache dtype.
        device: where to allocate.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_heads: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("k", torch.zeros(max_batch_size, n_heads, max_seq_len, k_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(max_batch_size, n_heads, max_seq_len, v_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` [B, H, T, D] at positions `input_pos`; return the cache rows of this batch.

        Args:
            input_pos (torch.Tensor): cache positions of the new keys, [T] shared by every row, or [B, T] per row
                (continuous batching: each row is a sequence of its own length).
            k (torch.Tensor): new keys [B, H, T, Dk].
            v (torch.Tensor): new values [B, H, T, Dv].
            kv_len (Optional[int]): return only the first `kv_len` positions (the filled part: decoding then
                attends over the tokens so far, not the whole preallocated cache); None = all.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: views of the keys and values [B, H, kv_len, D].
        """
        B = k.size(0)
        if input_pos.dim() == 2:
            rows = torch.arange(B, device=input_pos.device)[:, None]
            # the two index tensors are split by a slice, so the indexed view is [B, T, H, D]
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        else:
            self.k[:B, :, input_pos] = k
            self.v[:B, :, input_pos] = v
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]

    def rows(self, start: int, length: int) -> "KVCache":
        """A cache over rows `start .. start + length - 1` of this one, sharing its memory (writes go here).

        Args:
            start (int): first row.
            length (int): number of rows.

        Returns:
            KVCache: the view.
        """
        view = KVCache(0, 0, 0, 0, 0, self.k.dtype, self.k.device)
        view.k, view.v = self.k.narrow(0, start, length), self.v.narrow(0, start, length)
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (a sequence moving to another row)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]
