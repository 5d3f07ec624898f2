"""FP8 block quantization: act_quant / weight_quant / weight_dequant / fp8_gemm against hand-derived bounds and
DeepSeek-V3's blockwise GEMM formula, FP8 `Linear` in both `gemm_impl`s, and Triton vs reference on CUDA."""

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse import fp8
from verse.model.linear import Linear, fp8_layers, quantize_, set_gemm_impl

B = 128
E4M3_MAX = 448.0
# float8_e4m3fn keeps 3 mantissa bits: rounding to nearest errs by at most 2^-4 of the value in the normal
# range, and by half the subnormal spacing 2^-9 below 2^-6.
REL_ERR, ABS_ERR = 2.0 ** -4, 2.0 ** -10


def hand_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.size(0)):
        for j in range(s.size(1)):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] = q[i * B:(i + 1) * B, j * B:(j + 1) * B].float() * s[i, j]
    return out


def test_act_quant_scales_and_error_bound():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 384) * torch.logspace(-3, 3, 5).view(1, 5, 1)
    x[0, 0, :B] = 0.0  # an all-zero block must not give NaN
    y, s = fp8.act_quant(x)
    assert y.dtype == torch.float8_e4m3fn and y.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, 3)
    for t in range(3):
        for r in range(5):
            for j in range(3):
                block = x[t, r, j * B:(j + 1) * B]
                amax = block.abs().max().item()
                if amax == 0:
                    assert torch.all(y[t, r, j * B:(j + 1) * B].float() == 0)
                    continue
                assert s[t, r, j].item() == pytest.approx(amax / E4M3_MAX, rel=1e-6)
                # the largest element lands on the top of the e4m3 range
                assert y[t, r, j * B:(j + 1) * B].float().abs().max().item() == E4M3_MAX
    scale = s.repeat_interleave(B, -1)
    err = (y.float() * scale - x).abs()
    assert torch.all(err <= REL_ERR * x.abs() + ABS_ERR * scale + 1e-6 * x.abs())


@pytest.mark.parametrize("K", [64, 100, 200])
def test_act_quant_partial_last_block(K):
    """K not a multiple of 128 (bytegpt-tiny's 64-wide MLA latent): the last block's scale is its own amax / 448."""
    torch.manual_seed(9)
    x = torch.randn(3, K) * 5
    y, s = fp8.act_quant(x)
    assert y.shape == x.shape and s.shape == (3, -(-K // B))
    for j in range(s.size(1)):
        block = x[:, j * B:(j + 1) * B]
        assert torch.equal(s[:, j], (block.double().abs().amax(-1) / E4M3_MAX).float())
    assert torch.equal(y.view(torch.uint8), (x / s.repeat_interleave(B, -1)[:, :K]).to(torch.float8_e4m3fn)
                       .view(torch.uint8))
    w_q, w_s = fp8.weight_quant(torch.randn(96, K))
    c = fp8.fp8_gemm(y, s, w_q, w_s, dtype=torch.float32)
    want = (y.float() * s.repeat_interleave(B, -1)[:, :K]) @ hand_dequant(w_q, w_s).T
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)


def test_weight_quant_dequant_partial_blocks():
    torch.manual_seed(1)
    w = torch.randn(300, 200)
    q, s = fp8.weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert s[i, j].item() == pytest.approx(w[i * B:(i + 1) * B, j * B:(j + 1) * B].abs().max().item()
                                                   / E4M3_MAX, rel=1e-6)
    expected = hand_dequant(q, s)
    assert torch.equal(fp8.weight_dequant(q, s, dtype=torch.float32), expected)
    assert torch.equal(fp8.weight_dequant(q, s, dtype=torch.bfloat16), expected.to(torch.bfloat16))
    scale = s.repeat_interleave(B, 0)[:300].repeat_interleave(B, 1)[:, :200]
    assert torch.all((expected - w).abs() <= REL_ERR * w.abs() + ABS_ERR * scale + 1e-6 * w.abs())
    with pytest.raises(ValueError, match="does not match"):
        fp8.weight_dequant(q, s[:, :1])


def test_fp8_gemm_matches_deepseek_blockwise_formula_and_error_bound():
    torch.manual_seed(2)
    M, N, K = 64, 384, 512
    a, w = torch.randn(M, K), torch.randn(N, K)
    a_q, a_s = fp8.act_quant(a)
    w_q, w_s = fp8.weight_quant(w)
    c = fp8.fp8_gemm(a_q, a_s, w_q, w_s, dtype=torch.float32)
    # DeepSeek-V3 kernel: per K-block, (A_blk B_blk^T) * a_scale[m] * b_scale[n // 128], summed in float32
    blockwise = torch.zeros(M, N)
    for kb in range(K // B):
        part = a_q[:, kb * B:(kb + 1) * B].float() @ w_q[:, kb * B:(kb + 1) * B].float().T
        blockwise += part * a_s[:, kb, None] * w_s[torch.arange(N) // B, kb][None, :]
    torch.testing.assert_close(c, blockwise, rtol=1e-5, atol=1e-4)
    # each operand errs elementwise by at most REL_ERR |v| + ABS_ERR * scale
    a_err = REL_ERR * a.abs() + ABS_ERR * a_s.repeat_interleave(B, -1)
    w_err = REL_ERR * w.abs() + ABS_ERR * w_s.repeat_interleave(B, 0)[:N].repeat_interleave(B, 1)
    bound = a.abs() @ w_err.T + a_err @ w.abs().T + a_err @ w_err.T
    exact = a.double() @ w.double().T
    assert torch.all((c.double() - exact).abs() <= bound.double() * 1.001 + 1e-3)
    rel = ((c.double() - exact).norm() / exact.norm()).item()
    bf16_rel = (((a.bfloat16() @ w.bfloat16().T).double() - exact).norm() / exact.norm()).item()
    print(f"fp8_gemm relative error vs float64: {rel:.4f}; bf16 matmul: {bf16_rel:.4f}")
    assert rel < 0.05  # Gaussian data: about 2^-4 / sqrt(3) per operand, ~3.5% together


def tiny_fp8_args(**overrides) -> ModelArgs:
    # every Linear input width a multiple of 128, so gemm_impl="fp8" can quantize activations
    return ModelArgs.from_preset("tiny", dim=128, n_heads=2, n_kv_heads=1, inter_dim=256, vocab_size=256,
                                 dtype="float32", **overrides)


def test_fp8_linear_bf16_impl_equals_dequantized_weights():
    torch.manual_seed(3)
    model = ReasoningLLM(tiny_fp8_args())
    quantize_(model)
    plain = ReasoningLLM(tiny_fp8_args())
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".scale"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = hand_dequant(tensor, model.state_dict()[name.removesuffix("weight") + "scale"])
        state[name] = tensor
    plain.load_state_dict(state)
    x = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fp8_linear_fp8_impl_error_bound():
    torch.manual_seed(4)
    layer = Linear(256, 192, gemm_impl="fp8")
    w = layer.weight.detach().clone()
    layer.quantize_()
    w_deq = hand_dequant(layer.weight, layer.scale)
    x = torch.randn(4, 7, 256)
    y = layer(x)
    _, x_s = fp8.act_quant(x)
    x_err = REL_ERR * x.abs() + ABS_ERR * x_s.repeat_interleave(B, -1)
    exact = x @ w_deq.T
    assert torch.all((y - exact).abs() <= x_err @ w_deq.abs().T * 1.001 + 1e-5)
    assert not torch.equal(w, w_deq)  # the weight really went through FP8


def test_fp8_checkpoint_loads_into_meta_model_and_survives_dtype_cast():
    torch.manual_seed(5)
    model = quantize_(ReasoningLLM(tiny_fp8_args()), names={"layers.0.attn.wq", "layers.1.ffn.w2"})
    state = model.state_dict()
    assert fp8_layers(state) == {"layers.0.attn.wq", "layers.1.ffn.w2"}
    assert state["layers.0.attn.wq.scale"].shape == (1, 1) and state["layers.1.ffn.w2.scale"].shape == (1, 2)
    with torch.device("meta"):
        fresh = ReasoningLLM(tiny_fp8_args())
    quantize_(fresh, fp8_layers(state))
    fresh.load_state_dict(state, assign=True)
    fresh.reset_buffers()
    x = torch.randint(0, 256, (1, 9))
    for impl in ("bf16", "fp8"):
        assert torch.equal(set_gemm_impl(fresh, impl)(x), set_gemm_impl(model, impl)(x))
    fresh.to(torch.bfloat16)
    wq = fresh.layers[0].attn.wq
    assert wq.weight.dtype == torch.float8_e4m3fn and wq.scale.dtype == torch.float32
    assert torch.equal(wq.weight.float(), state["layers.0.attn.wq.weight"].float())
    assert torch.equal(wq.scale, state["layers.0.attn.wq.scale"])
    assert fresh.layers[0].attn.wk.weight.dtype == torch.bfloat16
    assert fresh(x).dtype == torch.bfloat16


def test_import_without_triton_uses_reference():
    assert not fp8.triton_available(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_matches_reference_on_cuda():
    from verse.fp8 import reference

    if not fp8.triton_available(torch.zeros(1, device="cuda")):
        pytest.skip("Triton missing or GPU without FP8 (compute capability < 8.9)")
    torch.manual_seed(6)
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16) * 4
    y, s = fp8.act_quant(x)
    y_ref, s_ref = reference.act_quant(x)
    assert torch.equal(s, s_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
    w_q, w_s = reference.weight_quant(torch.randn(300, 512, device="cuda"))
    assert torch.equal(fp8.weight_dequant(w_q, w_s, dtype=torch.bfloat16),
                       reference.weight_dequant(w_q, w_s, dtype=torch.bfloat16))
    c = fp8.fp8_gemm(y, s, w_q, w_s, dtype=torch.float32)
    c_ref = reference.fp8_gemm(y, s, w_q, w_s, dtype=torch.float32)
    print(f"Triton vs reference fp8_gemm: max |diff| / max |c| = {((c - c_ref).abs().max() / c_ref.abs().max()):.2e}")
    torch.testing.assert_close(c, c_ref, rtol=2e-3, atol=2e-3 * c_ref.abs().max().item())


def test_reference_scales_divide_by_a_tensor_never_a_python_number():
    """CUDA PyTorch computes `t / 448.0` as `t * (1 / 448.0)` (BinaryDivTrueKernel.cu: a CPU-scalar divisor becomes
    a reciprocal), one bit off the Triton kernel's correctly rounded `div_rn` for about half of all scales; every
    division in the reference must therefore have a tensor divisor, and its scales are the correctly rounded
    float64 quotient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from verse.fp8 import reference

    divisions = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_):
                divisions.append((str(func), type(args[1]).__name__,
                                  getattr(args[1], "device", None) == getattr(args[0], "device", None)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(8)
    x, w = torch.randn(5, 256) * 3, torch.randn(200, 300)
    with Record():
        _, s = reference.act_quant(x)
        _, w_s = reference.weight_quant(w)
    assert divisions and all(kind == "Tensor" and same for _, kind, same in divisions), divisions
    amax = x.unflatten(-1, (-1, B)).abs().amax(-1).double()
    assert torch.equal(s, (amax / E4M3_MAX).float())
    padded = torch.nn.functional.pad(w, (0, 84, 0, 56)).double()
    w_amax = padded.unflatten(0, (-1, B)).unflatten(-1, (-1, B)).abs().amax(dim=(1, 3))
    assert torch.equal(w_s, (w_amax / E4M3_MAX).float())


TRITON_INTERPRETED = """
import torch
from verse.fp8 import reference as R, triton_kernels as T

torch.manual_seed(6)
x = torch.randn(33, 512, dtype=torch.bfloat16) * 4
x[0, :128] = 0.0
for x in (x, x[:, :200].contiguous(), x[:, :64].contiguous()):  # whole blocks, a partial last block, K < 128
    K, n = x.size(1), -(-x.size(1) // 128)
    s, q = torch.empty(33, n), torch.empty(33, K)
    # a float32 output buffer keeps the kernel's quotients x / s before the FP8 cast (see the test's docstring)
    T.act_quant_kernel[(33, n)](x, q, s, K, BLOCK_SIZE=128)
    y_ref, s_ref = R.act_quant(x)
    q_ref = x.float() / s_ref.repeat_interleave(128, -1)[:, :K]
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32)), f"block scales differ (K={K})"
    assert torch.equal(q.view(torch.int32), q_ref.view(torch.int32)), f"quotients differ (K={K})"
    assert torch.equal(q.to(torch.float8_e4m3fn).view(torch.uint8), y_ref.view(torch.uint8))
w_q, w_s = R.weight_quant(torch.randn(300, 200))
assert torch.equal(T.weight_dequant(w_q, w_s, dtype=torch.float32), R.weight_dequant(w_q, w_s, dtype=torch.float32))
print("bit-exact")
"""


def test_triton_kernels_match_reference_bit_for_bit_in_interpreter():
    """The Triton kernels, run on CPU by Triton's interpreter, give the reference's scales and quotients bit for bit.

    The interpreter emulates two casts imprecisely (float32 -> float8 misrounds values that carry into the next
    binade, e.g. 126.85 -> 64; float32 -> bfloat16 truncates), so the kernel writes its float32 quotients and
    torch casts them; the compiled kernels' casts (round to nearest, saturating) are checked in the PTX by
    `test_triton_kernels_compile_for_hopper`. `fp8_gemm` (FP8 tensor-core dot) is not run: not bit-exact by design.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", TRITON_INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "bit-exact" in done.stdout, done.stderr[-3000:]


def test_dequantized_weight():
    torch.manual_seed(7)
    layer = Linear(200, 300)
    assert layer.dequantized_weight() is layer.weight
    layer.quantize_()
    assert torch.equal(layer.dequantized_weight(torch.float32), hand_dequant(layer.weight, layer.scale))


def test_triton_kernels_compile_for_hopper():
    """Without a GPU, Triton still compiles the kernels to sm_90 machine code: catches kernel-language errors,
    and checks the correctly rounded division and saturating round-to-nearest FP8 cast the reference matches."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from verse.fp8 import triton_kernels as T

    def compile_ptx(fn, signature, constants):
        signature = {**signature, **dict.fromkeys(constants, "constexpr")}
        consts = {(list(signature).index(name),): value for name, value in constants.items()}
        return triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    ptx = compile_ptx(T.act_quant_kernel, {"x_ptr": "*bf16", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32"},
                      {"BLOCK_SIZE": 128})
    assert "div.rn.f32" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
    ptx = compile_ptx(T.weight_dequant_kernel, {"x_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32",
                                                "N": "i32"}, {"BLOCK_SIZE": 128})
    assert "cvt.rn.bf16.f32" in ptx
    ptx = compile_ptx(T.fp8_gemm_kernel.fn, {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16",
                                             "a_s_ptr": "*fp32", "b_s_ptr": "*fp32", "M": "i32"},
                      {"N": 512, "K": 1024, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128})
    assert ".f32.e4m3.e4m3" in ptx  # Hopper FP8 tensor-core MMA (wgmma) accumulating in float32


def test_quantize_keeps_tied_head():
    model = quantize_(ReasoningLLM(tiny_fp8_args(tie_embeddings=True)))
    assert model.head.weight is model.embed.weight and not model.head.is_fp8
    assert model.layers[0].ffn.w1.is_fp8


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", dict(dim=128, n_heads=2, n_kv_heads=1, inter_dim=256, vocab_size=256)),  # Llama layout
    ("bytegpt-tiny", {}),  # DeepSeek-V3 layout (MLA + MoE), 64-wide latent inputs below the 128 block
])
def test_quantized_model_saves_as_deepseek_fp8_and_loads_with_the_same_logits(tmp_path, preset, overrides):
    import json

    from safetensors import safe_open

    import verse

    torch.manual_seed(10)
    model = quantize_(ReasoningLLM(ModelArgs.from_preset(preset, dtype="float32", **overrides)).eval())
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [B, B]
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        scales = [n for n in names if n.endswith(".weight_scale_inv")]
        assert scales and all(f.get_tensor(n).dtype == torch.float32 for n in scales)
        assert all(f.get_tensor(n.removesuffix("_scale_inv")).dtype == torch.float8_e4m3fn for n in scales)
    fp8_names = {n for n, m in model.named_modules() if getattr(m, "is_fp8", False)}
    assert len(scales) == len(fp8_names)
    x = torch.randint(0, 250, (2, 9))
    for impl in ("bf16", "fp8"):
        loaded = verse.load(tmp_path / "ckpt", gemm_impl=impl)
        assert {n for n, m in loaded.named_modules() if getattr(m, "is_fp8", False)} == fp8_names
        assert all(m.gemm_impl == impl for m in loaded.modules() if isinstance(m, Linear))
        assert torch.equal(loaded(x), set_gemm_impl(model, impl)(x))  # the in-memory model runs the same GEMMs


def test_fp8_gemm_runs_bytegpt_tiny_close_to_its_dequantized_weights():
    torch.manual_seed(11)
    model = quantize_(ReasoningLLM(ModelArgs.from_preset("bytegpt-tiny", dtype="float32")).eval())
    x = torch.randint(0, 256, (2, 17))
    exact = set_gemm_impl(model, "bf16")(x)  # weights dequantized, activations exact
    got = set_gemm_impl(model, "fp8")(x)  # activations quantized too
    assert ((got - exact).norm() / exact.norm()).item() < 0.05


def test_gemm_impl_fp8_on_a_checkpoint_without_fp8_weights_quantizes_on_load(tmp_path, caplog):
    import verse

    torch.manual_seed(12)
    model = ReasoningLLM(tiny_fp8_args()).eval()
    model.save_pretrained(tmp_path / "plain")
    with caplog.at_level("WARNING", logger="verse.load"):
        loaded = verse.load(tmp_path / "plain", gemm_impl="fp8")
    assert "holds no FP8 weights" in caplog.text and "quantized to FP8" in caplog.text
    assert loaded.layers[0].attn.wq.is_fp8 and loaded.layers[1].ffn.w2.is_fp8
    x = torch.randint(0, 256, (1, 7))
    expected = set_gemm_impl(quantize_(model), "fp8")(x)  # the same FP8 GEMMs on the same quantized weights
    assert torch.equal(loaded(x), expected)


def test_gemm_impl_is_per_model():
    """Defect 5: building a bf16 model after an fp8 one must not switch the fp8 model's GEMMs (it used to: a
    module-level switch). Oracle: the fp8 path's error bound vs the exact product, which bf16 (dequantize) does
    not show: the fp8 model's logits must differ from the dequantized ones, and equal a lone fp8 model's."""
    torch.manual_seed(6)
    fp8_model = quantize_(ReasoningLLM(tiny_fp8_args(gemm_impl="fp8")))
    x = torch.randint(0, 256, (2, 11))
    alone = fp8_model(x)
    bf16_model = quantize_(ReasoningLLM(tiny_fp8_args(gemm_impl="bf16")))
    bf16_model.load_state_dict(fp8_model.state_dict())  # the same FP8 weights
    assert fp8_model.args.gemm_impl == "fp8" and fp8_model.layers[0].attn.wq.gemm_impl == "fp8"
    assert bf16_model.layers[0].attn.wq.gemm_impl == "bf16"
    assert torch.equal(fp8_model(x), alone)
    assert not torch.equal(bf16_model(x), alone)  # activations quantized only on the fp8 path
    torch.testing.assert_close(bf16_model(x), alone, rtol=0.1, atol=0.1)
