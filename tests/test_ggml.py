"""GGUF blocks multiplied as they are (`verse.ggml`, `gemm_impl="gguf"`), with the gguf library as the oracle.

Weights are quantized and dequantized by `gguf.quants` (independent of Verse; it has no K-quant quantizer, so
Q4_K/Q5_K/Q6_K weights are random valid blocks that it dequantizes); activations are rounded to 8 bits per block
of 32 by a numpy transcription of llama.cpp's rule written here; products are taken in float64.
"""

import importlib
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from test_interop_gguf import VOCAB, tokens, write_gguf

import verse
from verse import ggml
from verse.errors import ConfigError
from verse.ggml import reference
from verse.infer.generate import generate
from verse.model.linear import Linear

QTYPES = (ggml.Q4_0, ggml.Q4_1, ggml.Q5_0, ggml.Q5_1, ggml.Q8_0)
KTYPES = (ggml.Q4_K, ggml.Q5_K, ggml.Q6_K)  # 256-value super-blocks: K a multiple of 256
QNAME = {ggml.Q4_0: "Q4_0", ggml.Q4_1: "Q4_1", ggml.Q5_0: "Q5_0", ggml.Q5_1: "Q5_1", ggml.Q8_0: "Q8_0",
         ggml.Q4_K: "Q4_K", ggml.Q5_K: "Q5_K", ggml.Q6_K: "Q6_K"}
N = 97  # not a multiple of the kernels' 16-row work chunks


@pytest.fixture(scope="module")
def kernels():
    if not ggml.kernels_available():
        pytest.skip("the AVX2 GGUF kernels are not available here (no AVX2 CPU or no C++ toolchain)")


def k_blocks(qtype, rows, cols, rng):
    """Random valid K-quant super-blocks (gguf has no K-quant quantizer; every bit pattern of the quants and
    scales is valid): random bytes, with the fp16 scales d (and dmin) set to random magnitudes 1e-4..1e-2."""
    size = ggml.BLOCK_BYTES[qtype]
    data = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scales = (10.0 ** rng.uniform(-4, -2, (rows, cols // 256, 2))).astype(np.float16)
    if qtype == ggml.Q6_K:  # d ends the 210-byte block; its 16 int8 scales carry the sign
        data[..., size - 2:] = scales[..., :1].view(np.uint8)
    else:  # d, dmin lead the block
        data[..., 0:4] = scales.view(np.uint8)
    return data.reshape(rows, -1)


def quantized(qtype, rows, cols, seed=0):
    """Random weights in `qtype` blocks: (uint8 torch [rows, K/block values * bytes], gguf's float64 dequantization)."""
    rng = np.random.default_rng(seed)
    w = (0.1 * rng.standard_normal((rows, cols)) + 0.03 * rng.standard_normal((rows, 1))).astype(np.float32)
    kind = gguf.GGMLQuantizationType(qtype)
    blocks = k_blocks(qtype, rows, cols, rng) if qtype in KTYPES else gguf.quants.quantize(w, kind)
    assert blocks.dtype == np.uint8 and blocks.shape == (rows, ggml.row_bytes(qtype, cols))
    dense = gguf.quants.dequantize(blocks, kind).astype(np.float64).reshape(rows, cols)
    return torch.from_numpy(np.ascontiguousarray(blocks)), dense


def activations(M, K, seed=1):
    """[M, K] float32 with block scales spread over 1e-2..1e2 and one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K // 32, 32, generator=g) * torch.logspace(-2, 2, K // 32).view(1, -1, 1)
    x[0, 0] = 0.0
    return x.reshape(M, K)


def rounded(x, out=np.float64):
    """Oracle of `round_activations`: per block of 32, dx = max|x| / 127 in float32, x / dx rounded half to even."""
    xb = x.float().numpy().reshape(*x.shape[:-1], -1, 32)
    dx = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.where(dx == 0, 0.0, np.rint(xb / np.where(dx == 0, np.float32(1), dx))).astype(np.float32)
    return (q.astype(out) * dx.astype(out)).reshape(x.shape)


def oracle(x, dense):
    """x W^T in float64, x rounded as llama.cpp rounds activations when it has at most PREFILL_ROWS rows."""
    x2 = x.reshape(-1, x.size(-1))
    xs = rounded(x2) if x2.size(0) <= ggml.PREFILL_ROWS else x2.double().numpy()
    return torch.from_numpy(xs @ dense.T).view(*x.shape[:-1], -1)


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def kernel_gemm(x, blocks, qtype):
    return torch.ops.verse_ggml.gemm(x, [blocks], [qtype])[0]


@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_reference_dequantize_matches_gguf(qtype):
    """reference.dequantize reads Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks exactly as gguf.quants.dequantize."""
    blocks, dense = quantized(qtype, N, 576)
    w = reference.dequantize(blocks, qtype)
    assert w.dtype == torch.float32 and w.shape == (N, 576)
    torch.testing.assert_close(w.double(), torch.from_numpy(dense), atol=1e-6, rtol=0)
    assert reference.dequantize(blocks, qtype, torch.bfloat16).dtype == torch.bfloat16


def test_round_activations_hand_example():
    """Blocks with max 127 (dx 1) and 254 (dx 2) round half to even; an all-zero block stays zero."""
    a = torch.zeros(32)
    a[:9] = torch.tensor([127.0, 63.5, 62.5, -0.5, 0.5, 1.5, 2.5, -2.5, 0.25])
    b = torch.zeros(32)
    b[:6] = torch.tensor([-254.0, 3.0, 5.0, -1.0, 7.0, 100.9])
    x = torch.cat([a, torch.zeros(32), b]).view(1, 96)
    expected_a = torch.zeros(32)
    expected_a[:9] = torch.tensor([127.0, 64.0, 62.0, 0.0, 0.0, 2.0, 2.0, -2.0, 0.0])
    expected_b = torch.zeros(32)
    expected_b[:6] = torch.tensor([-254.0, 4.0, 4.0, 0.0, 8.0, 100.0])
    y = reference.round_activations(x)
    assert y.dtype == torch.float32 and y.shape == (1, 96)
    assert torch.equal(y, torch.cat([expected_a, torch.zeros(32), expected_b]).view(1, 96))


def test_round_activations_error_bound():
    """On random data each value moves by at most dx/2 onto a multiple of its block's dx = max|x| / 127."""
    x = activations(6, 320).view(2, 3, 320).bfloat16()
    y = reference.round_activations(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    xb, yb = x.float().view(2, 3, 10, 32), y.view(2, 3, 10, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    # dx/2, plus float32 rounding: of x / dx (~1e-5 dx at |q| <= 127) and of the product q * dx (2^-24 |y|)
    bound = dx.double() * (0.5 + 1e-5) + 2.0 ** -24 * yb.double().abs()
    assert ((yb.double() - xb.double()).abs() <= bound).all()
    assert ((yb - xb).abs() / dx.clamp_min(1e-30)).max() > 0.49  # the bound is nearly reached: it is the right one
    steps = torch.where(dx == 0, 0.0, yb / dx)
    assert (steps.round() - steps).abs().max() < 1e-4 and steps.abs().max() <= 127 + 1e-4
    assert torch.equal(y, torch.from_numpy(rounded(x, np.float32)))


def test_kernels_build_on_avx2_with_a_compiler():
    """On an AVX2/AVX512 CPU with a C++ compiler the kernels must build (not silently fall back)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"CPU capability {torch.backends.cpu.get_cpu_capability()}: no AVX2 kernels expected")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on PATH")
    assert ggml.kernels_available() is True
    assert hasattr(torch.ops.verse_ggml, "gemm") and hasattr(torch.ops.verse_ggml, "dequantize")


@pytest.mark.parametrize("K", (64, 576))
@pytest.mark.parametrize("M", (1, 2, 4, 5, 16))
@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_kernel_gemm_matches_float64_oracle(kernels, qtype, M, K):
    """The AVX2 kernel equals a float64 product of gguf's weights and independently rounded activations."""
    blocks, dense = quantized(qtype, N, K, seed=M)
    x = activations(M, K, seed=K + M)
    ref = oracle(x, dense)
    y = kernel_gemm(x, blocks, qtype)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(ggml.gemm(x, blocks, qtype), ref) < 1e-5  # <= PREFILL_ROWS rows: the kernel path


@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_kernel_dequantize_matches_gguf(kernels, qtype):
    """torch.ops.verse_ggml.dequantize (and ggml.dequantize) equal gguf.quants.dequantize."""
    blocks, dense = quantized(qtype, N, 576, seed=3)
    w = torch.ops.verse_ggml.dequantize(blocks, qtype)
    assert w.dtype == torch.float32 and w.shape == (N, 576)
    torch.testing.assert_close(w.double(), torch.from_numpy(dense), atol=1e-6, rtol=0)
    assert torch.equal(ggml.dequantize(blocks, qtype, torch.bfloat16), w.bfloat16())


@pytest.mark.parametrize("M", (17, 40))
@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_gemm_dense_path_matches_oracle(kernels, qtype, M):
    """More than PREFILL_ROWS rows (a prompt): the widened weight times x as it is, in float32."""
    assert M > ggml.PREFILL_ROWS
    blocks, dense = quantized(qtype, N, 576, seed=M)
    x = activations(M, 576, seed=M)
    y = ggml.gemm(x, blocks, qtype)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, oracle(x, dense)) < 1e-5


@pytest.mark.parametrize("M", (1, 3, 16, 17))
def test_gemm_many_matches_oracle(kernels, M):
    """One call over several weights (mixed types, row counts off the 16-row chunks) equals each product."""
    weights = [quantized(qtype, n, 256, seed=n) for qtype, n in ((ggml.Q4_0, 40), (ggml.Q8_0, 7), (ggml.Q4_1, 33))]
    x = activations(M, 256, seed=M)
    ys = ggml.gemm_many(x, [b for b, _ in weights], [ggml.Q4_0, ggml.Q8_0, ggml.Q4_1])
    assert [tuple(y.shape) for y in ys] == [(M, 40), (M, 7), (M, 33)]
    for y, (_, dense) in zip(ys, weights):
        assert rel_err(y, oracle(x, dense)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3), (3, 7)], ids=["kernel", "dense"])
def test_gemm_batched_input_and_bf16(kernels, shape):
    """[B, T, K] input gives [B, T, N]; bf16 input gives bf16 output of the same product."""
    blocks, dense = quantized(ggml.Q4_1, N, 128, seed=5)
    x = activations(shape[0] * shape[1], 128, seed=9).view(*shape, 128)
    y = ggml.gemm(x, blocks, ggml.Q4_1)
    assert y.shape == (*shape, N) and y.dtype == torch.float32
    assert rel_err(y, oracle(x, dense)) < 1e-5
    xb = x.bfloat16()
    yb = ggml.gemm(xb, blocks, ggml.Q4_1)
    assert yb.shape == (*shape, N) and yb.dtype == torch.bfloat16
    assert rel_err(yb, oracle(xb, dense)) < 1e-2  # the result is rounded to bf16 (8 bits of mantissa)


def test_block_type():
    """block_type tells the five layouts of 32-value blocks apart by row size and rejects a size that matches none."""
    assert [ggml.block_type(K // 32 * size, K) for K, size in ((64, 18), (64, 20), (64, 22), (96, 24), (96, 34))] == \
        [ggml.Q4_0, ggml.Q4_1, ggml.Q5_0, ggml.Q5_1, ggml.Q8_0]
    with pytest.raises(ValueError, match="not 64 values"):
        ggml.block_type(2 * 19, 64)
    with pytest.raises(ValueError):
        ggml.block_type(18, 48)  # 48 values are not whole blocks


def q5_blocks(qtype, rows, cols, rng):
    """Q5_0/Q5_1 blocks [rows, cols / 32 * bytes] with every bit pattern of quants and fifth bits (random bytes), fp16
    scales d of either sign from 1e-4 to 1 (Q5_1: minimums m too), and the edge rows: 0 every quant is 0, 1 every
    quant is 31 (all nibbles and fifth bits set), 2 d = 0."""
    size = ggml.BLOCK_BYTES[qtype]
    data = rng.integers(0, 256, (rows, cols // 32, size), dtype=np.uint8)
    fields = 2 if qtype == ggml.Q5_1 else 1  # d (and m) lead the block
    sign = rng.choice([-1.0, 1.0], (rows, cols // 32, fields))
    data[..., :2 * fields] = (sign * 10.0 ** rng.uniform(-4, 0, sign.shape)).astype(np.float16).view(np.uint8)
    data[0, :, 2 * fields:], data[1, :, 2 * fields:], data[2, :, :2] = 0, 255, 0
    return torch.from_numpy(data.reshape(rows, -1))


@pytest.mark.parametrize("qtype", (ggml.Q5_0, ggml.Q5_1), ids=QNAME.get)
def test_q5_blocks_every_bit_pattern_match_gguf(kernels, qtype):
    """Q5_0/Q5_1 blocks of any bits (edge rows of all-0 and all-31 quants, zero and negative scales): the reference and
    the kernel widen them as gguf.quants.dequantize does, and the kernel products (1-5 rows of x, the 4-row tiles
    and the two-block gemv) equal a float64 product of gguf's weights and independently rounded activations."""
    blocks = q5_blocks(qtype, N, 576, np.random.default_rng(qtype))
    dense = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype)).astype(np.float64)
    d, m = blocks.view(N, 18, -1)[..., :4].contiguous().view(torch.float16).float().unbind(-1)

    def edge(w):  # one value per block -> its 32 elements
        return np.repeat(w.double().numpy(), 32)

    if qtype == ggml.Q5_0:  # the edge rows by hand (float32 products): w = d (q - 16)
        assert np.array_equal(dense[0], edge(-16 * d[0])) and np.array_equal(dense[1], edge(15 * d[1]))
        assert not dense[2].any()
    else:  # w = d q + m
        assert np.array_equal(dense[0], edge(m[0])) and np.array_equal(dense[1], edge(31 * d[1] + m[1]))
        assert np.array_equal(dense[2], edge(m[2]))
    assert torch.equal(reference.dequantize(blocks, qtype).double(), torch.from_numpy(dense))
    assert torch.equal(torch.ops.verse_ggml.dequantize(blocks, qtype).double(), torch.from_numpy(dense))
    for M in (1, 2, 3, 4, 5):
        x = activations(M, 576, seed=M)
        x[-1, 32:64] = 100.0  # a block at its rounding's edge: every value is max|x|, rounded to 127
        assert rel_err(kernel_gemm(x, blocks, qtype), oracle(x, dense)) < 1e-5, M


def test_q5_block_hand_example():
    """One Q5_0 and one Q5_1 block decoded by hand from llama.cpp's block_q5_0/block_q5_1: element j takes the low
    nibble of qs[j] (j < 16; element j + 16 the high one) and bit j of the little-endian word qh as its fifth bit."""
    qh = (1 << 3) | (1 << 20)  # fifth bits of elements 3 and 20
    qs = np.zeros(16, np.uint8)
    qs[3], qs[4] = 0x27, 0x50  # element 3: 7 | 16 = 23, element 19: 2; element 4: 0, element 20: 5 | 16 = 21
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    for qtype, head, value in ((ggml.Q5_0, d, lambda q: 0.5 * (q - 16)), (ggml.Q5_1, d + m, lambda q: 0.5 * q - 1)):
        blk = np.frombuffer(head + qh.to_bytes(4, "little") + qs.tobytes(), np.uint8)
        assert blk.size == ggml.BLOCK_BYTES[qtype]
        expected = torch.full((32,), value(0))
        expected[3], expected[19], expected[4], expected[20] = value(23), value(2), value(0), value(21)
        w = reference.dequantize(torch.from_numpy(blk.copy()).view(1, -1), qtype)[0]
        assert torch.equal(w, expected), QNAME[qtype]
        assert torch.equal(w, torch.from_numpy(gguf.quants.dequantize(blk, gguf.GGMLQuantizationType(qtype))))


def test_kernel_rejects_mismatched_features(kernels):
    """The torch op raises RuntimeError when x's K differs from the weight's, or for an unknown type."""
    blocks, _ = quantized(ggml.Q8_0, 8, 96)
    with pytest.raises(RuntimeError, match="features"):
        kernel_gemm(torch.randn(2, 64), blocks, ggml.Q8_0)
    with pytest.raises(RuntimeError):
        torch.ops.verse_ggml.dequantize(blocks, 10)  # Q2_K has no kernel


def test_reference_fallback_without_kernels(monkeypatch):
    """With the kernels marked unavailable, ggml.gemm/dequantize compute the reference result."""
    monkeypatch.setattr(ggml, "_built", False)
    assert not ggml.kernels_available()
    blocks, dense = quantized(ggml.Q4_0, N, 128, seed=11)
    for M in (1, 20):
        x = activations(M, 128, seed=M)
        y = ggml.gemm(x, blocks, ggml.Q4_0)
        if M <= ggml.PREFILL_ROWS:
            assert torch.equal(y, reference.gemm(x, blocks, ggml.Q4_0))
        assert rel_err(y, oracle(x, dense)) < 1e-5
    torch.testing.assert_close(ggml.dequantize(blocks, ggml.Q4_0).double(), torch.from_numpy(dense), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_linear_ggml_layout_on_meta(qtype):
    """Linear.ggml_ on meta gives a uint8 [N, row bytes] weight and records the block type."""
    row_bytes = 128 // 32 * ggml.BLOCK_BYTES[qtype]
    with torch.device("meta"):
        layer = Linear(128, N).ggml_(row_bytes)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.uint8
    assert layer.weight.shape == (N, row_bytes) and not layer.weight.requires_grad
    assert layer.ggml_type == qtype and QNAME[qtype] in repr(layer)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("qtype", QTYPES, ids=QNAME.get)
def test_linear_on_blocks(qtype, bias):
    """A Linear holding real blocks computes reference.gemm (+ bias) and dequantizes to gguf's weight."""
    blocks, dense = quantized(qtype, N, 128, seed=13)
    layer = Linear(128, N, bias=bias).ggml_(blocks.size(1))
    layer.weight.data.copy_(blocks)
    x = activations(6, 128, seed=2).view(2, 3, 128)
    with torch.no_grad():
        y = layer(x)
    expected = reference.gemm(x.view(6, 128), blocks, qtype).view(2, 3, N)
    ref = oracle(x, dense)
    if bias:
        expected, ref = expected + layer.bias, ref + layer.bias.double()
    torch.testing.assert_close(y, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    assert rel_err(y, ref) < 1e-5
    torch.testing.assert_close(layer.dequantized_weight(torch.float32).double(), torch.from_numpy(dense), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("qtype,tied", [(gguf.GGMLQuantizationType.Q8_0, False),
                                        (gguf.GGMLQuantizationType.Q4_0, True),
                                        (gguf.GGMLQuantizationType.Q4_1, True)],
                         ids=["Q8_0", "Q4_0-tied", "Q4_1-tied"])
def test_gguf_blocks_model_matches_dense(qtype, tied, tmp_path, monkeypatch):
    """gemm_impl="gguf" keeps the file's blocks in every Linear and gives the dense model's logits up to the
    8-bit rounding of activations."""
    path = write_gguf(tmp_path / "m.gguf", qtype, tied=tied)
    dense = verse.load(path, dtype=torch.float32)
    blocks = verse.load(path, dtype=torch.float32, gemm_impl="gguf")
    assert blocks.args.gemm_impl == "gguf" and blocks.args.tie_embeddings == tied
    layers = {name: m for name, m in blocks.named_modules() if isinstance(m, Linear)}
    assert len(layers) == 8 and "head" in layers
    dense_weights = dict(dense.named_parameters(remove_duplicate=False))
    for name, layer in layers.items():
        assert layer.ggml_type == int(qtype) and layer.weight.dtype == torch.uint8, name
        # the same weight the dense model got through gguf.quants.dequantize (and un-permuted q/k rows)
        assert torch.equal(reference.dequantize(layer.weight, layer.ggml_type), dense_weights[f"{name}.weight"]), name
    assert blocks.embed.weight.dtype == torch.float32 and torch.equal(blocks.embed.weight, dense.embed.weight)
    file = {t.name: t for t in gguf.GGUFReader(path).tensors}
    head = "token_embd.weight" if tied else "output.weight"
    assert torch.equal(blocks.head.weight, torch.from_numpy(np.array(file[head].data, np.uint8)).view(VOCAB, -1))
    assert torch.equal(blocks.layers[0].attn.wv.weight,
                       torch.from_numpy(np.array(file["blk.0.attn_v.weight"].data, np.uint8)).view(128, -1))
    products = []

    def recorded(x, weights, qtypes):
        ys = gemm_many(x, weights, qtypes)
        products.extend((x, w, t, y) for w, t, y in zip(weights, qtypes, ys))
        return ys

    gemm_many = ggml.gemm_many
    monkeypatch.setattr(ggml, "gemm_many", recorded)  # Linear.forward and linears() both end there
    x = tokens()
    with torch.no_grad():
        expected, got = dense(x), blocks(x)  # 2 x 20 rows: the dense path
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        first = blocks(x[:, :4])  # 8 rows: the kernel path
        err_kernel = ((first - expected[:, :4]).abs().max() / expected.abs().max()).item()
    print(f"{qtype.name} tied={tied}: max |logit diff| / max |logit| vs dense = {err:.4f} (T=20), "
          f"{err_kernel:.4f} (T=4)")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert err < 1e-5  # a prompt multiplies the widened weights with x as it is: the dense model's logits
    assert 0 < err_kernel < 0.05  # decoding rounds x to 8 bits per block of 32
    # Every product in both forwards, against gguf's weights and the oracle (rounding x in decoding). (Logits themselves cannot
    # be held to float32 accuracy: a 1e-6 change of an input can move a value across a rounding boundary.)
    assert len(products) == 2 * 8 and {id(w) for _, w, _, _ in products} == {id(m.weight) for m in layers.values()}
    for x_in, w, t, y in products:
        assert t == int(qtype) and rel_err(y, oracle(x_in, gguf.quants.dequantize(w.numpy(), qtype))) < 1e-5


def test_gemm_impl_gguf_needs_a_gguf_file(tmp_path):
    """verse.load of a checkpoint directory with gemm_impl="gguf" raises ConfigError."""
    model = verse.load(write_gguf(tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0), dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    assert verse.load(tmp_path / "ckpt").args.gemm_impl == "bf16"  # the directory itself loads
    with pytest.raises(ConfigError, match="gguf"):
        verse.load(tmp_path / "ckpt", gemm_impl="gguf")


def test_greedy_generation_on_blocks(tmp_path):
    """Greedy decoding of a gguf-blocks model (kernel path, KV cache) runs 8 steps and picks the top tokens."""
    path = write_gguf(tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q4_0, tied=True)
    model = verse.load(path, dtype=torch.float32, gemm_impl="gguf")
    prompt = tokens(T=6)[0].tolist()
    out = generate(model, None, [prompt], max_new_tokens=8, stop_ids=set(), compile=False)
    assert len(out) == 1 and len(out[0]) == 8 and all(0 <= t < VOCAB for t in out[0])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out[0]]))[0, len(prompt) - 1:-1]
    # each step's token is the argmax of the same context, up to the activation rounding's effect (a few 0.1%)
    chosen = logits.gather(1, torch.tensor(out[0])[:, None])[:, 0]
    assert (chosen >= logits.max(-1).values - 0.02 * logits.abs().max()).all()
    print(f"greedy tokens {out[0]}; argmax of the full forward agrees on "
          f"{(logits.argmax(-1) == torch.tensor(out[0])).sum().item()}/8 steps")


@pytest.mark.parametrize("mix", ["Q4_1", pytest.param("Q4_K_M", marks=pytest.mark.slow)])
def test_smollm2_on_its_file_blocks_agrees_with_the_dequantized_model(mix, tmp_path):
    """SmolLM2-135M as shipped (Q4_1 matrices, Q8_0 embedding/head), or requantized as llama.cpp's Q4_K_M (its
    576-wide matrices in the Q5_0/Q8_0 fallbacks, ffn_down in Q4_K/Q6_K), decoding on its blocks, token by token
    with the KV cache (the kernel path), vs the same file dequantized to float32: logits within a few percent of
    their scale and the same top token at nearly every step; the prompt (prefill path) gives the dense logits."""
    from verse.assets import smollm2_gguf

    path = str(smollm2_gguf() if mix == "Q4_1" else q4_k_m_like(smollm2_gguf(), tmp_path / "q4_k_m.gguf"))
    expected = {"Q4_1": (ggml.Q4_1, ggml.Q4_1, ggml.Q8_0), "Q4_K_M": (ggml.Q5_0, ggml.Q6_K, ggml.Q8_0)}[mix]
    tok = verse.load_tokenizer(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue? Answer in two sentences."},
                                   {"role": "assistant", "content": "Sunlight scatters off air molecules, and blue "
                                    "light scatters the most, so the sky looks blue."}])
    x, P = torch.tensor([ids]), 20
    with torch.inference_mode():
        dense = verse.load(path, dtype=torch.float32)(x)[0]
        model = verse.load(path, dtype=torch.float32, gemm_impl="gguf")
        assert (model.layers[0].ffn.w1.ggml_type, model.layers[0].ffn.w2.ggml_type, model.head.ggml_type) == expected
        model.setup_cache(1, len(ids))
        pos = torch.arange(len(ids))
        prefill = model(x[:, :P], input_pos=pos[:P])[0]
        steps = torch.cat([model(x[:, t:t + 1], input_pos=pos[t:t + 1])[0] for t in range(P, len(ids))])
    assert ((prefill - dense[:P]).abs().max() / dense.abs().max()).item() < 1e-5
    rel = ((steps - dense[P:]).abs().max() / dense.abs().max()).item()
    agree = (steps.argmax(-1) == dense[P:].argmax(-1)).float().mean().item()
    print(f"SmolLM2 decoding on blocks vs dequantized: max logit error {rel:.4f} of the logit scale, "
          f"top-1 agreement {agree:.3f} over {len(ids) - P} steps")
    assert rel < 0.08 and agree >= 0.9


def test_a_blocks_model_cannot_be_saved_as_a_checkpoint(tmp_path):
    """Saving a model holding GGUF blocks is refused with one clear error (an HF checkpoint cannot store them)."""
    from verse.errors import CheckpointError

    path = tmp_path / "m.gguf"
    write_gguf(path, gguf.GGMLQuantizationType.Q8_0)
    model = verse.load(path, dtype=torch.float32, gemm_impl="gguf")
    with pytest.raises(CheckpointError, match="gemm_impl='bf16'"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qtype", KTYPES, ids=QNAME.get)
def test_reference_dequantize_k_quants_bit_exact(qtype):
    """reference.dequantize reads Q4_K/Q5_K/Q6_K super-blocks bit for bit as gguf.quants.dequantize."""
    blocks, dense = quantized(qtype, N, 768, seed=qtype)
    w = reference.dequantize(blocks, qtype)
    assert w.dtype == torch.float32 and w.shape == (N, 768)
    assert torch.equal(w, torch.from_numpy(dense).float())
    assert len(np.unique(dense)) > 1000  # the random blocks exercise many scales and quants


def test_reference_dequantize_q4_k_hand_example():
    """One Q4_K super-block decoded by hand from llama.cpp's layout: sub-block 1 takes the high nibbles of bytes
    16-47 with scale/min from bytes 5/9; sub-block 4 takes its 6-bit scale/min from byte 12 and bytes 4/8's top bits."""
    blk = np.zeros(144, np.uint8)
    blk[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)  # d
    blk[2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)  # dmin
    blk[5], blk[9] = 3, 7  # sc_1 = 3, m_1 = 7
    blk[4], blk[8], blk[12] = 0b11_000000, 0b01_000000, 0x52  # sc_4 = 0x2 | 3 << 4 = 50, m_4 = 0x5 | 1 << 4 = 21
    blk[16 + 5] = 0xA0  # element 5 of sub-block 1: nibble 10
    blk[16 + 64 + 2] = 0x09  # element 2 of sub-block 4: low nibble 9 of byte 2 of the third 32-byte group
    w = reference.dequantize(torch.from_numpy(blk).view(1, 144), ggml.Q4_K)[0]
    assert w[32 + 5].item() == 0.5 * 3 * 10 - 0.25 * 7 and w[32].item() == -0.25 * 7
    assert w[128 + 2].item() == 0.5 * 50 * 9 - 0.25 * 21 and w[128].item() == -0.25 * 21
    assert w[0].item() == 0.0  # sub-block 0: scale 0, min 0 (its top bits went to sub-block 4)
    assert torch.equal(w, torch.from_numpy(gguf.quants.dequantize(blk, gguf.GGMLQuantizationType.Q4_K)))


def test_quantize_k_against_gguf():
    """reference.quantize_k writes blocks that gguf.quants.dequantize reads back (bit-equal to our reference) with the
    error of gguf's own quantizers of the same bits: Q4_K ~ Q4_1, Q5_K ~ Q5_1, Q6_K between those and Q8_0."""
    rng = np.random.default_rng(7)
    w = (0.1 * rng.standard_normal((64, 768)) + 0.03 * rng.standard_normal((64, 1))).astype(np.float32)

    def error(kind, blocks):
        dense = gguf.quants.dequantize(np.asarray(blocks), kind).reshape(w.shape)
        return np.sqrt(((dense - w) ** 2).mean() / (w ** 2).mean()), dense

    gguf_err = {k: error(k, gguf.quants.quantize(w, k))[0] for k in (gguf.GGMLQuantizationType.Q4_1,
                                                                       gguf.GGMLQuantizationType.Q5_1,
                                                                       gguf.GGMLQuantizationType.Q8_0)}
    errs = {}
    for qtype in KTYPES:
        blocks = reference.quantize_k(torch.from_numpy(w), qtype)
        assert blocks.dtype == torch.uint8 and blocks.shape == (64, ggml.row_bytes(qtype, 768))
        errs[qtype], dense = error(gguf.GGMLQuantizationType(qtype), blocks.numpy())
        assert torch.equal(reference.dequantize(blocks, qtype), torch.from_numpy(dense))
    print({QNAME[q]: round(float(e), 4) for q, e in errs.items()},
          {k.name: round(float(e), 4) for k, e in gguf_err.items()})
    Q = gguf.GGMLQuantizationType
    assert errs[ggml.Q4_K] < 1.1 * gguf_err[Q.Q4_1] and errs[ggml.Q5_K] < 1.1 * gguf_err[Q.Q5_1]
    assert gguf_err[Q.Q8_0] < errs[ggml.Q6_K] < 0.7 * gguf_err[Q.Q5_1]
    # sub-block s: steps of (56 + s) / 256 from 0 (d = 1/256, sc_s = 56 + s, min 0): representable exactly
    grid = (torch.arange(256.0).remainder(16) * (56 + torch.arange(256) // 32) / 256).view(1, 256)
    assert torch.equal(reference.dequantize(reference.quantize_k(grid, ggml.Q4_K), ggml.Q4_K), grid)
    with pytest.raises(ValueError, match="256"):
        reference.quantize_k(torch.zeros(2, 576), ggml.Q4_K)


@pytest.mark.parametrize("K", (256, 768))
@pytest.mark.parametrize("M", (1, 2, 3, 4, 5, 16))
@pytest.mark.parametrize("qtype", KTYPES, ids=QNAME.get)
def test_kernel_k_quant_gemm_matches_float64_oracle(kernels, qtype, M, K):
    """The AVX2 K-quant kernel (every row count up to MAX_ROWS, and beyond) equals a float64 product of gguf's
    weights and independently rounded activations, as the reference does."""
    blocks, dense = quantized(qtype, N, K, seed=M)
    x = activations(M, K, seed=K + M)
    ref = oracle(x, dense)
    y = kernel_gemm(x, blocks, qtype)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(reference.gemm(x, blocks, qtype), ref) < 1e-5
    assert rel_err(ggml.gemm(x, blocks, qtype), ref) < 1e-5


@pytest.mark.parametrize("qtype", KTYPES, ids=QNAME.get)
def test_kernel_dequantize_k_quants_matches_gguf(kernels, qtype):
    """torch.ops.verse_ggml.dequantize of K-quant super-blocks equals gguf.quants.dequantize (prompts widen with it)."""
    blocks, dense = quantized(qtype, N, 768, seed=3)
    w = torch.ops.verse_ggml.dequantize(blocks, qtype)
    assert w.dtype == torch.float32 and w.shape == (N, 768)
    torch.testing.assert_close(w.double(), torch.from_numpy(dense), atol=1e-6, rtol=0)
    x = activations(20, 768, seed=4)
    assert rel_err(ggml.gemm(x, blocks, qtype), oracle(x, dense)) < 1e-5  # > PREFILL_ROWS rows: widened weight


@pytest.mark.parametrize("M", (1, 4, 17))
def test_gemm_many_mixes_k_quants_and_blocks_of_32(kernels, M):
    """A Q4_K_M-style call: Q4_K, Q6_K, Q5_K and Q8_0 weights sharing one input, in one kernel call."""
    kinds = ((ggml.Q4_K, 40), (ggml.Q6_K, 7), (ggml.Q5_K, 33), (ggml.Q8_0, 16))
    weights = [quantized(qtype, n, 512, seed=n) for qtype, n in kinds]
    x = activations(M, 512, seed=M)
    ys = ggml.gemm_many(x, [b for b, _ in weights], [qtype for qtype, _ in kinds])
    assert [tuple(y.shape) for y in ys] == [(M, n) for _, n in kinds]
    for y, (_, dense) in zip(ys, weights):
        assert rel_err(y, oracle(x, dense)) < 1e-5


def test_linear_k_quant_needs_its_type():
    """A Q4_K row is as long as a Q4_0 row: Linear.ggml_ takes the type it is given, and refuses a row length that
    does not fit it."""
    with torch.device("meta"):
        assert Linear(512, 8).ggml_(2 * 144).ggml_type == ggml.Q4_0  # told by size alone
        layer = Linear(512, 8).ggml_(2 * 144, ggml.Q4_K)
        assert layer.ggml_type == ggml.Q4_K and layer.weight.shape == (8, 288) and "Q4_K" in repr(layer)
        with pytest.raises(ValueError, match="Q6_K"):
            Linear(512, 8).ggml_(2 * 144, ggml.Q6_K)
        with pytest.raises(ValueError, match="256"):
            Linear(576, 8).ggml_(2 * 144, ggml.Q4_K)  # 576 values are not whole super-blocks


# llama.cpp's Q4_K_M (and Q5_K_M with Q5_K for the rest): these in Q6_K, the rest Q4_K
Q4_K_M = {name: gguf.GGMLQuantizationType.Q6_K for name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight",
                                                              "output.weight")}


@pytest.mark.parametrize("base,mix", [(gguf.GGMLQuantizationType.Q4_K, Q4_K_M),
                                      (gguf.GGMLQuantizationType.Q5_K, Q4_K_M)], ids=["Q4_K_M", "Q5_K_M"])
def test_k_quant_model_decodes_on_its_blocks(base, mix, tmp_path, kernels):
    """A Q4_K_M / Q5_K_M-layout file keeps every matrix in its K-quant blocks; the prompt gives the dense (float32,
    gguf-dequantized) model's logits and every decoding product matches the oracle."""
    path = write_gguf(tmp_path / "m.gguf", base, types=mix)
    dense = verse.load(path, dtype=torch.float32)
    model = verse.load(path, dtype=torch.float32, gemm_impl="gguf")
    file = {t.name: int(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert {m.ggml_type for m in layers.values()} == {int(base), ggml.Q6_K}
    assert layers["layers.0.attn.wv"].ggml_type == ggml.Q6_K == file["blk.0.attn_v.weight"]
    assert layers["layers.0.attn.wq"].ggml_type == int(base) == file["blk.0.attn_q.weight"]
    dense_weights = dict(dense.named_parameters())
    for name, layer in layers.items():
        assert torch.equal(reference.dequantize(layer.weight, layer.ggml_type), dense_weights[f"{name}.weight"]), name
    x = tokens()
    with torch.no_grad():
        expected, got, first = dense(x), model(x), model(x[:, :4])
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert 0 < ((first - expected[:, :4]).abs().max() / expected.abs().max()).item() < 0.05


# llama.cpp's Q4_K_M / Q5_K_M of a model whose width is not whole super-blocks (SmolLM2-135M: 576): every matrix
# with rows of 576 values falls back from Q4_K to Q5_0 (Q5_K to Q5_1) and from Q6_K to Q8_0; ffn_down (rows of
# 1536) keeps its K-quant (here the test model's 256-wide rows stand in for both)
Q4_K_M_576 = {"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q4_K,
              "blk.0.attn_v.weight": gguf.GGMLQuantizationType.Q8_0, "output.weight": gguf.GGMLQuantizationType.Q8_0}
Q5_K_M_576 = {**Q4_K_M_576, "blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q5_K}


@pytest.mark.parametrize("base,mix", [(gguf.GGMLQuantizationType.Q4_K, Q4_K_M),
                                      (gguf.GGMLQuantizationType.Q5_0, Q4_K_M_576),
                                      (gguf.GGMLQuantizationType.Q5_1, Q5_K_M_576)],
                         ids=["Q4_K_M", "Q4_K_M-576", "Q5_K_M-576"])
def test_generate_on_q4_k_m_file_gives_the_dequantized_text(base, mix, tmp_path, capsys, monkeypatch, kernels):
    """`verse generate --gemm-impl gguf` on a Q4_K_M-layout file (byte tokenizer) decodes on the file's blocks (the
    kernel path: Q4_K/Q6_K, or the Q5_0/Q5_1 and Q8_0 a 576-wide model falls back to) and gives the same greedy text
    as the same file dequantized to float32."""
    from verse.cli import main

    module = importlib.import_module("verse.infer.generate")  # `verse.infer.generate` is also a function's name

    path = write_gguf(tmp_path / "m.gguf", base, types=mix, vocab=256, seed=3)
    kinds, ids = [], {}

    def recorded(x, weights, qtypes):
        kinds.extend(qtypes if x.reshape(-1, x.size(-1)).size(0) <= ggml.PREFILL_ROWS else ())
        return gemm_many(x, weights, qtypes)

    def streamed(*args, **kwargs):  # the token ids (the byte tokenizer decodes bytes >= 128 alike, as U+FFFD)
        for token in stream(*args, **kwargs):
            ids.setdefault(impl, []).append(token)
            yield token

    gemm_many, stream = ggml.gemm_many, module.stream
    monkeypatch.setattr(ggml, "gemm_many", recorded)
    monkeypatch.setattr(module, "stream", streamed)  # `verse generate` imports it when it runs
    out = {}
    for impl in ("gguf", "bf16"):
        argv = [str(path), "--tokenizer", "byte", "--prompt", "Hello", "--max-new-tokens", "12", "--dtype",
                "float32", "--gemm-impl", impl, "--json"]
        assert main(["generate", *argv]) == 0
        out[impl] = json.loads(capsys.readouterr().out)
    print({impl: (out[impl]["text"], ids[impl]) for impl in out})
    assert set(kinds) == {int(base), *map(int, mix.values())} and len(kinds) >= 11 * 8  # 11 steps x 8 matrices
    assert len(ids["gguf"]) == 12 and ids["gguf"] == ids["bf16"] and out["gguf"]["text"] == out["bf16"]["text"]


def test_a_killed_builds_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """torch's extension builder waits forever on the lock of a build that was killed; Verse removes a lock older than
    STALE_LOCK_S (with a message) and leaves a recent one (another process building now) alone."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = ggml._build_directory()
    assert build_dir.parent == tmp_path and build_dir.is_dir()
    lock = build_dir / "lock"
    lock.touch()
    assert ggml._build_directory() == build_dir and lock.exists()  # a build in progress: kept
    old = time.time() - ggml.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert ggml._build_directory() == build_dir and not lock.exists()
    assert "did not finish" in capsys.readouterr().err


def use_more_bits(layer, layers):
    """llama.cpp's rule (llama-quant.cpp) for the layers whose attn_v / ffn_down a Q4_K_M file keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_like(source, path):
    """`source` (a GGUF file) with every matrix requantized to the type llama.cpp's Q4_K_M picks for it
    (llama_tensor_get_type): Q6_K for the tied embedding / output and for attn_v, ffn_down of `use_more_bits`
    layers, Q4_K for the others; a matrix whose rows are not whole 256-value super-blocks falls back from Q4_K to
    Q5_0 and from Q6_K to Q8_0. Q5_0/Q8_0 by gguf.quants.quantize, the K-quants by reference.quantize_k (the plain
    min/max rule, not llama.cpp's search: a Q4_K_M-like file, not llama.cpp's bytes)."""
    Q = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    layers = reader.fields[f"{arch}.block_count"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if len(t.shape) == 1:
            writer.add_tensor(t.name, w)
            continue
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        more = t.name == "output.weight" or (tied and t.name == "token_embd.weight") or \
            t.name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, layers)
        kind = Q.Q6_K if more else Q.Q4_K
        w = w.reshape(int(t.shape[1]), int(t.shape[0]))
        if w.shape[1] % 256:
            blocks = gguf.quants.quantize(w, Q.Q8_0 if kind == Q.Q6_K else Q.Q5_0)
            kind = Q.Q8_0 if kind == Q.Q6_K else Q.Q5_0
        else:
            blocks = reference.quantize_k(torch.from_numpy(w), int(kind)).numpy()
        writer.add_tensor(t.name, blocks, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bench_reference_is_transformers_dense_model_of_the_file(tmp_path):
    """`verse bench generate`'s transformers reference of a quantized GGUF is the dense dequantized model in the
    asked dtype (asked for explicitly: where transformers has GGUF kernels it keeps blocks computed in float32)."""
    pytest.importorskip("transformers")
    from verse.bench.generate import load_transformers

    path = write_gguf(tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q4_1, tied=False)
    model = load_transformers(path, torch.bfloat16)
    linears = [m for m in model.modules() if "linear" in type(m).__name__.lower()]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    file = {t.name: t for t in gguf.GGUFReader(path).tensors}
    v = file["blk.0.attn_v.weight"]
    dense = torch.from_numpy(gguf.quants.dequantize(v.data, v.tensor_type).reshape(128, -1).copy())
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, dense.to(torch.bfloat16))
