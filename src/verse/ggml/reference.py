"""GGML quantized blocks (Q4_0, Q4_1, Q8_0) in plain PyTorch: the layouts, `dequantize` and `gemm`.

A weight [N, K] is stored as in a GGUF file: each row is K/32 blocks of 32 values, a block being an fp16
scale d (Q4_1: and an fp16 minimum m) followed by the quants. Nibble j of a 4-bit block holds element j
in its low half and element j + 16 in its high half. Values: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q.
This is the reference the CPU kernels (`verse/ggml/cpu_kernels.cpp`) are tested against; it runs on any
device.
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


def gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """x W^T for a weight W stored in GGML blocks, accumulated in float32.

    Args:
        x (torch.Tensor): [M, K] any float dtype.
        blocks (torch.Tensor): uint8 [N, K/32 * block bytes].
        qtype (int): Q4_0, Q4_1 or Q8_0.

    Returns:
        torch.Tensor: float32 [M, N].
    """
    return x.float() @ dequantize(blocks, qtype).T
