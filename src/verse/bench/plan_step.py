"""The measuring program of `verse bench plan`: `python -m verse.bench.plan_step SPEC_JSON`.

SPEC_JSON is `{"preset": NAME, "model": {ModelArgs overrides}, "settings": {PlanSettings fields}}`, optionally with
`"finetune": {finetune section}` (LoRA/QLoRA; `preset` is then the base checkpoint's path) or `"parallel": {parallel
section}` (then launched by `torchrun`: every rank measures itself). The model and the `TrainConfig` are built
exactly as `verse train` builds them (`build_model`, every `PlanSettings` field forwarded; sharded over the ranks),
one warm-up step of the same configuration is run and freed, then two measured steps; the program (every rank)
prints one JSON line `{"measured": peak bytes, "plan": verse.train.planner.plan(...), "rank": rank}`.
"""

import gc
import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from verse.train.config import TrainConfig
from verse.train.loop import build_model, train_step
from verse.train.optim import TrainOptimizer
from verse.train.planner import PlanSettings, config_fields, finetune_from_config, plan


def train_config(settings: PlanSettings, preset: str = "tiny", model: Dict[str, Any] | None = None,
                 finetune: Dict[str, Any] | None = None, parallel: Dict[str, Any] | None = None) -> TrainConfig:
    """The `TrainConfig` of a measured case: every `PlanSettings` field, a preset and its model overrides.

    Args:
        settings (PlanSettings): the step to measure.
        preset (str): the model preset the overrides apply to.
        model (Dict[str, Any] | None): ModelArgs overrides (`dtype` comes from `settings.param_dtype`).
        finetune (Dict[str, Any] | None): the `finetune:` section (LoRA/QLoRA; `preset` is then a checkpoint path).
        parallel (Dict[str, Any] | None): the `parallel:` section (a torchrun job).

    Returns:
        TrainConfig: validated; gradient clipping off with a fused backward (which cannot clip).
    """
    overrides = {k: v for k, v in (model or {}).items() if k != "dtype"}
    return TrainConfig.from_dict({**config_fields(settings), "model": preset, "model_overrides": overrides,
                                  **({"finetune": finetune} if finetune else {}),
                                  **({"parallel": parallel} if parallel else {}),
                                  "lr": 1e-4, "grad_clip": 0.0 if settings.fused_backward else 1.0,
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}, "bench plan case")


def _rss() -> Tuple[int, int]:
    """Resident memory and its high-water mark of this process (bytes)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measure_in_process(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Peak bytes of two real training steps of `spec` in this process (this rank under torchrun), and the plan of
    the same step (of this rank)."""
    from verse.train.distributed import ParallelConfig, init_distributed

    torch.set_num_threads(1)
    settings = PlanSettings(**spec["settings"])
    cfg = train_config(settings, spec.get("preset", "tiny"), spec.get("model"), spec.get("finetune"),
                       spec.get("parallel"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dist = init_distributed(ParallelConfig.from_dict(cfg.parallel), device)
    device = dist.device
    autocast = cfg.autocast(device)

    def batches():
        ids = torch.randint(0, model.args.vocab_size, (cfg.micro_batch_size, cfg.max_seq_len), device=device)
        return [{"input_ids": ids, "labels": ids} for _ in range(cfg.gradient_accumulation_steps)]

    # warm-up: one step of the same configuration loads every kernel and lazy module and compiles what torchao
    # compiles, so that the baseline holds them; then everything is freed
    model = build_model(cfg, device, dist=dist)
    train_step(model, TrainOptimizer(model, cfg), batches(), cfg, autocast, dist)
    args = model.args
    del model
    gc.collect()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()[0]
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = build_model(cfg, device, dist=dist)
    optimizer = TrainOptimizer(model, cfg)
    for _ in range(2):
        train_step(model, optimizer, batches(), cfg, autocast, dist)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss()[1]) - base
    dist.barrier()
    dist.close()
    layout = {"parallel": dist.parallel} if dist.enabled else {}
    return {"measured": peak, "rank": dist.rank,
            "plan": plan(args, settings, "cpu", device_memory=0, **finetune_from_config(cfg), **layout)}


def main(argv: list | None = None) -> int:
    """Measure the spec given as the only argument; print the result as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0], file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    # one write of one line: the ranks of a torchrun job share the pipe, and a write under PIPE_BUF is atomic
    sys.stdout.write(json.dumps(measure_in_process(json.loads(argv[0]))) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
