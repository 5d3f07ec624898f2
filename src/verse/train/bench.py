"""`verse bench train` (training tokens/s vs a plain PyTorch loop) and `verse bench plan` (plan vs measured peak).

`verse bench plan` runs real training steps of several configurations, each in a fresh process, and compares
the measured peak with `verse.train.planner.plan`. On CPU the measure is the process's peak resident memory
(VmHWM, reset through /proc/self/clear_refs after a warm-up step of the same configuration
that was then freed) minus the resident memory before the model exists,
with glibc told to serve every allocation above 64 KiB by mmap so that freed tensors leave the RSS at once
(`MALLOC_MMAP_THRESHOLD_`); on CUDA it is `torch.cuda.max_memory_allocated`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import torch

# (name, model args, settings) measured by `verse bench plan`: dense and MoE, checkpointing on/off, optimizers
PLAN_CASES: List[Dict[str, Any]] = [
    {"name": "dense adamw", "model": {}, "settings": {}},
    {"name": "dense adamw ckpt=1", "model": {}, "settings": {"activation_checkpointing": 1}},
    {"name": "dense adamw ckpt=2", "model": {}, "settings": {"activation_checkpointing": 2}},
    {"name": "dense sgd", "model": {}, "settings": {"optimizer": "sgd"}},
    {"name": "dense adamw accum=2", "model": {}, "settings": {"gradient_accumulation_steps": 2}},
    {"name": "dense fused-backward", "model": {}, "settings": {"fused_backward": True}},
    {"name": "moe adamw", "model": {"n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
                                    "moe_inter_dim": 384, "n_dense_layers": 1}, "settings": {}},
    {"name": "dense adamw8bit", "model": {}, "settings": {"optimizer": "adamw8bit"}},
]
BASE_MODEL = dict(arch="llama", vocab_size=8192, dim=384, n_layers=4, n_heads=6, n_kv_heads=3, inter_dim=1152,
                  max_seq_len=1024, dtype="float32")
BASE_SETTINGS = dict(seq_len=256, micro_batch_size=2, precision="fp32", param_dtype="float32", loss_chunk_size=512)

_MEASURE = r"""
import json, os, sys, torch
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
from pathlib import Path
from verse.config import ModelArgs
from verse.model import ReasoningLLM
from verse.train.config import TrainConfig
from verse.train.loop import train_step
from verse.train.optim import TrainOptimizer
from verse.train.planner import PlanSettings, plan

def rss():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return int(f["VmRSS"].split()[0]) * 1024, int(f["VmHWM"].split()[0]) * 1024

s = PlanSettings(**spec["settings"])
args = ModelArgs(**spec["model"], checkpointing=s.activation_checkpointing > 0,
                 checkpoint_every=max(1, s.activation_checkpointing))
cfg = TrainConfig(max_seq_len=s.seq_len, micro_batch_size=s.micro_batch_size, lr=1e-4,
                  gradient_accumulation_steps=s.gradient_accumulation_steps, optimizer=s.optimizer,
                  param_dtype=s.param_dtype, precision=s.precision, fused_backward=s.fused_backward,
                  grad_clip=0.0 if s.fused_backward else 1.0, loss_chunk_size=s.loss_chunk_size)
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
def batches():
    ids = torch.randint(0, args.vocab_size, (s.micro_batch_size, s.seq_len), device=device)
    return [{"input_ids": ids, "labels": ids} for _ in range(s.gradient_accumulation_steps)]
# warm-up: one step of the same configuration loads every kernel and lazy module and compiles what torchao
# compiles, so that the baseline holds them; then everything is freed
with torch.device(device):
    model = ReasoningLLM(args).train()
train_step(model, TrainOptimizer(model, cfg), batches(), cfg, autocast)
del model
import gc; gc.collect()
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss()[0]
    Path("/proc/self/clear_refs").write_text("5")
with torch.device(device):
    model = ReasoningLLM(args).train()
opt = TrainOptimizer(model, cfg)
for _ in range(2):
    train_step(model, opt, batches(), cfg, autocast)
peak = (torch.cuda.max_memory_allocated() if cuda else rss()[1]) - base
print(json.dumps({"measured": peak, "plan": plan(args, s, "cpu", device_memory=0)}))
"""


def measure(model: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Run two real training steps in a fresh process; return its measured peak bytes and the plan."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"model": model, "settings": settings})
    out = subprocess.run([sys.executable, "-c", _MEASURE, spec], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "measurement failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative error (default 0.10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    """Measured peak memory of real steps vs `verse plan`, one row per configuration (printed as measured)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (peak RSS)"
    rows = []
    if not args.json:
        print(f"verse plan vs measured peak on {device} (model dim 384, 4 layers, vocab 8192, 2 x 256 tokens, fp32)")
        print(f"{'config':<24}{'plan MiB':>10}{'measured MiB':>14}{'plan/meas':>11}", flush=True)
    for case in (c for c in PLAN_CASES if not args.only or args.only in c["name"]):
        try:
            result = measure({**BASE_MODEL, **case["model"]}, {**BASE_SETTINGS, **case["settings"]})
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    """The nanoGPT loop: full logits, F.cross_entropy, AdamW."""
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_train(args: argparse.Namespace) -> int:
    """Training tokens/s of Verse's step vs a plain PyTorch (nanoGPT-style) step on the same model."""
    from verse.config import ModelArgs
    from verse.model import ReasoningLLM
    from verse.train.config import TrainConfig
    from verse.train.loop import train_step
    from verse.train.optim import TrainOptimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_args = ModelArgs(**{**BASE_MODEL, "max_seq_len": max(1024, args.seq_len)})
    cfg = TrainConfig(max_seq_len=args.seq_len, micro_batch_size=args.micro_batch, precision="fp32",
                      loss_chunk_size=1024, weight_decay=0.0)
    ids = torch.randint(0, model_args.vocab_size, (args.micro_batch, args.seq_len), device=device)
    autocast = torch.autocast(device.type, enabled=False)
    results = {}
    for side in ("reference", "verse"):
        torch.manual_seed(0)
        with torch.device(device):
            model = ReasoningLLM(model_args).train()
        if side == "verse":
            opt = TrainOptimizer(model, cfg)
            batch = [{"input_ids": ids, "labels": ids}]

            def step(model=model, opt=opt, batch=batch):
                train_step(model, opt, batch, cfg, autocast)
        else:
            ref_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)

            def step(model=model, ref_opt=ref_opt):
                _reference_step(model, ref_opt, ids)
        step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[side] = args.steps * ids.numel() / (time.perf_counter() - start)
    ratio = results["verse"] / results["reference"]
    if args.json:
        print(json.dumps({"device": str(device), "tokens_per_s": results, "ratio": ratio}))
    else:
        print(f"training step, {device}, model dim 384 x 4 layers, vocab 8192, {args.micro_batch} x {args.seq_len}"
              f" tokens, fp32")
        print(f"  reference (full logits + F.cross_entropy + AdamW): {results['reference']:>9.0f} tokens/s")
        print(f"  verse (chunked CE + fused AdamW):                  {results['verse']:>9.0f} tokens/s"
              f"   ratio {ratio:.2f}x")
    return 0
