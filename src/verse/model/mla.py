"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1), as in DeepSeek-V3's inference model.

Keys and values are compressed into a `kv_lora_rank` latent (plus one shared `qk_rope_head_dim` RoPE key). Two
equivalent ways to run it:

- "naive": expand the latent with `wkv_b` to per-head keys and values and cache those (large cache);
- "absorb": fold the key half of `wkv_b` into the queries and its value half into the output, so attention runs
  over the latent itself (multi-query attention with one shared head) and only the latent and the RoPE key are
  cached.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from verse.config import ModelArgs
from verse.model.cache import KVCache
from verse.model.linear import Linear
from verse.model.norm import RMSNorm
from verse.model.rope import apply_rope, yarn_mscale

# DeepSeek's q/kv latent norms use a fixed epsilon, independent of `norm_eps` (as transformers does)
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(args: ModelArgs) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on (DeepSeek-V2 eq. in 2.1.3).

    Args:
        args (ModelArgs): MLA head sizes and RoPE scaling.

    Returns:
        float: the softmax scale.
    """
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if args.rope_scaling == "yarn" and args.mscale_all_dim:
        scale *= yarn_mscale(args.rope_factor, args.mscale_all_dim) ** 2
    return scale


def cache_bytes_per_token(args: ModelArgs, attn_impl: Optional[str] = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token occupies in the KV cache of the whole model.

    Args:
        args (ModelArgs): model configuration (GQA or MLA).
        attn_impl (Optional[str]): MLA "naive" or "absorb"; default `args.attn_impl`.
        dtype (torch.dtype): cache dtype.

    Returns:
        int: bytes per cached token, summed over layers.
    """
    attn_impl = attn_impl or args.attn_impl
    if args.attention == "gqa":
        per_layer = 2 * args.n_kv_heads * args.head_dim
    elif attn_impl == "naive":
        per_layer = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
    else:
        per_layer = args.kv_lora_rank + args.qk_rope_head_dim
    return per_layer * args.n_layers * torch.empty(0, dtype=dtype).element_size()


def generation_bytes_per_row(args: ModelArgs, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Memory one generated sequence holds while decoding: its KV cache of `seq_len` positions and one step's
    float32 logits and probabilities (what the GRPO plan and the serving engine's `--slots auto` count per row).

    Args:
        args (ModelArgs): model configuration.
        seq_len (int): cached positions (prompt + completion).
        dtype (torch.dtype): cache dtype.

    Returns:
        int: bytes.
    """
    return seq_len * cache_bytes_per_token(args, dtype=dtype) + args.vocab_size * 4 * 2


def pads_values(device: torch.device, qk_head_dim: int, v_head_dim: int) -> bool:
    """Whether naive MLA attention pads its values to the query/key head width: on CPU when they are narrower, so
    that SDPA's flash kernel (which needs equal widths there) runs instead of its math kernel.

    Args:
        device (torch.device): where attention runs.
        qk_head_dim (int): query/key head width (nope + rope).
        v_head_dim (int): value head width.

    Returns:
        bool: pad.
    """
    return device.type == "cpu" and v_head_dim < qk_head_dim


class MLA(nn.Module):
    """Multi-head Latent Attention with low-rank query (`q_lora_rank` > 0) and key/value compression.

    Weight names follow DeepSeek-V3's reference code: `wq` or `wq_a`/`q_norm`/`wq_b`, `wkv_a`, `kv_norm`, `wkv_b`,
    `wo`. The rotary channels are stored in rotate-half order (the HF adapter permutes interleaved checkpoints).

    Args:
        args (ModelArgs): `dim`, `n_heads`, `q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
            `v_head_dim`, `attn_impl` and the YaRN fields for the softmax scale.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.attn_impl = args.attn_impl
        self.softmax_scale = mla_softmax_scale(args)
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, self.n_heads * self.qk_head_dim)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.wo = Linear(self.n_heads * self.v_head_dim, args.dim)
        self.wo.init_scale = (2 * args.n_layers) ** -0.5  # a residual output projection (GPT-2)
        self.cache: Optional[KVCache] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """Allocate this layer's cache: full per-head K/V ("naive") or the latent + RoPE key ("absorb").

        The absorb cache keeps [kv_latent, k_rope] as the keys of a single head; the values are its first
        `kv_lora_rank` channels, so no separate value tensor is stored.
        """
        device = self.wkv_a.weight.device
        if self.attn_impl == "naive":
            self.cache = KVCache(max_batch_size, max_seq_len, self.n_heads, self.qk_head_dim, self.v_head_dim,
                                 dtype, device)
        else:
            self.cache = KVCache(max_batch_size, max_seq_len, 1, self.kv_lora_rank + self.qk_rope_head_dim, 0,
                                 dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend over `x` [B, T, dim].

        Args:
            x (torch.Tensor): input [B, T, dim].
            cos (torch.Tensor): RoPE cosines [B or 1, T, qk_rope_head_dim].
            sin (torch.Tensor): RoPE sines [B or 1, T, qk_rope_head_dim].
            mask (Optional[torch.Tensor]): bool mask broadcastable to [B, H, T, S]; None = causal.
            input_pos (Optional[torch.Tensor]): cache positions of these tokens [T] (generation only).

        Returns:
            torch.Tensor: [B, T, dim].
        """
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        # heads counted from the shapes (-1): under tensor parallelism a rank holds n_heads / tp of them
        q_nope, q_rope = q.view(B, T, -1, self.qk_head_dim).transpose(1, 2).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [B, 1, T, rope]: one RoPE key shared by all heads
        use_cache = self.cache is not None and input_pos is not None
        if self.attn_impl == "naive":
            kv = self.wkv_b(kv).view(B, T, q_nope.size(1), -1).transpose(1, 2)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_rope.expand(-1, q_nope.size(1), -1, -1)), dim=-1)
            if use_cache:
                k, v = self.cache.update(input_pos, k, v, None if mask is None else mask.size(-1))
            q = torch.cat((q_nope, q_rope), dim=-1)
            if pads_values(x.device, self.qk_head_dim, self.v_head_dim) and not use_cache:
                # CPU's flash kernel needs values as wide as keys, else SDPA runs its math kernel (softmax of
                # [T, T] per head, slower and kept for backward): zero channels added to v leave y's first v
                # channels unchanged (as FlashAttention ports of MLA pad)
                y = F.scaled_dot_product_attention(q, k, F.pad(v, (0, self.qk_head_dim - self.v_head_dim)),
                                                   attn_mask=mask, is_causal=mask is None,
                                                   scale=self.softmax_scale)[..., :self.v_head_dim]
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   scale=self.softmax_scale)
        else:
            wkv_b = self.wkv_b.dequantized_weight(x.dtype).view(-1, self.qk_nope_head_dim + self.v_head_dim,
                                                                self.kv_lora_rank)
            # q_nope . (W_uk c) = (W_uk^T q_nope) . c: queries move into the latent space (DeepSeek-V2 2.1.2)
            q_latent = q_nope @ wkv_b[:, :self.qk_nope_head_dim]  # [B, H, T, kv_lora_rank]
            k = torch.cat((kv.unsqueeze(1), k_rope), dim=-1)  # [B, 1, T, kv_lora_rank + rope]
            if use_cache:
                k, _ = self.cache.update(input_pos, k, k[..., :0], None if mask is None else mask.size(-1))
            q = torch.cat((q_latent, q_rope), dim=-1)
            if T == 1:
                # decoding: the heads become the query rows of one head sharing the cached latent (no key copies)
                y = F.scaled_dot_product_attention(q.transpose(1, 2), k, k[..., :self.kv_lora_rank], attn_mask=mask,
                                                   scale=self.softmax_scale).transpose(1, 2)
            else:
                y = F.scaled_dot_product_attention(q, k, k[..., :self.kv_lora_rank], attn_mask=mask,
                                                   is_causal=mask is None, scale=self.softmax_scale, enable_gqa=True)
            y = y @ wkv_b[:, self.qk_nope_head_dim:].transpose(-1, -2)  # latent -> per-head values (W_uv)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
