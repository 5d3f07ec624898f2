"""Pure-PyTorch FP8 block quantization (DeepSeek-V3, arXiv:2412.19437 section 3.3): runs on any device.

Activations are scaled per token and 128-wide block of channels, weights per 128x128 block; each scale is
`amax / 448` (448 = largest float8_e4m3fn value), stored in float32 and multiplied back after the GEMM.
One rounding rule everywhere (DeepSeek-V3's): `s = max(amax, 1e-4) / 448` and `y = fp8(x / s)`, both
correctly rounded float32 divisions (never a multiplication by a reciprocal).
The Triton kernels in `verse.fp8.triton_kernels` compute the same functions on CUDA.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

BLOCK_SIZE = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# all-zero blocks would give scale 0 and 0/0 = NaN; DeepSeek-V3's kernel floors amax the same way
AMAX_FLOOR = 1e-4


def block_scale(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale of blocks with absolute maxima `amax`: max(amax, AMAX_FLOOR) / 448, correctly rounded.

    The divisor is a tensor on `amax`'s device, never a Python number: CUDA PyTorch turns division by a CPU scalar
    into multiplication by its rounded reciprocal (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu), which
    differs from the Triton kernel's `div_rn` in the last bit for about half of all values.

    Args:
        amax (torch.Tensor): float32 block maxima of |x|.

    Returns:
        torch.Tensor: the scales (a new tensor).
    """
    return torch.div(amax.clamp_min(AMAX_FLOOR), torch.full((), FP8_MAX, device=amax.device))


def check_scale_shape(weight: torch.Tensor, scale: torch.Tensor, block_size: int = BLOCK_SIZE) -> None:
    """Raise `ValueError` unless `scale` is [ceil(out/block), ceil(in/block)] for the 2-D `weight`."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {list(weight.shape)}")
    expected = [-(-weight.size(0) // block_size), -(-weight.size(1) // block_size)]
    if list(scale.shape) != expected:
        raise ValueError(f"scale shape {list(scale.shape)} does not match weight {list(weight.shape)}: "
                         f"expected {expected} ({block_size}x{block_size} blocks)")


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to float8_e4m3fn with one scale per token and `block_size` channels.

    Args:
        x (torch.Tensor): activations [..., K]; the last block may be partial (K < 128 included), as a weight's.
        block_size (int): channels sharing a scale.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: `y` [..., K] float8_e4m3fn and `s` [..., ceil(K / block_size)] float32,
        with x ~= y * s blockwise.
    """
    K = x.size(-1)
    blocks = F.pad(x.float(), (0, -K % block_size)).unflatten(-1, (-1, block_size))  # zeros leave amax alone
    s = block_scale(blocks.abs().amax(-1))
    y = (blocks / s.unsqueeze(-1)).to(FP8_DTYPE).flatten(-2)[..., :K]
    return y, s


def weight_quant(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to float8_e4m3fn with one scale per `block_size` x `block_size` block.

    Args:
        w (torch.Tensor): weight [M, N]; edge blocks may be partial.
        block_size (int): block edge.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: `y` [M, N] float8_e4m3fn and `s` [ceil(M/b), ceil(N/b)] float32
        (the `weight_scale_inv` of DeepSeek checkpoints: w ~= y * s).
    """
    M, N = w.shape
    padded = F.pad(w.float(), (0, -N % block_size, 0, -M % block_size))
    blocks = padded.unflatten(0, (-1, block_size)).unflatten(-1, (-1, block_size))  # [m, b, n, b]
    s = block_scale(blocks.abs().amax(dim=(1, 3)))
    y = (blocks / s[:, None, :, None]).flatten(0, 1).flatten(-2)[:M, :N].to(FP8_DTYPE)
    return y, s


def weight_dequant(x: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Multiply an FP8 weight by its block scales.

    Args:
        x (torch.Tensor): FP8 weight [M, N].
        s (torch.Tensor): float32 scales [ceil(M/b), ceil(N/b)].
        block_size (int): block edge.
        dtype (Optional[torch.dtype]): result dtype; default `torch.get_default_dtype()`.

    Returns:
        torch.Tensor: [M, N] in `dtype` (products computed in float32, rounded once).
    """
    check_scale_shape(x, s, block_size)
    M, N = x.shape
    scale = s.float().repeat_interleave(block_size, 0)[:M].repeat_interleave(block_size, 1)[:, :N]
    return scale.mul_(x.float()).to(dtype or torch.get_default_dtype())


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             block_size: int = BLOCK_SIZE, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """C = A B^T from FP8 operands and their block scales, accumulated in float32.

    The kernel sums per K-block `(A_blk B_blk^T) * a_s * b_s`; because each scale is constant over its block,
    that equals the float32 product of the dequantized operands, which is what this reference computes.

    Args:
        a (torch.Tensor): FP8 activations [..., K] (from `act_quant`).
        a_s (torch.Tensor): their scales [..., ceil(K / block_size)].
        b (torch.Tensor): FP8 weight [N, K].
        b_s (torch.Tensor): its scales [ceil(N/b), ceil(K/b)].
        block_size (int): block edge.
        dtype (Optional[torch.dtype]): result dtype; default `torch.get_default_dtype()`.

    Returns:
        torch.Tensor: [..., N] in `dtype`.
    """
    K = a.size(-1)
    a_deq = F.pad(a.float(), (0, -K % block_size)).unflatten(-1, (-1, block_size)).mul_(a_s.unsqueeze(-1))
    a_deq = a_deq.flatten(-2)[..., :K]
    b_deq = weight_dequant(b, b_s, block_size, torch.float32)
    return (a_deq @ b_deq.T).to(dtype or torch.get_default_dtype())
