"""FP8 block quantization as in DeepSeek-V3: `act_quant`, `weight_quant`, `weight_dequant`, `fp8_gemm`.

`act_quant`, `weight_dequant` and `fp8_gemm` run Triton kernels when their input lives on a CUDA GPU with FP8
support (compute capability 8.9+) and Triton is installed, and the pure-PyTorch reference everywhere else;
`weight_quant` (offline, when making FP8 weights) is PyTorch everywhere.
"""

import functools
import importlib.util
from typing import Optional, Tuple

import torch

from verse.fp8 import reference
from verse.fp8.reference import BLOCK_SIZE, FP8_DTYPE, FP8_MAX, check_scale_shape, weight_quant


@functools.lru_cache(maxsize=None)
def _triton_ok(device_index: int) -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device_index) >= (8, 9)


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x`'s device."""
    return x.is_cuda and _triton_ok(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _impl(x: torch.Tensor):
    if triton_available(x):
        from verse.fp8 import triton_kernels

        return triton_kernels
    return reference


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-`block_size`-channel FP8 quantization (scale = amax / 448).

    Args:
        x (torch.Tensor): activations [..., K]; the last block may be partial (e.g. K = 64).
        block_size (int): channels sharing a scale.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: float8_e4m3fn values [..., K] and float32 scales
        [..., ceil(K / block_size)].
    """
    return _impl(x).act_quant(x, block_size)


def weight_dequant(x: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """FP8 weight [M, N] times its [ceil(M/b), ceil(N/b)] block scales, in `dtype` (default: torch default).

    Args:
        x (torch.Tensor): FP8 weight.
        s (torch.Tensor): float32 block scales (`weight_scale_inv`).
        block_size (int): block edge.
        dtype (Optional[torch.dtype]): result dtype.

    Returns:
        torch.Tensor: the dequantized weight [M, N].
    """
    return _impl(x).weight_dequant(x, s, block_size, dtype)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             block_size: int = BLOCK_SIZE, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A B^T for FP8 activations `a` [..., K] (scales `a_s`) and an FP8 weight `b` [N, K] (scales `b_s`).

    Args:
        a (torch.Tensor): from `act_quant`.
        a_s (torch.Tensor): from `act_quant`.
        b (torch.Tensor): FP8 weight.
        b_s (torch.Tensor): its block scales.
        block_size (int): block edge.
        dtype (Optional[torch.dtype]): result dtype (default: torch default).

    Returns:
        torch.Tensor: [..., N], accumulated in float32.
    """
    return _impl(a).fp8_gemm(a, a_s, b, b_s, block_size, dtype)


__all__ = ["BLOCK_SIZE", "FP8_DTYPE", "FP8_MAX", "act_quant", "check_scale_shape", "fp8_gemm", "triton_available",
           "weight_dequant", "weight_quant"]
