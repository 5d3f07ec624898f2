"""Triton kernels for FP8 block quantization on CUDA (after DeepSeek-V3 inference/kernel.py).

Same functions and numerics as `verse.fp8.reference`: `s = max(amax, 1e-4) / 448` and `y = x / s` are correctly
rounded divisions (`div_rn`; Triton's plain `/` is approximate on CUDA), as the reference's tensor divisions are, so
quantization matches it bit for bit. Imported only when Triton and a GPU (or `TRITON_INTERPRET=1`) are present.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from verse.fp8.reference import AMAX_FLOOR, BLOCK_SIZE, FP8_DTYPE, FP8_MAX, check_scale_shape

# kernels may only read globals that are compile-time constants
AMAX_FLOOR_C = tl.constexpr(AMAX_FLOOR)
FP8_MAX_C = tl.constexpr(FP8_MAX)


@triton.jit
def act_quant_kernel(x_ptr, y_ptr, s_ptr, K, BLOCK_SIZE: tl.constexpr):
    """One program quantizes one block of `BLOCK_SIZE` channels of one token (the last block of a row may be
    partial: masked, as zeros, which leave the block's maximum alone)."""
    row = tl.program_id(axis=0)
    block = tl.program_id(axis=1)
    cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < K
    offs = row.to(tl.int64) * K + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x)), AMAX_FLOOR_C), FP8_MAX_C)
    y = tl.math.div_rn(x, s).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(s_ptr + row.to(tl.int64) * tl.num_programs(axis=1) + block, s)


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton `act_quant`; see `verse.fp8.reference.act_quant`."""
    x = x.contiguous()
    K = x.size(-1)
    y = torch.empty_like(x, dtype=FP8_DTYPE)
    s = x.new_empty(*x.shape[:-1], triton.cdiv(K, block_size), dtype=torch.float32)
    act_quant_kernel[(x.numel() // K, triton.cdiv(K, block_size))](x, y, s, K, BLOCK_SIZE=block_size)
    return y, s


@triton.jit
def weight_dequant_kernel(x_ptr, s_ptr, y_ptr, M, N, BLOCK_SIZE: tl.constexpr):
    """One program scales one `BLOCK_SIZE` x `BLOCK_SIZE` block (masked at the edges)."""
    pid_m = tl.program_id(axis=0)
    pid_n = tl.program_id(axis=1)
    n_blocks = tl.cdiv(N, BLOCK_SIZE)
    offs_m = pid_m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_n = pid_n * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + pid_m * n_blocks + pid_n)
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(x: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton `weight_dequant`; see `verse.fp8.reference.weight_dequant`."""
    check_scale_shape(x, s, block_size)
    x, s = x.contiguous(), s.float().contiguous()
    M, N = x.shape
    y = torch.empty_like(x, dtype=dtype or torch.get_default_dtype())
    grid = (triton.cdiv(M, block_size), triton.cdiv(N, block_size))
    weight_dequant_kernel[grid](x, s, y, M, N, BLOCK_SIZE=block_size)
    return y


fp8_gemm_configs = [
    triton.Config({"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n}, num_stages=num_stages, num_warps=8)
    for block_m in (16, 32, 64) for block_n in (32, 64, 128) for num_stages in (3, 4, 5, 6)
]


@triton.autotune(configs=fp8_gemm_configs, key=["N", "K"])
@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N: tl.constexpr, K: tl.constexpr,
                    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """C[M, N] = A[M, K] B[N, K]^T with A's per-(row, K-block) and B's per-(128-row block, K-block) scales.

    Each K-block's FP8 tensor-core product is scaled and added to a float32 accumulator, the "promotion to
    CUDA cores" every 128 elements that DeepSeek-V3 (section 3.3.2) uses to bound accumulation error.
    """
    pid_m = tl.program_id(axis=0)
    pid_n = tl.program_id(axis=1)
    k_blocks = tl.cdiv(K, BLOCK_SIZE_K)
    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    a_s_ptrs = a_s_ptr + offs_m * k_blocks
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_SIZE_K) * k_blocks
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for i in range(k_blocks):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - i * BLOCK_SIZE_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - i * BLOCK_SIZE_K, other=0.0)
        a_s = tl.load(a_s_ptrs)
        b_s = tl.load(b_s_ptrs)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_SIZE_K
        b_ptrs += BLOCK_SIZE_K
        a_s_ptrs += 1
        b_s_ptrs += 1
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             block_size: int = BLOCK_SIZE, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton `fp8_gemm`; see `verse.fp8.reference.fp8_gemm`."""
    check_scale_shape(b, b_s, block_size)
    a, a_s, b, b_s = a.contiguous(), a_s.contiguous(), b.contiguous(), b_s.float().contiguous()
    K = a.size(-1)
    M, N = a.numel() // K, b.size(0)
    c = a.new_empty(*a.shape[:-1], N, dtype=dtype or torch.get_default_dtype())
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(N, meta["BLOCK_SIZE_N"]))  # noqa: E731
    fp8_gemm_kernel[grid](a, b, c, a_s, b_s, M, N, K, BLOCK_SIZE_K=block_size)
    return c
