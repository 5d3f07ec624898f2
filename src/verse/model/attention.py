"""Grouped-query attention (Ainslie et al., 2023) through `F.scaled_dot_product_attention`."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from verse.config import ModelArgs
from verse.model.cache import KVCache
from verse.model.linear import Linear, linears
from verse.model.norm import RMSNorm
from verse.model.rope import apply_rope


class Attention(nn.Module):
    """Multi-head attention with `n_kv_heads` shared key/value heads (GQA; MHA when equal, MQA at 1).

    Optionally a bias on the query/key/value projections (`qkv_bias`, Qwen2) and a per-head RMSNorm of queries and
    keys before RoPE (`qk_norm`, Qwen3).

    Args:
        args (ModelArgs): `dim`, `n_heads`, `n_kv_heads`, `head_dim`, `qkv_bias`, `qk_norm`, `norm_eps`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.wo.init_scale = (2 * args.n_layers) ** -0.5  # a residual output projection (GPT-2)
        self.cache: Optional[KVCache] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """Allocate this layer's KV cache (keys and values of `n_kv_heads` heads)."""
        self.cache = KVCache(max_batch_size, max_seq_len, self.n_kv_heads, self.head_dim, self.head_dim,
                             dtype, self.wq.weight.device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend over `x` [B, T, dim].

        Args:
            x (torch.Tensor): input [B, T, dim].
            cos (torch.Tensor): RoPE cosines for these tokens [B or 1, T, head_dim].
            sin (torch.Tensor): RoPE sines [B or 1, T, head_dim].
            mask (Optional[torch.Tensor]): bool mask broadcastable to [B, H, T, S]; None = causal. With the KV
                cache, S (the mask's width) is how many cached positions are attended.
            input_pos (Optional[torch.Tensor]): cache positions of these tokens [T] (generation only).

        Returns:
            torch.Tensor: [B, T, dim].
        """
        B, T, _ = x.shape
        q, k, v = linears(x, self.wq, self.wk, self.wv)
        # heads counted from the shapes (-1): under tensor parallelism a rank holds 1/tp of them
        q = q.view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        if self.q_norm is not None:  # Qwen3: each head's query and key normalised over D
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H or Hkv, T, D]
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None and input_pos is not None:
            k, v = self.cache.update(input_pos, k, v, None if mask is None else mask.size(-1))
        if T == 1:
            y = decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=k.size(1) != q.size(1))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per row, written out: on CPU the fused SDPA kernel costs more to
    launch than this work (one token against the cache), and `torch.compile` fuses these few ops.

    Args:
        q (torch.Tensor): [B, H, 1, D].
        k (torch.Tensor): [B, Hkv, S, D] (H a multiple of Hkv: each key head serves H / Hkv query heads).
        v (torch.Tensor): [B, Hkv, S, D].
        mask (Optional[torch.Tensor]): bool, broadcastable to [B, 1, 1, S] (True = attend); None = all S keys.

    Returns:
        torch.Tensor: [B, H, 1, D].
    """
    B, H, _, D = q.shape
    q = q.view(B, k.size(1), H // k.size(1), 1, D)  # the query heads of each key head, side by side
    # products summed by hand rather than batched matmuls of one row: inductor fuses them into one loop
    scores = (q * k.unsqueeze(2)).sum(-1, dtype=torch.float32) * D ** -0.5  # [B, Hkv, H/Hkv, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1, 1, 1, mask.size(-1)), float("-inf"))
    y = (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(2)).sum(-2)  # [B, Hkv, H/Hkv, D]
    return y.to(v.dtype).view(B, H, 1, D)
