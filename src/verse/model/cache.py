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
        """Write `k`, `v` [B, H, T, D] at positions `input_pos` [T]; return the cache rows of this batch.

        Args:
            input_pos (torch.Tensor): cache positions of the new keys [T].
            k (torch.Tensor): new keys [B, H, T, Dk].
            v (torch.Tensor): new values [B, H, T, Dv].
            kv_len (Optional[int]): return only the first `kv_len` positions (the filled part: decoding then
                attends over the tokens so far, not the whole preallocated cache); None = all.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: views of the keys and values [B, H, kv_len, D].
        """
        B = k.size(0)
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]
