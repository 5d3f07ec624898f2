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
        elif mask is None and q.device.type == "cpu" and self.cache is None:
            # training and plain forwards on CPU: blocked causal attention, faster there than SDPA's flash kernel
            return self.wo(blocked_causal_attention(q, k, v))  # its output is wo's input [B, T, H * D]
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


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`BlockedCausalAttention` with autocast's casting: inside an autocast region q, k and v are cast to its dtype
    first, as SDPA's are (e.g. Qwen3's float32 q/k-norm outputs), and the blocks run in that dtype.

    Args:
        q (torch.Tensor): queries [B, H, T, D].
        k (torch.Tensor): keys [B, Hkv, T, D].
        v (torch.Tensor): values [B, Hkv, T, D].

    Returns:
        torch.Tensor: [B, T, H * D].
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(device, enabled=False):
        return BlockedCausalAttention.apply(q, k, v)


class BlockedCausalAttention(torch.autograd.Function):
    """Causal attention computed a block of query positions at a time (FlashAttention-2, Dao 2023, Alg. 1-2, with a
    block's whole key range in one matmul), for CPU.

    Block i's queries meet keys 0..end of block i only (the masked half of the scores is never computed); the
    backward recomputes each block's probabilities from the saved log-sum-exp, so what is kept for backward is what
    SDPA's flash kernel keeps (q, k, v, the output, its log-sum-exp). A key head's G query heads are the rows of one
    matmul (GQA without repeated keys). Matmuls run in the inputs' dtype, the softmax in float32. SmolLM2-135M's
    shapes on a 2-core EPYC (4 x 512 tokens, 9 query and 3 key heads of 64, bf16): 41 ms forward and backward per
    layer, CPU's SDPA flash kernel 56 ms.

    Args (of `apply`):
        q (torch.Tensor): queries [B, H, T, D].
        k (torch.Tensor): keys [B, Hkv, T, D] (H a multiple of Hkv).
        v (torch.Tensor): values [B, Hkv, T, D].

    Returns:
        torch.Tensor: [B, T, H * D], the heads side by side (the output projection's input).
    """

    BLOCK = 64  # query positions per block (64-128 measured alike; 256 slower)

    @staticmethod
    def _rows(x: torch.Tensor, n_kv: int, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of per-head `x` [B, H, T, D] as rows [B, Hkv, (end - start) * G, D], by position."""
        B, H, _, D = x.shape
        return x.view(B, n_kv, H // n_kv, -1, D)[:, :, :, start:end].transpose(2, 3).reshape(B, n_kv, -1, D)

    @staticmethod
    def _scores(rows: torch.Tensor, k: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Scaled float32 scores of block rows against keys 0..end-1, the future masked: [B, Hkv, rows, end]."""
        s = torch.matmul(rows, k[:, :, :end].transpose(-1, -2)).float().mul_(rows.size(-1) ** -0.5)
        n = end - start
        future = torch.ones(n, n, dtype=torch.bool, device=k.device).triu_(1)
        s[..., start:end].masked_fill_(future.repeat_interleave(rows.size(2) // n, 0), float("-inf"))
        return s  # only the diagonal block has future keys

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        n_kv = k.size(1)
        out = q.new_empty(B, T, H * D)
        out_rows = out.view(B, T, n_kv, H // n_kv, D).transpose(1, 2)  # [B, Hkv, T, G, D]
        lse = torch.empty(B, n_kv, T, H // n_kv, 1, dtype=torch.float32, device=q.device)
        for start in range(0, T, BlockedCausalAttention.BLOCK):
            end = min(start + BlockedCausalAttention.BLOCK, T)
            s = BlockedCausalAttention._scores(BlockedCausalAttention._rows(q, n_kv, start, end), k, start, end)
            m = s.logsumexp(-1, keepdim=True)  # [B, Hkv, rows, 1]
            y = s.sub_(m).exp_().to(v.dtype) @ v[:, :, :end]  # [B, Hkv, rows, D]
            out_rows[:, :, start:end] = y.view(B, n_kv, end - start, -1, D)
            lse[:, :, start:end] = m.view(B, n_kv, end - start, -1, 1)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        n_kv = k.size(1)
        do_rows = dout.reshape(B, T, n_kv, H // n_kv, D).transpose(1, 2)  # [B, Hkv, T, G, D]
        # rowsum(dO * O) = sum_j P_ij dP_ij, the softmax backward's subtrahend
        delta = (do_rows.float() * out.view(B, T, n_kv, H // n_kv, D).transpose(1, 2).float()).sum(-1, keepdim=True)
        dq = torch.empty_like(q)
        dq_rows = dq.view(B, n_kv, H // n_kv, T, D)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for start in range(0, T, BlockedCausalAttention.BLOCK):
            end = min(start + BlockedCausalAttention.BLOCK, T)
            n = end - start
            rows = BlockedCausalAttention._rows(q, n_kv, start, end)
            p = BlockedCausalAttention._scores(rows, k, start, end).sub_(lse[:, :, start:end].reshape(B, n_kv, -1, 1))
            p = p.exp_()  # the block's probabilities [B, Hkv, rows, end]
            do = do_rows[:, :, start:end].reshape(B, n_kv, -1, D)
            dv[:, :, :end] += p.to(v.dtype).transpose(-1, -2) @ do
            dp = torch.matmul(do, v[:, :, :end].transpose(-1, -2)).float()
            ds = p.mul_(dp.sub_(delta[:, :, start:end].reshape(B, n_kv, -1, 1)))  # dS = P (dP - delta)
            ds = ds.mul_(D ** -0.5).to(q.dtype)
            dq_rows[:, :, :, start:end] = (ds @ k[:, :, :end]).view(B, n_kv, n, -1, D).transpose(2, 3)
            dk[:, :, :end] += ds.transpose(-1, -2) @ rows
        return dq, dk.to(k.dtype), dv.to(v.dtype)
