"""Run visibility: FLOPs and MFU, memory, `metrics.jsonl`, TensorBoard (when installed) and the loss plot."""

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from verse.config import ModelArgs, count_params

# dense bf16 tensor-core peak FLOP/s (no sparsity), from the vendors' data sheets
GPU_PEAK_FLOPS = {
    "a100-40gb": 312e12, "a100-80gb": 312e12, "h100-80gb": 989e12, "h100-pcie": 756e12, "h200": 989e12,
    "l4": 121e12, "l40s": 362e12, "a10g": 125e12, "rtx-4090": 165e12, "rtx-3090": 71e12, "v100": 125e12,
}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + attention (PaLM, Chowdhery et al. 2022, App. B).

    Args:
        args (ModelArgs): the model.
        seq_len (int): tokens per sequence.

    Returns:
        float: forward + backward FLOPs per token.
    """
    n = count_params(args, active=True) - args.vocab_size * args.dim  # the embedding lookup is not a matmul
    if args.attention == "mla":
        qk, v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    else:
        qk = v = args.head_dim
    span = min(seq_len, args.sliding_window or seq_len)
    # QK^T and AV: 2 FLOPs per multiply-add, x3 for forward + backward, causal halves the average span
    attention = 6 * args.n_layers * args.n_heads * (qk + v) * span / 2
    return 6 * n + attention


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of `device`: the bf16 data-sheet number for known GPUs; on CPU a short fp32 matmul measurement
    (CPUs without AMX run bf16 matmuls far below their fp32 rate)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12),
                           ("a10", 125e12), ("4090", 165e12), ("3090", 71e12), ("v100", 125e12)):
            if key in name:
                return flops
        return 100e12
    # best of several runs: a shared machine only ever makes a run slower, and an underestimated peak would
    # report MFU above 100 %
    n = 2048  # large enough to run at the matmul kernel's full rate (1024 stays well below it on 2 cores)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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
    """Records of `metrics.jsonl` (a resumed run may repeat steps: the last record of each step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: Dict[Any, Dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill -9
            continue
        by_step[(record.get("kind", "train"), record["step"])] = record
    records = sorted(by_step.values(), key=lambda r: r["step"])
    return [r for r in records if after_step is None or r["step"] > after_step]


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
    evals = [r for r in records if r.get("kind") == "eval"]
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
