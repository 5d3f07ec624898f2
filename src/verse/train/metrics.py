"""Run visibility: FLOPs and MFU, memory, `metrics.jsonl`, TensorBoard (when installed) and the loss plot."""

import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from verse.config import ModelArgs, count_params
from verse.model.transformer import torch_dtype

GiB = 2**30
# Every GPU Verse knows: usable memory (bytes), dense bf16 tensor-core peak FLOP/s (no sparsity; the vendors'
# data sheets) and the words of `torch.cuda.get_device_name()` that identify it. Entries are matched in this order,
# so a name that contains another's words comes first (A100 before A10G, L40S before L4, H100 PCIe before H100).
# "link" and "network" are the bytes/s one GPU sends per direction to the GPUs of its node (NVLink, else PCIe x16)
# and to other nodes (its share of a typical node's InfiniBand/Ethernet NICs): what `verse plan --gpus` assumes.
GPUS: Dict[str, Dict[str, Any]] = {
    "a100-40gb": {"memory": 40 * GiB, "flops": 312e12, "link": 300e9, "network": 25e9, "match": ("a100", "40gb")},
    "a100-80gb": {"memory": 80 * GiB, "flops": 312e12, "link": 300e9, "network": 25e9, "match": ("a100",)},
    "h100-pcie": {"memory": 80 * GiB, "flops": 756e12, "link": 64e9, "network": 50e9, "match": ("h100", "pcie")},
    "h100-80gb": {"memory": 80 * GiB, "flops": 989e12, "link": 450e9, "network": 50e9, "match": ("h100",)},
    "h200": {"memory": 141 * GiB, "flops": 989e12, "link": 450e9, "network": 50e9, "match": ("h200",)},
    "l40s": {"memory": 48 * GiB, "flops": 362e12, "link": 32e9, "network": 12.5e9, "match": ("l40s",)},
    "l4": {"memory": 24 * GiB, "flops": 121e12, "link": 32e9, "network": 12.5e9, "match": ("l4",)},
    "a10g": {"memory": 24 * GiB, "flops": 125e12, "link": 32e9, "network": 12.5e9, "match": ("a10",)},
    "rtx-4090": {"memory": 24 * GiB, "flops": 165e12, "link": 32e9, "network": 12.5e9, "match": ("4090",)},
    "rtx-3090": {"memory": 24 * GiB, "flops": 71e12, "link": 32e9, "network": 12.5e9, "match": ("3090",)},
    "v100": {"memory": 32 * GiB, "flops": 125e12, "link": 150e9, "network": 12.5e9, "match": ("v100",)},
}
GPUS_PER_NODE = 8  # a collective whose ranks span more than this many consecutive ranks crosses nodes
UNKNOWN_GPU_FLOPS = 100e12


def gpu_key(device_name: str) -> Optional[str]:
    """The `GPUS` key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100-80gb"), None when unknown."""
    name = device_name.lower()
    return next((key for key, spec in GPUS.items() if all(word in name for word in spec["match"])), None)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + attention (PaLM, Chowdhery et al. 2022, App. B).

    Args:
        args (ModelArgs): the model.
        seq_len (int): tokens per sequence.

    Returns:
        float: forward + backward FLOPs per token.
    """
    n = count_params(args, active=True)
    if not args.tie_embeddings:  # the embedding lookup is no matmul; a tied matrix is counted once, as the head
        n -= args.vocab_size * args.dim
    if args.attention == "mla":
        qk, v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    else:
        qk = v = args.head_dim
    span = min(seq_len, args.sliding_window or seq_len)
    # QK^T and AV: 2 FLOPs per multiply-add, x3 for forward + backward, causal halves the average span
    attention = 6 * args.n_layers * args.n_heads * (qk + v) * span / 2
    return 6 * n + attention


def compute_dtype(precision: str, param_dtype: str) -> torch.dtype:
    """The dtype a training step's matmuls run in: bf16 under bf16 autocast, else the parameters' dtype (fp8
    counts as bf16: its MFU is against the bf16 peak, so that it compares with a bf16 run)."""
    return torch.bfloat16 if precision in ("bf16", "fp8") else torch_dtype(param_dtype)


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak matmul FLOP/s of `device` in `dtype`: the bf16 data-sheet number of a known GPU; on CPU measured.

    On CPU the rate is measured with square matmuls in `dtype` on the current thread count (a CPU with
    AVX512-BF16 or AMX runs bf16 faster than fp32, one without emulates it far slower), once per dtype and thread
    count in a process.

    Args:
        device (torch.device): where the step runs.
        dtype (torch.dtype): the step's compute dtype (`compute_dtype`).

    Returns:
        float: FLOP/s.
    """
    if device.type == "cuda":
        key = gpu_key(torch.cuda.get_device_name(device))
        return GPUS[key]["flops"] if key else UNKNOWN_GPU_FLOPS
    return _cpu_matmul_flops(dtype, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _cpu_matmul_flops(dtype: torch.dtype, threads: int, seconds: float = 0.5) -> float:
    """`matmul_flops` on CPU, once per dtype and thread count in a process."""
    return matmul_flops(torch.device("cpu"), dtype, seconds)


def matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best measured rate of square matmuls in `dtype` on `device` (uncached: a benchmark measures it on the spot).

    n x n matmuls (n = 1024 and 2048 on CPU, 4096 and 8192 on GPU), each size timed for at least `seconds` and 3
    runs, the fastest run kept: a shared machine only ever makes a run slower, and an underestimated peak reports
    MFU above 100 %.

    Args:
        device (torch.device): where to measure.
        dtype (torch.dtype): the step's compute dtype (`compute_dtype`).
        seconds (float): least time spent per size.

    Returns:
        float: FLOP/s.
    """
    cuda = device.type == "cuda"
    best = 0.0
    for n in (4096, 8192) if cuda else (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warm-up: kernel selection, page faults
        runs, spent, fastest = 0, 0.0, float("inf")
        while runs < 3 or spent < seconds:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            fastest, spent, runs = min(fastest, elapsed), spent + elapsed, runs + 1
        best = max(best, 2 * n**3 / fastest)
    return best


def device_name(device: torch.device) -> str:
    """The processor a step runs on, for benchmark output: the GPU's name, or the CPU's model and its matmul ISA."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor() or "CPU"
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags][:1]
    return " ".join([fields.get("model name", "CPU"), *isa, f"{torch.get_num_threads()} threads"])


def mfu(args: ModelArgs, tokens: float, seconds: float, seq_len: int, peak_flops: float) -> Optional[float]:
    """Model FLOPs utilisation: `tokens` trained in `seconds` (`flops_per_token`: 6 N + attention) over the peak.

    The one formula of the progress bar, `metrics.jsonl`, the quickstart card and `verse bench train`. A value
    above 1 means the peak is wrong, not that the step is fast: it is reported once as a warning and returned as
    None (never printed as a number).

    Args:
        args (ModelArgs): the model (active parameters for MoE).
        tokens (float): tokens processed (every sequence position).
        seconds (float): wall time they took.
        seq_len (int): tokens per sequence (the attention term).
        peak_flops (float): the device's peak FLOP/s in the step's dtype (`device_peak_flops`).

    Returns:
        Optional[float]: a fraction in [0, 1], or None when the measured rate exceeds the peak.
    """
    value = tokens * flops_per_token(args, seq_len) / (seconds * peak_flops)
    if value > 1:
        warnings.warn(f"MFU computed above 100 % ({value:.0%}): the peak of {peak_flops / 1e12:.3g} TFLOP/s is too "
                      "low for this device; set peak_flops= to its real peak (MFU is left out until then)",
                      RuntimeWarning, stacklevel=2)
        return None
    return value


def memory_bytes(device: torch.device) -> Dict[str, int]:
    """Current and peak memory: CUDA allocator stats, or the process RSS / high-water mark on CPU."""
    if device.type == "cuda":
        return {"memory_bytes": torch.cuda.memory_allocated(device),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"memory_bytes": int(fields["VmRSS"].split()[0]) * 1024,
                "peak_memory_bytes": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        return {}


def moe_stats(model: torch.nn.Module) -> Dict[str, Any]:
    """Expert load since the last call (then reset) and the balance loss, over the model's MoE layers.

    Returns:
        Dict[str, Any]: `moe_load_max` (busiest expert over the mean, worst layer), `moe_load_min`, `moe_entropy`
        (mean over layers; 1 = balanced), `moe_dropped` (experts without tokens, all layers), `moe_aux_loss`.
    """
    layers = getattr(model, "moe_layers", {})
    if not layers:
        return {}
    stats = [moe.stats(reset=True) for moe in layers.values()]
    record = {"moe_load_max": max(s["load_max"] for s in stats), "moe_load_min": min(s["load_min"] for s in stats),
              "moe_entropy": sum(s["entropy"] for s in stats) / len(stats),
              "moe_dropped": sum(s["dropped"] for s in stats)}
    aux = [moe.aux_loss for moe in layers.values() if moe.aux_loss is not None]
    if aux:
        record["moe_aux_loss"] = float(sum(a.item() for a in aux))
    return record


class MetricsLog:
    """Appends one JSON object per step to `metrics.jsonl`, mirrored to TensorBoard when it is installed.

    Args:
        run_dir (Path): the run directory.
        tensorboard (bool): also write TensorBoard event files (under `run_dir/tb`).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                pass

    def log(self, record: Dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path, after_step: Optional[int] = None) -> List[Dict[str, Any]]:
    """Records of `metrics.jsonl` (a resumed run may repeat steps: the last record of each step wins); lines that
    are not such records (a line cut by a kill -9, a hand edit) are left out (`count_bad_metrics` counts them)."""
    records, _ = _parse_metrics(Path(run_dir) / "metrics.jsonl")
    return [r for r in records if after_step is None or r["step"] > after_step]


def count_bad_metrics(run_dir: Path) -> int:
    """How many lines of a run's `metrics.jsonl` `read_metrics` leaves out."""
    return _parse_metrics(Path(run_dir) / "metrics.jsonl")[1]


def _parse_metrics(path: Path) -> Tuple[List[Dict[str, Any]], int]:
    if not path.is_file():
        return [], 0
    by_step: Dict[Any, Dict[str, Any]] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not _is_record(record):
            bad += 1
            continue
        by_step[(record.get("kind", "train"), record["step"])] = record
    return sorted(by_step.values(), key=lambda r: r["step"]), bad


def _is_record(record: Any) -> bool:
    """A metrics record: an object with an integer step and numbers (or null) where the plot reads them."""
    number = (int, float, type(None))
    return (isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
            and isinstance(record.get("kind", "train"), str)
            and all(isinstance(record.get(k), number) and not isinstance(record.get(k), bool)
                    for k in ("loss", "eval_loss", "tokens_per_s")))


def plot_run(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Write a PNG with the training (and held-out) loss and the throughput of a run.

    Args:
        run_dir (Path): directory with `metrics.jsonl`.
        out (Optional[Path]): PNG path; default `run_dir/plot.png`.

    Returns:
        Path: the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_tps.plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train], color="tab:green")
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "plot.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
