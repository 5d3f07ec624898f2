"""GGML quantized blocks (Q4_0, Q4_1, Q8_0) in plain PyTorch: the layouts, `dequantize` and `gemm`.

A weight [N, K] is stored as in a GGUF file: each row is K/32 blocks of 32 values, a block being an fp16
scale d (Q4_1: and an fp16 minimum m) followed by the quants. Nibble j of a 4-bit block holds element j
in its low half and element j + 16 in its high half. Values: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q.
This is the reference the CPU kernels (`verse/ggml/cpu_kernels.cpp`) are tested against; it runs on any
device.

The activations are rounded to 8 bits per block of 32 before the product, as llama.cpp does (its Q8_0/Q8_1
"vec_dot" types): the kernels then multiply integers, 32 pairs per instruction pair, and read 4x fewer
activation bytes. Relative to float32 activations this adds ~0.5% error per product.
"""

import torch

QK = 32  # values per block
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # GGML type ids (gguf.GGMLQuantizationType)
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}


def block_type(row_bytes: int, in_features: int) -> int:
    """The GGML type of a block row of `row_bytes` bytes holding `in_features` values.

    Args:
        row_bytes (int): bytes per weight row.
        in_features (int): values per row (a multiple of 32).

    Returns:
        int: Q4_0, Q4_1 or Q8_0 (their block sizes differ: 18, 20, 34 bytes).
    """
    if in_features % QK == 0:
        for qtype, size in BLOCK_BYTES.items():
            if row_bytes == in_features // QK * size:
                return qtype
    raise ValueError(f"a row of {row_bytes} bytes is not {in_features} values in Q4_0, Q4_1 or Q8_0 blocks")


def dequantize(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight stored in `blocks`, as a dense matrix.

    Args:
        blocks (torch.Tensor): uint8 [N, K/32 * block bytes].
        qtype (int): Q4_0, Q4_1 or Q8_0.
        dtype (torch.dtype): result dtype (values are computed in float32).

    Returns:
        torch.Tensor: [N, K].
    """
    N = blocks.size(0)
    b = blocks.view(N, -1, BLOCK_BYTES[qtype])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if qtype == Q8_0:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        w = d * q
    else:
        qs = b[..., 4:] if qtype == Q4_1 else b[..., 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        if qtype == Q4_1:
            w = d * q + b[..., 2:4].contiguous().view(torch.float16).float()
        else:
            w = d * (q - 8)
    return w.reshape(N, -1).to(dtype)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """`x` [..., K] rounded to 8 bits per block of 32 values, as llama.cpp's Q8_0 activations: per block
    dx = max|x| / 127, x ~= dx * round(x / dx) (round half to even; a block of zeros stays zero).

    Args:
        x (torch.Tensor): [..., K], K a multiple of 32.

    Returns:
        torch.Tensor: float32 [..., K], the values the kernels multiply.
    """
    xb = x.float().reshape(*x.shape[:-1], -1, QK)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(dx == 0, 0.0, torch.round(xb / dx))
    return (q * dx).reshape(x.shape)


def gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """x W^T for a weight W stored in GGML blocks, with x rounded to 8 bits per block (`round_activations`),
    as llama.cpp multiplies these weights; accumulated in float32.

    Args:
        x (torch.Tensor): [M, K] any float dtype.
        blocks (torch.Tensor): uint8 [N, K/32 * block bytes].
        qtype (int): Q4_0, Q4_1 or Q8_0.

    Returns:
        torch.Tensor: float32 [M, N].
    """
    return round_activations(x) @ dequantize(blocks, qtype).T
