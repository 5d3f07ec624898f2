"""Matrix products on the quantized blocks of GGUF files (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K,
Q5_K, Q6_K of Q4_K_M/Q5_K_M files, whose rows that are not whole 256-value super-blocks fall back to Q5_0, Q5_1
and Q8_0), as llama.cpp computes them.

`gemm_impl="gguf"` keeps a GGUF model's weights in their file blocks (0.56-1.06 bytes per weight instead of 2
for bf16), and every `Linear` multiplies them directly: decoding one token reads each weight once, so its
speed is set by those bytes. On x86 CPUs with AVX2 the products run in `cpu_kernels.cpp`, compiled with
the system C++ compiler the first time it is needed (`torch.utils.cpp_extension`, cached per machine); on
other devices, or when it cannot be built, in the PyTorch reference (`verse.ggml.reference`).
"""

import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from verse.ggml.reference import (BLOCK_BYTES, BLOCK_VALUES, NAMES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
                                  QK, block_type, row_bytes)
from verse.ggml import reference

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
STALE_LOCK_S = 600  # seconds after which a build lock is a killed build's leftover
PREFILL_ROWS = 16  # above this many rows of x, widen the weight once and use a dense float32 GEMM


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


def _build_directory() -> Path:
    """Where the kernels are built (under TORCH_EXTENSIONS_DIR or torch's default root), a stale build lock removed.

    torch's builder waits forever on the `lock` file of a build that was killed (Ctrl-C, kill -9, a timeout); a lock
    older than `STALE_LOCK_S` (a build takes under a minute) is such a leftover, and is removed with a message.
    """
    from torch.utils.cpp_extension import get_default_build_root

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / f"verse_ggml_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return build_dir
    if age > STALE_LOCK_S:
        print(f"verse: removing {lock}, left {age / 60:.0f} min ago by a kernel build that did not finish",
              file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)
    return build_dir


def _build() -> bool:
    try:
        import ninja  # torch's extension builder runs the `ninja` binary this package ships

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import load

        build_dir = _build_directory()
        print("verse: loading the AVX2 GGUF block kernels (built once per machine, about 20 s)",
              file=sys.stderr, flush=True)
        # -fopenmp: at::parallel_for is inline OpenMP; the library it links is the libgomp torch already loaded
        load(name="verse_ggml", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, a broken toolchain, ...: the reference computes the same sums
        print(f"verse: cannot build the GGUF block kernels ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
              f"; using the slower PyTorch reference", file=sys.stderr, flush=True)
        return False
    torch.library.register_fake("verse_ggml::gemm")(
        lambda x, blocks, qtypes: [x.new_empty(x.size(0), b.size(0)) for b in blocks])
    torch.library.register_fake("verse_ggml::dequantize")(
        lambda blocks, qtype: blocks.new_empty(blocks.size(0),
                                               blocks.size(1) // BLOCK_BYTES[qtype] * BLOCK_VALUES[qtype],
                                               dtype=torch.float32))
    return True


def _kernels_for(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and kernels_available()


def dequantize(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight stored in GGML `blocks` [N, K / block values * block bytes] as a dense [N, K] matrix in `dtype`."""
    if _kernels_for(blocks):
        return torch.ops.verse_ggml.dequantize(blocks, qtype).to(dtype)
    return reference.dequantize(blocks, qtype, dtype)


def gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """x W^T for a weight W in GGML blocks: [..., K] -> [..., N] in `x`'s dtype, accumulated in float32.

    Up to `PREFILL_ROWS` rows of x (decoding) are first rounded to 8 bits per block of 32, as llama.cpp does
    (`reference.round_activations`), so the kernels multiply integers; longer inputs (prompts) multiply the
    widened weight in float32 with x as it is, which costs no speed there and keeps the first token exact.

    Args:
        x (torch.Tensor): activations [..., K].
        blocks (torch.Tensor): uint8 [N, K / block values * block bytes].
        qtype (int): a type of `NAMES`.

    Returns:
        torch.Tensor: [..., N].
    """
    return gemm_many(x, [blocks], [qtype])[0]


def gemm_many(x: torch.Tensor, blocks: Sequence[torch.Tensor], qtypes: Sequence[int]) -> List[torch.Tensor]:
    """`gemm` of one input with several weights (a layer's query/key/value projections, say) in one kernel call:
    the input is rounded once and one parallel loop covers every weight's rows.

    Args:
        x (torch.Tensor): activations [..., K].
        blocks (Sequence[torch.Tensor]): uint8 weights [N_i, K / block values * block bytes].
        qtypes (Sequence[int]): their GGML types.

    Returns:
        List[torch.Tensor]: [..., N_i] each, in `x`'s dtype.
    """
    x2 = x.reshape(-1, x.size(-1))
    if x2.size(0) > PREFILL_ROWS:  # a prompt: widen each weight once and multiply in float32 (x not rounded)
        ys = [x2.float() @ dequantize(b, t).T for b, t in zip(blocks, qtypes)]
    elif _kernels_for(x):
        ys = torch.ops.verse_ggml.gemm(x2.float(), list(blocks), list(qtypes))
    else:
        ys = [reference.gemm(x2, b, t) for b, t in zip(blocks, qtypes)]
    return [y.to(x.dtype).view(*x.shape[:-1], b.size(0)) for y, b in zip(ys, blocks)]


HUGE_PAGE = 2 << 20


def pack(blocks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Copy weight blocks into one buffer backed by 2 MB pages where the OS allows it, in the given order.

    Decoding streams every weight once per token; on 4 KB pages that is one TLB miss per 4 KB (~25,000 per
    token for a 100 MB model), and huge pages made the kernels' streaming ~10% faster on the EPYC CPUs we
    measured (`madvise(MADV_HUGEPAGE)`; Linux only, a no-op elsewhere).

    Args:
        blocks (Sequence[torch.Tensor]): contiguous CPU uint8 weights.

    Returns:
        List[torch.Tensor]: views of the buffer, equal to `blocks`.
    """
    sizes = [b.numel() for b in blocks]
    buffer = torch.empty(sum(sizes) + HUGE_PAGE, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    _advise_huge_pages(buffer.data_ptr() + start, sum(sizes))
    views, offset = [], start
    for b, n in zip(blocks, sizes):
        views.append(buffer[offset:offset + n].view(b.shape).copy_(b))
        offset += n
    return views


def _advise_huge_pages(address: int, length: int) -> None:
    if not sys.platform.startswith("linux") or length < HUGE_PAGE:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(address, length - length % HUGE_PAGE, 14)  # MADV_HUGEPAGE; failure only costs speed


__all__ = ["BLOCK_BYTES", "BLOCK_VALUES", "NAMES", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "QK",
           "block_type", "dequantize", "gemm", "gemm_many", "pack", "kernels_available", "row_bytes"]
