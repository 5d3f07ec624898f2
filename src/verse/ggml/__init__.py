"""Matrix products on the quantized blocks of GGUF files (Q4_0, Q4_1, Q8_0), as llama.cpp computes them.

`gemm_impl="gguf"` keeps a GGUF model's weights in their file blocks (0.56-1.06 bytes per weight instead of 2
for bf16), and every `Linear` multiplies them directly: decoding one token reads each weight once, so its
speed is set by those bytes. On x86 CPUs with AVX2 the products run in `cpu_kernels.cpp`, compiled with
the system C++ compiler the first time it is needed (`torch.utils.cpp_extension`, cached per machine); on
other devices, or when it cannot be built, in the PyTorch reference (`verse.ggml.reference`).
"""

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from verse.ggml.reference import BLOCK_BYTES, NAMES, Q4_0, Q4_1, Q8_0, QK, block_type
from verse.ggml import reference

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
PREFILL_ROWS = 16  # above this many rows, widen the weight once and use a dense GEMM


def _cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


_built: Optional[bool] = None  # whether the kernels are loaded; None until first asked


def kernels_available() -> bool:
    """Whether the AVX2 kernels are built (building them the first time; False if this CPU or machine cannot).

    Returns:
        bool: True when `torch.ops.verse_ggml` is loaded.
    """
    global _built
    if _built is None:
        _built = _cpu_supported() and _build()
    return _built


def _build() -> bool:
    try:
        import ninja  # torch's extension builder runs the `ninja` binary this package ships

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import load

        print("verse: loading the AVX2 GGUF block kernels (built once per machine, about a minute)",
              file=sys.stderr, flush=True)
        load(name="verse_ggml", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
             extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, a broken toolchain, ...: the reference still gives the same numbers
        print(f"verse: cannot build the GGUF block kernels ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
              f"; using the slower PyTorch reference", file=sys.stderr, flush=True)
        return False
    torch.library.register_fake("verse_ggml::gemm")(
        lambda x, blocks, qtype: x.new_empty(x.size(0), blocks.size(0)))
    torch.library.register_fake("verse_ggml::dequantize")(
        lambda blocks, qtype: blocks.new_empty(blocks.size(0), blocks.size(1) // BLOCK_BYTES[qtype] * QK,
                                               dtype=torch.float32))
    return True


def _kernels_for(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and kernels_available()


def dequantize(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight stored in GGML `blocks` [N, K/32 * block bytes] as a dense [N, K] matrix in `dtype`."""
    if _kernels_for(blocks):
        return torch.ops.verse_ggml.dequantize(blocks, qtype).to(dtype)
    return reference.dequantize(blocks, qtype, dtype)


def gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """x W^T for a weight W in GGML blocks: [..., K] -> [..., N] in `x`'s dtype, accumulated in float32.

    Args:
        x (torch.Tensor): activations [..., K].
        blocks (torch.Tensor): uint8 [N, K/32 * block bytes].
        qtype (int): Q4_0, Q4_1 or Q8_0.

    Returns:
        torch.Tensor: [..., N].
    """
    x2 = x.reshape(-1, x.size(-1))
    if not _kernels_for(x):
        y = reference.gemm(x2, blocks, qtype)
    elif x2.size(0) > PREFILL_ROWS:
        y = x2.float() @ torch.ops.verse_ggml.dequantize(blocks, qtype).T
    else:
        y = torch.ops.verse_ggml.gemm(x2.float(), blocks, qtype)
    return y.to(x.dtype).view(*x.shape[:-1], blocks.size(0))


__all__ = ["BLOCK_BYTES", "NAMES", "Q4_0", "Q4_1", "Q8_0", "QK", "block_type", "dequantize", "gemm",
           "kernels_available"]
