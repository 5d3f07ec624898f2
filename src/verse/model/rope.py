"""Rotary position embeddings (Su et al., 2021) with linear, Llama-3 and YaRN context scaling."""

import math
from typing import Optional, Tuple

import torch

from verse.config import ModelArgs


def rope_frequencies(args: ModelArgs, dim: int) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/dim), rescaled for the configured context extension.

    Args:
        args (ModelArgs): `rope_theta`, `rope_scaling` and its parameters.
        dim (int): number of rotated channels (head_dim, or qk_rope_head_dim for MLA).

    Returns:
        torch.Tensor: float32 [dim // 2].
    """
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_scaling == "linear":
        inv_freq = inv_freq / args.rope_factor
    elif args.rope_scaling == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = args.original_seq_len / args.low_freq_factor
        high_wavelen = args.original_seq_len / args.high_freq_factor
        smooth = (args.original_seq_len / wavelen - args.low_freq_factor) / (args.high_freq_factor - args.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / args.rope_factor,
                               torch.where(wavelen < high_wavelen, inv_freq, smoothed))
    elif args.rope_scaling == "yarn":
        # YaRN (Peng et al., 2023), eq. 13-15: blend interpolated and extrapolated frequencies per dimension.
        def correction_dim(n_rot: float) -> float:
            return dim * math.log(args.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(args.rope_theta))

        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
        extrapolate = 1 - ramp.clamp(0, 1)
        inv_freq = inv_freq / args.rope_factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_length(needed: int, max_seq_len: int) -> int:
    """Rows of a RoPE table that serves `needed` positions: the next power of two, capped at `max_seq_len` (never
    below `needed`), so that tables grown on demand grow a few times per run."""
    return max(needed, min(max_seq_len, 1 << max(needed - 1, 0).bit_length()))


def rope_cos_sin(args: ModelArgs, dim: int, device: torch.device | str | None = None,
                 length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables for positions 0..length-1, in the rotate-half layout of Llama.

    Args:
        args (ModelArgs): RoPE configuration.
        dim (int): rotated channels.
        device (torch.device | str | None): where the tables go.
        length (Optional[int]): positions; default `args.max_seq_len`.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: float32 cos and sin, each [length, dim].
    """
    inv_freq = rope_frequencies(args, dim).to(device)
    positions = torch.arange(args.max_seq_len if length is None else length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if args.rope_scaling == "yarn":
        # YaRN scales cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim) (DeepSeek-V2 convention).
        attn_factor = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)
        cos, sin = cos * attn_factor, sin * attn_factor
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by position; `cos`/`sin` are [B or 1, T, D]."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin
