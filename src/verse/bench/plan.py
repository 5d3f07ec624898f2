"""`verse bench plan`: the memory `verse plan` predicts vs the peak measured in real training steps.

Each configuration runs in a fresh process (`python -m verse.bench.plan_step`), built as `verse train` builds it;
a distributed case runs as a `torchrun` job (gloo on CPU) where every rank measures itself against its own plan,
and its row shows the rank furthest from its plan. On CPU the measure is the process's peak resident memory
(VmHWM, reset through /proc/self/clear_refs after a warm-up step of the same configuration that was then freed)
minus the resident memory before the model exists, with glibc told to serve every allocation above 64 KiB by mmap
so that freed tensors leave the RSS at once (`MALLOC_MMAP_THRESHOLD_`); on CUDA it is
`torch.cuda.max_memory_allocated`."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Dict, List

import torch

# (name, model overrides, settings) measured by `verse bench plan`: dense and MoE, checkpointing on/off,
# optimizers, bf16 parameters with each update rule, and every other PlanSettings field off its base value
PLAN_CASES: List[Dict[str, Any]] = [
    {"name": "dense adamw", "model": {}, "settings": {}},
    {"name": "dense adamw ckpt=1", "model": {}, "settings": {"activation_checkpointing": 1}},
    {"name": "dense adamw ckpt=2", "model": {}, "settings": {"activation_checkpointing": 2}},
    {"name": "dense sgd", "model": {}, "settings": {"optimizer": "sgd"}},
    {"name": "dense adamw accum=2", "model": {}, "settings": {"gradient_accumulation_steps": 2}},
    {"name": "dense fused-backward", "model": {}, "settings": {"fused_backward": True}},
    {"name": "dense 1 x 512 chunk 128", "model": {}, "settings": {"seq_len": 512, "micro_batch_size": 1,
                                                                  "loss_chunk_size": 128}},
    {"name": "moe adamw", "model": {"n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
                                    "moe_inter_dim": 384, "n_dense_layers": 1}, "settings": {}},
    {"name": "dense adamw8bit", "model": {}, "settings": {"optimizer": "adamw8bit"}},
    {"name": "dense bf16 compute", "model": {}, "settings": {"precision": "bf16"}},
    {"name": "bf16 params master", "model": {}, "settings": {"precision": "bf16", "param_dtype": "bfloat16",
                                                             "bf16_update": "master"}},
    {"name": "bf16 params stochastic", "model": {}, "settings": {"precision": "bf16", "param_dtype": "bfloat16",
                                                                 "bf16_update": "stochastic"}},
    {"name": "bf16 params nearest", "model": {}, "settings": {"precision": "bf16", "param_dtype": "bfloat16",
                                                              "bf16_update": "nearest"}},
]
# (name, parallel section) measured on 2 torchrun ranks (gloo on CPU): every rank's own peak against its plan
DIST_CASES: List[Dict[str, Any]] = [
    {"name": "2 ranks dp_shard=2", "model": {}, "settings": {}, "parallel": {"dp_shard": 2}},
    {"name": "2 ranks tp=2", "model": {"n_kv_heads": 2}, "settings": {}, "parallel": {"dp_shard": 1, "tp": 2}},
    {"name": "2 ranks moe ep=2", "model": {"n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
                                           "moe_inter_dim": 384, "n_dense_layers": 1}, "settings": {},
     "parallel": {"dp_shard": 1, "ep": 2}},
    {"name": "2 ranks dp_shard=2 ckpt=1", "model": {}, "settings": {"activation_checkpointing": 1},
     "parallel": {"dp_shard": 2}},
    {"name": "2 ranks tp=2 ckpt=1", "model": {"n_kv_heads": 2}, "settings": {"activation_checkpointing": 1},
     "parallel": {"dp_shard": 1, "tp": 2}},
]
BASE_MODEL = dict(arch="llama", vocab_size=8192, dim=384, n_layers=4, n_heads=6, n_kv_heads=3, inter_dim=1152,
                  max_seq_len=1024)
BASE_SETTINGS = dict(seq_len=256, micro_batch_size=2, precision="fp32", param_dtype="float32", loss_chunk_size=512)


def measure(model: Dict[str, Any], settings: Dict[str, Any], preset: str = "tiny",
            parallel: Dict[str, Any] | None = None, finetune: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Run two real training steps in a fresh process (with `parallel`, a `torchrun` job of as many processes as
    the layout has ranks; with `finetune`, LoRA/QLoRA of the base checkpoint `preset`); return the measured peak
    bytes and the plan (of the rank that peaked highest relative to its plan, with `ranks`: every rank's result)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"preset": preset, "model": model, "settings": settings,
                       **({"parallel": parallel} if parallel else {}), **({"finetune": finetune} if finetune else {})})
    cmd = [sys.executable, "-m", "verse.bench.plan_step", spec]
    if parallel:
        ranks = math.prod(parallel.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "ep"))
        env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # the rank's own error rather than torchrun's summary of it
        lines = out.stderr.strip().splitlines() or ["measurement failed"]
        raise RuntimeError(next((line for line in lines if re.match(r"\[rank\d+\]: \w*(Error|Exception)", line)),
                                lines[-1]))
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    worst = max(results, key=lambda r: abs(r["plan"]["peak_bytes"] / r["measured"] - 1))
    return {**worst, "ranks": results} if parallel else worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative error (default 0.10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Measured peak memory of real steps vs `verse plan`, one row per configuration (printed as measured)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (peak RSS)"
    rows = []
    if not args.json:
        print(f"verse plan vs measured peak on {device} (model dim 384, 4 layers, vocab 8192; "
              "2 x 256 tokens, fp32 unless the case says otherwise)")
        print(f"{'config':<24}{'plan MiB':>10}{'measured MiB':>14}{'plan/meas':>11}", flush=True)
    for case in (c for c in PLAN_CASES + DIST_CASES if not args.only or args.only in c["name"]):
        try:
            result = measure({**BASE_MODEL, **case["model"]}, {**BASE_SETTINGS, **case["settings"]},
                             parallel=case.get("parallel"))
        except RuntimeError as e:
            rows.append({"name": case["name"], "error": str(e)})
            if not args.json:
                print(f"{case['name']:<24}  error: {e}", flush=True)
            continue
        planned, measured = result["plan"]["peak_bytes"], result["measured"]
        row = {"name": case["name"], "plan_bytes": planned, "measured_bytes": measured, "ratio": planned / measured,
               "ok": abs(planned / measured - 1) <= args.tolerance}
        rows.append(row)
        if not args.json:
            print(f"{row['name']:<24}{planned / 2**20:>10.0f}{measured / 2**20:>14.0f}{row['ratio']:>11.3f}"
                  f"{'' if row['ok'] else '  (outside tolerance)'}", flush=True)
    if args.json:
        print(json.dumps({"device": device, "tolerance": args.tolerance, "rows": rows}))
    return 0 if all(r.get("ok") for r in rows) else 1


