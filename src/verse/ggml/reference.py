"""GGML quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) in plain PyTorch: the layouts,
`dequantize`, `gemm`.

A weight [N, K] is stored as in a GGUF file: each row is K/32 blocks of 32 values, a block being an fp16
scale d (Q4_1, Q5_1: and an fp16 minimum m) followed by the quants. Nibble j of a 4-bit block holds element j
in its low half and element j + 16 in its high half; Q5_0/Q5_1 put 4 bytes qh before the nibbles, bit j of
the little-endian word qh being bit 4 of element j. Values: Q4_0 d * (q - 8), Q4_1 d * q + m, Q5_0 d * (q - 16),
Q5_1 d * q + m, Q8_0 d * q.

The K-quants (llama.cpp's `block_q4_K`, `block_q5_K`, `block_q6_K` in ggml-common.h) store K/256 super-blocks
of 256 values, each with an fp16 scale d and its own scales for 8 sub-blocks of 32 (Q6_K: 16 of 16):
  Q4_K (144 bytes): d, dmin, 12 bytes of 6-bit scales sc_s and minimums m_s, 128 bytes of nibbles;
                    w = d * sc_s * q - dmin * m_s, q in 0..15.
  Q5_K (176 bytes): as Q4_K, then 32 bytes of fifth bits (bit s of byte j: element j of sub-block s) before
                    the nibbles; q in 0..31.
  Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d last;
                    w = d * sc_t * (q - 32), q in 0..63, one scale per 16 values.
The nibbles of Q4_K/Q5_K come 32 bytes per pair of sub-blocks: byte j holds element j of sub-block 2i in its
low half and of sub-block 2i + 1 in its high half. Every sub-block is thus a block of 32 with its own scale
and offset, multiplied like a Q4_1 block (Q6_K: like a Q8_0 block with two scales).
This is the reference the CPU kernels (`verse/ggml/cpu_kernels.cpp`) are tested against; it runs on any
device.

The activations are rounded to 8 bits per block of 32 before the product, as llama.cpp does (its Q8_0/Q8_1
"vec_dot" types): the kernels then multiply integers, 32 pairs per instruction pair, and read 4x fewer
activation bytes. Relative to float32 activations this adds ~0.5% error per product.
"""

import torch

QK = 32  # values per block (K-quants: per sub-block)
QK_K = 256  # values per K-quant super-block
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14  # GGML type ids (gguf.GGMLQuantizationType)
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q4_K: 144, Q5_K: 176, Q6_K: 210}  # bytes per block
BLOCK_VALUES = {Q4_0: QK, Q4_1: QK, Q5_0: QK, Q5_1: QK, Q8_0: QK, Q4_K: QK_K, Q5_K: QK_K, Q6_K: QK_K}  # per block
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K",
         Q6_K: "Q6_K"}
SMALL_BLOCKS = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)  # blocks of 32 values, told apart by their sizes


def row_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one weight row of `in_features` values in `qtype` blocks (a whole number of blocks).

    Args:
        qtype (int): a GGML type of `NAMES`.
        in_features (int): values per row.

    Returns:
        int: the row's size in bytes.

    Raises:
        ValueError: when the row is not a whole number of blocks.
    """
    if in_features % BLOCK_VALUES[qtype]:
        raise ValueError(f"{in_features} values are not whole {NAMES[qtype]} blocks of {BLOCK_VALUES[qtype]}")
    return in_features // BLOCK_VALUES[qtype] * BLOCK_BYTES[qtype]


def block_type(row_bytes: int, in_features: int) -> int:
    """The GGML type of a block row of `row_bytes` bytes holding `in_features` values, among `SMALL_BLOCKS`.

    (The K-quants cannot be told by size: a Q4_K row has the size of a Q4_0 row. Their users name the type.)

    Args:
        row_bytes (int): bytes per weight row.
        in_features (int): values per row (a multiple of 32).

    Returns:
        int: Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 (their block sizes differ: 18, 20, 22, 24, 34 bytes).
    """
    if in_features % QK == 0:
        for qtype in SMALL_BLOCKS:
            if row_bytes == in_features // QK * BLOCK_BYTES[qtype]:
                return qtype
    names = ", ".join(NAMES[qtype] for qtype in SMALL_BLOCKS)
    raise ValueError(f"a row of {row_bytes} bytes is not {in_features} values in {names} blocks")


def _half(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 2] of little-endian fp16 values -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and minimums packed in 12 bytes [..., 12] of a Q4_K/Q5_K super-block (llama.cpp's
    `get_scale_min_k4`): bytes 0-3 hold sc_0..3 (low 6 bits), 4-7 m_0..3, 8-11 the low 4 bits of sc_4..7 and
    m_4..7, whose high 2 bits are the top bits of bytes 0-3 and 4-7."""
    s = scales.int()
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mn.float()


def _dequantize_k(b: torch.Tensor, qtype: int) -> torch.Tensor:
    """K-quant super-blocks [N, nb, block bytes] -> float32 [N, nb, 256] (operation order as gguf.quants)."""
    N, nb = b.shape[:2]
    if qtype == Q6_K:
        ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208], _half(b[..., 208:210])
        ds = (d * sc.contiguous().view(torch.int8).float()).view(N, nb, 16, 1)
        lo = torch.stack([ql.reshape(N, nb, 2, 64) & 15, ql.reshape(N, nb, 2, 64) >> 4], dim=2)  # [.., nib, half, 64]
        lo = lo.transpose(2, 3).reshape(N, nb, 8, 32)  # sub-block 4h + 2 nib + j//32: ql[64h + j] nibble nib
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 1, 4, 1)
        hi = ((qh.reshape(N, nb, 2, 1, 32) >> shifts) & 3).reshape(N, nb, 8, 32)
        q = ((lo | (hi << 4)).to(torch.int8) - 32).float().view(N, nb, 16, 16)
        return (ds * q).view(N, nb, QK_K)
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 48:] if qtype == Q5_K else b[..., 16:]
    q = torch.stack([qs.reshape(N, nb, 4, 32) & 15, qs.reshape(N, nb, 4, 32) >> 4], dim=3).view(N, nb, 8, 32)
    if qtype == Q5_K:
        bits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)
        q = q | (((b[..., 16:48].reshape(N, nb, 1, 32) >> bits) & 1) << 4)
    return ((d * sc)[..., None] * q.float() - (dmin * mn)[..., None]).view(N, nb, QK_K)


def dequantize(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight stored in `blocks`, as a dense matrix.

    Args:
        blocks (torch.Tensor): uint8 [N, K / block values * block bytes].
        qtype (int): a type of `NAMES`.
        dtype (torch.dtype): result dtype (values are computed in float32).

    Returns:
        torch.Tensor: [N, K].
    """
    N = blocks.size(0)
    b = blocks.view(N, -1, BLOCK_BYTES[qtype])
    if BLOCK_VALUES[qtype] == QK_K:
        return _dequantize_k(b, qtype).reshape(N, -1).to(dtype)
    d = _half(b[..., 0:2])  # [N, nb, 1]
    if qtype == Q8_0:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        w = d * q
    else:
        start = {Q4_0: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}[qtype]  # where the nibbles begin
        qs = b[..., start:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
        if qtype in (Q5_0, Q5_1):  # bit j of the 4 bytes before the nibbles is bit 4 of element j
            bits = torch.arange(8, dtype=torch.uint8, device=b.device)
            q = q | (((b[..., start - 4:start, None] >> bits) & 1) << 4).reshape(q.shape)
        q = q.float()
        if qtype in (Q4_1, Q5_1):
            w = d * q + _half(b[..., 2:4])
        else:
            w = d * (q - (16 if qtype == Q5_0 else 8))
    return w.reshape(N, -1).to(dtype)


def quantize_k(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """A float matrix in Q4_K, Q5_K or Q6_K super-blocks, as GGUF files store them (for writing such files).

    Per sub-block the range is mapped onto the quants (Q4_K/Q5_K: [min(x, 0), max(x)] onto 0..15 / 0..31;
    Q6_K: max|x| onto +-31 per 16 values); the sub-block scales are then rounded to 6 bits (Q6_K: int8) of the
    super-block's fp16 scale, and the quants rounded against the scales as stored. This is the plain min/max rule,
    not llama.cpp's search for the least-squares scales (`make_qkx2_quants`): its error is somewhat larger.

    Args:
        w (torch.Tensor): [N, K] any float dtype, K a multiple of 256.
        qtype (int): Q4_K, Q5_K or Q6_K.

    Returns:
        torch.Tensor: uint8 [N, K / 256 * block bytes].
    """
    N = w.size(0)
    row_bytes(qtype, w.size(1))  # raises unless K is whole super-blocks
    if qtype == Q6_K:
        x = w.float().reshape(N, -1, 16, 16)
        scale = x.abs().amax(-1) / 31  # [N, nb, 16]
        d = (scale.amax(-1, keepdim=True) / 127).half()
        sc = torch.where(d == 0, 0.0, torch.round(scale / d.float())).clamp(-128, 127)
        ds = (d.float() * sc)[..., None]
        q = (torch.where(ds == 0, 0.0, torch.round(x / ds)).clamp(-32, 31) + 32).to(torch.uint8).view(N, -1, 2, 4, 32)
        # sub-block 4h + k: low 4 bits in bytes 64h + 32(k % 2) + j, nibble k / 2; high 2 bits at bits 2k of 32h + j
        ql = ((q[:, :, :, 0:2] & 15) | (q[:, :, :, 2:4] << 4)).reshape(N, -1, 128)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=w.device).view(1, 1, 1, 4, 1)
        qh = ((q >> 4).to(torch.int32) << shifts).sum(3).to(torch.uint8).reshape(N, -1, 64)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), d.view(torch.uint8)]
        return torch.cat(parts, dim=-1).reshape(N, -1)
    nmax = 15 if qtype == Q4_K else 31
    x = w.float().reshape(N, -1, 8, 32)
    low = x.amin(-1).clamp(max=0)
    scale, minimum = (x.amax(-1) - low) / nmax, -low  # [N, nb, 8]
    d = (scale.amax(-1, keepdim=True) / 63).half()
    dmin = (minimum.amax(-1, keepdim=True) / 63).half()
    sc = torch.where(d == 0, 0.0, torch.round(scale / d.float())).clamp(0, 63)
    mn = torch.where(dmin == 0, 0.0, torch.round(minimum / dmin.float())).clamp(0, 63)
    ds, dm = (d.float() * sc)[..., None], (dmin.float() * mn)[..., None]
    q = torch.where(ds == 0, 0.0, torch.round((x + dm) / ds)).clamp(0, nmax).to(torch.uint8)  # [N, nb, 8, 32]
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], dim=-1)
    qs = ((q[:, :, 0::2] & 15) | ((q[:, :, 1::2] & 15) << 4)).reshape(N, -1, 128)
    parts = [d.view(torch.uint8), dmin.view(torch.uint8), scales]
    if qtype == Q5_K:
        bits = (q >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=w.device).view(1, 1, 8, 1)
        parts.append(bits.sum(2).to(torch.uint8))
    return torch.cat([*parts, qs], dim=-1).reshape(N, -1)


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
        blocks (torch.Tensor): uint8 [N, K / block values * block bytes].
        qtype (int): a type of `NAMES`.

    Returns:
        torch.Tensor: float32 [M, N].
    """
    return round_activations(x) @ dequantize(blocks, qtype).T
