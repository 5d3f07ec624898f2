"""The prepared GPU check of the open issues (#14, #15, #16, #17): one run, all numbers, one JSON file.

A session that is lent a GPU runs this once, in one device call, and copies the table into the closing notes.
Every section runs in its own process under its own time cap (a hung compile or an out-of-memory step costs that
section only: its error line is recorded and the next section starts); rows reach the JSON as they are measured,
so a section stopped at its cap keeps what it had. Sections and their caps on an H200 (estimates from the issues'
numbers, model builds and compiles included; 470 s in all):

- decode (#17, 145 s): batch-1 greedy decoding of the SmolLM2-135M and Llama 1.24B shapes (bf16, random weights):
  Verse eager and compiled (`decode_steps(compile=True)`: on CUDA the static-cache step replayed as CUDA graphs),
  transformers `generate`, the copy-bandwidth limit, first-call times; the engine's throughput at 1/8/32/128
  sequences. Estimate: eager rows, twins and engine ~60 s, compiles the rest.
- decode_restart (#17, 25 s): the compiled SmolLM2-135M-shape decode's first call in a second process (warm
  on-disk compile caches).
- train (#16, 120 s): `verse bench train` of the 1.24B shape at 8 x 2048 (Verse vs transformers): eager (35 s),
  per-block compile (45 s), precision=fp8 (40 s), each its own process.
- distributed (#14, 65 s): a one-rank NCCL job built in the process: FSDP2 by `verse.train.parallelize`, per-block
  compile, fp8; tokens/s against the one-device path; DCP save and load (SmolLM2-135M shape, 8 x 2048).
- lora (#15, 70 s): Llama-3-8B shape LoRA and QLoRA (NF4), 1 x 2048: peak `max_memory_allocated` against
  `verse plan`, tokens/s against full fine-tuning (of the 8B shape if the plan fits it, else the 1.24B shape).
- cuda_tests (45 s): every test that skips without CUDA (found by its `cuda.is_available` skip), slow ones included.

`--dry-run` runs every section on the CPU with tiny shapes in seconds (CUDA-only rows say "skipped: no CUDA"); a
test runs it so the script cannot rot.

Running it on the lent H200 (torch 2.11 + CUDA 13, transformers, triton, peft, pytest are there; torchao, gguf,
bpe-openai and datasets are not, and nothing can be downloaded there). The check needs only torchao (fp8 training,
QLoRA's NF4, bf16 stochastic rounding): torchao 0.17.0 is the release built for torch 2.11 (3.2 MB, no
dependencies). Here, once, in the root of the checkout the device call sends (the session's own):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.17.0

then one device call with `carry: [".whl"]` and `timeout_s: 600` (the check's budget is 470 s, see `--budget`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 make gpu-check

`make gpu-check` is `python3 scripts/gpu_check.py` (the script puts the checkout's src/ first itself); the results
land in $OUT/gpu_check.json (./gpu_check.json without $OUT) and the printed table is the output's tail. Without the
wheel the script still runs: the fp8 rows then say torchao is missing and QLoRA is skipped. `--only SECTION ...`
reruns some sections, `--cap SECTION=S` changes a cap.
"""

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "src" / "verse").is_dir():  # the checkout's sources, not an installed copy
    sys.path.insert(0, str(ROOT / "src"))

BUDGET_S = 470  # the device call is 8 minutes; the rest is Python start-up and copying $OUT back
# (name, issue, cap in seconds on a GPU); in this order, each in its own process
SECTIONS = (("decode", "#17", 145), ("decode_restart", "#17", 25), ("train", "#16", 120),
            ("distributed", "#14", 65), ("lora", "#15", 70), ("cuda_tests", "all", 45))
DRY_CAP_S = 300
NO_CUDA = "skipped: no CUDA"


class Rows:
    """The rows of one section, written to `path` (atomically, whole) after each so a killed section keeps them."""

    def __init__(self, section: str, path: Path, deadline: float = float("inf")):
        self.section, self.path, self.deadline = section, path, deadline
        self.rows: List[Dict[str, Any]] = []
        self.current: Optional[str] = None  # the measurement running now
        self.status, self.error, self.seconds = "running", None, None
        self.write()

    def write(self) -> None:
        """Replace the file with the rows so far and the section's state."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": self.status, "error": self.error, "seconds": self.seconds,
                                   "current": self.current, "rows": self.rows}, default=str))
        tmp.replace(self.path)

    def add(self, name: str, **values: Any) -> Dict[str, Any]:
        """Record and print one measurement."""
        row = {"name": name, **values}
        self.rows.append(row)
        self.current = None
        self.write()
        print(format_row(self.section, row), flush=True)
        return row

    def measure(self, name: str, fn: Callable[[], Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
        """Run one measurement; its exception becomes the row's `error` line, never the section's end."""
        self.current = name
        self.write()
        try:
            values = fn()
        except Exception as e:  # noqa: BLE001 - any failure is a measured fact, recorded as one line
            return self.add(name, error=one_line(e))
        return self.add(name, **(values or {}))

    def left(self) -> float:
        """Seconds until the section's process is stopped (its cap)."""
        return self.deadline - time.time()

    def skip(self, name: str, why: str) -> None:
        """Record a measurement that cannot run here."""
        self.add(name, skipped=why)


def one_line(e: BaseException) -> str:
    """An exception as one line: type, first line of its message, and where it was raised (ours, innermost)."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "verse" in f.filename or "gpu_check" in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {text}{where}"


def format_row(section: str, row: Dict[str, Any]) -> str:
    """`section | name | key=value ...`, numbers to 4 significant digits."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    values = "  ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "name")
    return f"{section:<12}| {row['name']:<44}| {values}"


def free_port() -> int:
    """A TCP port nobody listens on now (for the one-rank process group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_sync() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_peak() -> int:
    """Reset CUDA's peak statistics; return the bytes allocated now."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def release() -> None:
    """Give freed memory back between measurements (models of other rows must not count in this one's peak)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_model(preset: str, device: Any, dtype: str, **overrides: Any):
    """A randomly initialised `ReasoningLLM` of a preset's shape, built on `device` in `dtype`."""
    import torch

    from verse.config import ModelArgs
    from verse.model import ReasoningLLM

    args = ModelArgs.from_preset(preset, **{"dtype": dtype, **overrides})
    torch.manual_seed(0)
    with torch.device(device):
        return ReasoningLLM(args).eval()


# --- #17 decode --------------------------------------------------------------------------------------------------

def section_decode(rows: Rows, dry: bool) -> None:
    """Batch-1 greedy decoding (Verse eager, Verse compiled, transformers) against the copy-bandwidth limit, and the
    continuous-batching engine at 1/8/32/128 sequences; compiled rows last (their compile may meet the cap)."""
    import torch

    from verse.bench.generate import (bench_batched, bench_transformers, bench_verse, copy_bandwidth,
                                      weight_bytes_per_token)
    from verse.bench.train import transformers_twin
    from verse.infer.generate import decode_steps
    device = torch.device("cpu" if dry else "cuda")
    shapes = {"tiny": "tiny"} if dry else {"smollm2-135m": "smollm2-135m", "llama-1.24b": "llama-3.2-1b"}
    new_tokens, batch_tokens = (8, 4) if dry else (256, 64)
    batches = (1, 4) if dry else (1, 8, 32, 128)
    overrides = {"max_seq_len": 64} if dry else {}
    bandwidth = rows.measure("copy bandwidth", lambda: {"bytes_per_s": copy_bandwidth(
        (8 if dry else 1024) * 2**20, device=device)})
    bytes_per_s = bandwidth.get("bytes_per_s")
    generator = torch.Generator().manual_seed(0)

    def verse_row(model, prompt, compile: bool) -> Dict[str, Any]:
        result, tokens = bench_verse(model, prompt, new_tokens, compile=compile)
        # the warm-up is the model's first call in this mode: compile included
        out = {"first_call_s": result["warmup_s"], "decode_tok_s": result["decode_tok_s"],
               "prefill_tok_s": result["prefill_tok_s"], "new_tokens": result["new_tokens"]}
        if bytes_per_s:
            limit = bytes_per_s / weight_bytes_per_token(model)
            out.update(bandwidth_limit_tok_s=limit, fraction_of_limit=result["decode_tok_s"] / limit)
        reference[(id(model), "tokens", compile)] = tokens
        return out

    reference: Dict[Any, Any] = {}
    models = {}
    for label, preset in shapes.items():
        model = models[label] = random_model(preset, device, "bfloat16", **overrides)
        prompt = torch.randint(0, model.args.vocab_size, (48 if not dry else 8,), generator=generator).tolist()
        reference[(label, "prompt")] = prompt
        gb = weight_bytes_per_token(model) / 1e9
        eager = rows.measure(f"{label} verse eager", lambda: {**verse_row(model, prompt, False), "weight_gb": gb})

        def transformers_row() -> Dict[str, Any]:
            twin = transformers_twin(model, device).eval()
            try:
                result, tokens = bench_transformers(twin, prompt, new_tokens)
            finally:
                del twin
                release()
            out = {"decode_tok_s": result["decode_tok_s"], "prefill_tok_s": result["prefill_tok_s"]}
            if "decode_tok_s" in eager:
                out["verse_eager_ratio"] = eager["decode_tok_s"] / result["decode_tok_s"]
            return out

        reference[(label, "transformers")] = rows.measure(f"{label} transformers generate", transformers_row)
        for sequences in batches:
            def batched(sequences: int = sequences) -> Dict[str, Any]:
                result, _ = bench_batched(model, prompt, batch_tokens, sequences)
                return {"tok_s": result["tok_s"], "seconds": result["seconds"], "new_tokens": batch_tokens}

            rows.measure(f"{label} engine x{sequences}", batched)
    # the small shape first: its compile took 55 s in the issue, the 1.24B one's did not end in 100 s (whatever
    # of the cap is left goes to it, and a stop names it)
    for label, model in models.items():
        prompt = reference[(label, "prompt")]
        if dry:
            rows.skip(f"{label} verse compiled", f"{NO_CUDA} (dry run: compiling takes minutes on a CPU)")
            continue

        def compiled() -> Dict[str, Any]:
            out = verse_row(model, prompt, True)
            # which compiled path `verse generate` offers here: the static-cache step replayed as CUDA graphs (the
            # default of a compiled decode on CUDA where `decode_steps` has `static`), else the dynamic-cache one
            out["path"] = ("static cache + CUDA graphs" if "static" in inspect.signature(decode_steps).parameters
                           else "dynamic cache")
            eager_tokens = reference.get((id(model), "tokens", False))
            if eager_tokens is not None:  # greedy output identical to eager decoding (issue #17)
                ours = reference[(id(model), "tokens", True)]
                out["same_tokens_as_eager"] = next((i for i, (a, b) in enumerate(zip(ours, eager_tokens)) if a != b),
                                                   min(len(ours), len(eager_tokens)))
            theirs = reference[(label, "transformers")].get("decode_tok_s")
            if theirs:  # the issue's goal: at least 10x transformers' generate
                out["vs_transformers"] = out["decode_tok_s"] / theirs
            return out

        rows.measure(f"{label} verse compiled", compiled)


def section_decode_restart(rows: Rows, dry: bool) -> None:
    """The compiled SmolLM2-135M-shape decode again, in a fresh process after the decode section compiled it: the
    first call of a second process, with inductor's on-disk caches warm (issue #17: "starts in seconds")."""
    import torch

    from verse.bench.generate import bench_verse

    if dry:
        rows.skip("smollm2-135m verse compiled, second process", NO_CUDA)
        return
    model = random_model("smollm2-135m", torch.device("cuda"), "bfloat16")
    prompt = torch.randint(0, model.args.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()

    def second() -> Dict[str, Any]:
        result, _ = bench_verse(model, prompt, 256, compile=True)
        return {"first_call_s": result["warmup_s"], "decode_tok_s": result["decode_tok_s"]}

    rows.measure("smollm2-135m verse compiled, second process", second)


# --- #16 train ---------------------------------------------------------------------------------------------------

def run_capped(cmd: List[str], cap: float, capture: bool = True) -> tuple:
    """Run `cmd` in its own process group; at `cap` seconds kill the group (its compile workers and children too,
    so nothing keeps the GPU busy). Returns (exit code or None when stopped at the cap, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def last_error(stderr: str, code: Optional[int]) -> str:
    """The line of a failed process's stderr that names its error (else its last line)."""
    lines = [line for line in (stderr or "").strip().splitlines() if line.strip()] or [f"exit {code}"]
    return next((line for line in reversed(lines) if re.match(r"(verse: |\[rank\d+\]: )?\w*(Error|Exception)\b",
                                                            line)), lines[-1])[:300]


def run_cli(argv: List[str], cap: float, fresh: bool = True) -> Dict[str, Any]:
    """`verse ARGV --json` in a fresh process (its memory is freed with it; `fresh=False`: in this one, uncapped, as
    the dry run does); the parsed JSON."""
    if not fresh:
        import io

        from verse.cli import main as verse

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = verse([*argv, "--json"])
        if code != 0:
            raise RuntimeError(last_error(err.getvalue(), code))
        return json.loads(out.getvalue()[out.getvalue().index("{"):])
    code, out, err = run_capped([sys.executable, "-m", "verse.cli", *argv, "--json"], cap)
    if code is None:
        raise TimeoutError(f"stopped at its cap of {cap:.0f} s")
    if code != 0:
        raise RuntimeError(last_error(err, code))
    return json.loads(out[out.index("{"):])


def section_train(rows: Rows, dry: bool) -> None:
    """`verse bench train` of the 1.24B shape at 8 x 2048, bf16 autocast, fp32 parameters: eager, per-block compile,
    and precision=fp8 (torchao float8, compiled), each in its own process (the transformers side runs each time)."""
    import torch

    shape = (["--preset", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "0"] if dry
             else ["--preset", "llama-3.2-1b", "--seq-len", "2048", "--micro-batch", "8", "--steps", "3",
                   "--warmup", "1"])
    variants = [("eager", ["--compile", "off"], 35),
                ("per-block compile", ["--compile", "on"], 45),
                ("fp8 compiled", ["--compile", "on", "--precision", "fp8"], 40)]
    done: Dict[str, Dict[str, Any]] = {}
    for name, extra, cap in variants:
        if dry and name != "eager":
            rows.skip(f"1.24b 8x2048 {name}", f"{NO_CUDA} (dry run: the tiny eager row only)")
            continue
        if "fp8" in name:
            from verse.train.fp8 import fp8_unsupported

            why = fp8_unsupported(torch.device("cuda"))
            if why:
                rows.skip(f"1.24b 8x2048 {name}", why)
                continue

        def bench(extra: List[str] = extra, cap: float = cap) -> Dict[str, Any]:
            argv = ["bench", "train", *shape, "--no-moe", *extra]
            report = run_cli(argv, min(cap, rows.left() - 1), fresh=not dry)
            row = report["rows"]["dense"]
            out: Dict[str, Any] = {}
            for side in ("verse", "transformers"):
                out[f"{side}_tokens_per_s"] = row[side]["tokens_per_s"]
                out[f"{side}_mfu"] = row[side]["mfu"]
                memory = row[side]["peak_memory_bytes"]
                out[f"{side}_peak_gib"] = memory / 2**30 if memory is not None else None
            out.update(ratio=row["ratio"], peak_tflops=row["peak_flops"] / 1e12, compiled=report["verse_compiled"],
                       device=report["device_name"])
            for other, result in done.items():  # the issue's goal: fp8 at least 1.25x Verse's own bf16
                if result.get("verse_tokens_per_s"):
                    key = f"verse_vs_{other.replace(' ', '_')}"
                    out[key] = out["verse_tokens_per_s"] / result["verse_tokens_per_s"]
            out["command"] = " ".join(["verse", *argv, "--json"])
            return out

        done[name] = rows.measure(f"{'tiny 2x32' if dry else '1.24b 8x2048'} {name}", bench)


# --- #14 distributed ---------------------------------------------------------------------------------------------

def section_distributed(rows: Rows, dry: bool) -> None:
    """A process group of one rank (NCCL; gloo in the dry run) built in this process: the model built, FSDP2-wrapped
    and initialised by `verse.train.parallelize` as `verse train` does under torchrun, compiled per block, trained;
    tokens/s against the one-device path; fp8 under FSDP2; a DCP save and load that gives back every weight."""
    import torch
    import torch.distributed as tdist

    from verse.interop.dcp import load_sharded
    from verse.train.checkpoint import save_sharded
    from verse.train.config import TrainConfig
    from verse.train.distributed import Dist, ParallelConfig, device_mesh
    from verse.train.fp8 import fp8_unsupported
    from verse.train.loop import build_model, prepare_model, train_step
    from verse.train.optim import TrainOptimizer

    device = torch.device("cpu" if dry else "cuda", 0 if not dry else None)
    if not dry:
        torch.cuda.set_device(device)
    preset, seq, batch, steps = ("tiny", 32, 2, 2) if dry else ("smollm2-135m", 2048, 8, 4)
    tdist.init_process_group("gloo" if dry else "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                             world_size=1)
    try:
        layout = ParallelConfig(dp_shard=1).resolve(1)
        dist = Dist(rank=0, world_size=1, local_rank=0, device=device, parallel=layout,
                    mesh=device_mesh(device.type, layout))

        def config(precision: str = "bf16") -> TrainConfig:
            return TrainConfig(model=preset, max_seq_len=seq, micro_batch_size=batch, precision=precision,
                               device=device.type, compile=not dry, max_steps=steps, seed=0)

        def tokens_per_s(model, cfg: TrainConfig, job: Optional[Dist]) -> tuple:
            optimizer = TrainOptimizer(model, cfg)
            prepare_model(model, cfg, device)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.args.vocab_size, (batch, seq), generator=g).to(device)
            micro = [{"input_ids": ids, "labels": ids}]
            times, losses = [], []
            for _ in range(steps):
                start = time.perf_counter()
                losses.append(train_step(model, optimizer, micro, cfg, cfg.autocast(device), job)[0])
                times.append(time.perf_counter() - start)
            # the first step compiles; the fastest later one is the speed
            return batch * seq / min(times[1:] or times), losses, optimizer

        # the FSDP2 path first (what the section is for), then the one-device run it is compared with
        kept: Dict[str, Any] = {}

        def fsdp2() -> Dict[str, Any]:
            cfg = config()
            model = build_model(cfg, device, dist=dist)
            tok_s, losses, optimizer = tokens_per_s(model, cfg, dist)
            kept.update(model=model, optimizer=optimizer, cfg=cfg, tok_s=tok_s, losses=losses)
            return {"tokens_per_s": tok_s, "first_loss": losses[0], "fsdp2_wrapped": hasattr(model, "reshard"),
                    "backend": tdist.get_backend()}

        rows.measure(f"{preset} {batch}x{seq} FSDP2 world 1", fsdp2)

        def dcp_round_trip() -> Dict[str, Any]:
            if "model" not in kept:
                raise RuntimeError("no FSDP2 model to save (its row failed)")
            model, optimizer, cfg = kept["model"], kept["optimizer"], kept["cfg"]
            with tempfile.TemporaryDirectory(prefix="verse-gpu-check-") as tmp:
                cuda_sync()
                start = time.perf_counter()
                step_dir = save_sharded(Path(tmp), 1, model, optimizer.torch_optimizer(), {"step": 1}, dist)
                saved_s = time.perf_counter() - start
                size = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
                fresh = build_model(cfg, device, dist=dist)
                fresh_optimizer = TrainOptimizer(fresh, cfg)
                start = time.perf_counter()
                load_sharded(step_dir, fresh, fresh_optimizer.torch_optimizer())
                cuda_sync()
                loaded_s = time.perf_counter() - start
            before, after = model.state_dict(), fresh.state_dict()
            same = all(torch.equal(_full(before[k]), _full(after[k])) for k in before)
            return {"save_s": saved_s, "load_s": loaded_s, "mb": size / 1e6, "weights_identical": same}

        rows.measure(f"{preset} DCP save + load", dcp_round_trip)
        fsdp = {k: kept.pop(k) for k in ("tok_s", "losses") if k in kept}
        kept.clear()
        release()
        single: Dict[str, Any] = {}

        def one_device() -> Dict[str, Any]:
            cfg = config()
            torch.manual_seed(cfg.seed)  # the initial weights the sharded build drew (`init_sharded`)
            model = build_model(cfg, device)
            single["tok_s"], losses, _ = tokens_per_s(model, cfg, None)
            del model
            release()
            out = {"tokens_per_s": single["tok_s"], "first_loss": losses[0]}
            if fsdp:
                out["fsdp2_vs_one_device"] = fsdp["tok_s"] / single["tok_s"]
                out["same_first_loss"] = abs(fsdp["losses"][0] - losses[0]) <= 1e-3 * abs(losses[0])
            return out

        rows.measure(f"{preset} {batch}x{seq} one device", one_device)
        why = NO_CUDA if dry else fp8_unsupported(device)
        if why:
            rows.skip(f"{preset} {batch}x{seq} FSDP2 world 1 fp8", why)
        else:
            def fp8() -> Dict[str, Any]:
                cfg = config("fp8")
                model = build_model(cfg, device, dist=dist)
                tok_s, losses, _ = tokens_per_s(model, cfg, dist)
                out = {"tokens_per_s": tok_s, "first_loss": losses[0]}
                if single.get("tok_s"):
                    out["vs_one_device_bf16"] = tok_s / single["tok_s"]
                return out

            rows.measure(f"{preset} {batch}x{seq} FSDP2 world 1 fp8", fp8)
    finally:
        tdist.destroy_process_group()


def _full(t):
    """A DTensor's full value (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --- #15 LoRA / QLoRA ----------------------------------------------------------------------------------------------

def section_lora(rows: Rows, dry: bool) -> None:
    """LoRA and QLoRA of the Llama-3-8B shape (random bf16 base built on the GPU, adapters applied as `verse train`
    applies them): peak `torch.cuda.max_memory_allocated` of the steps against `verse plan`'s peak, tokens/s against
    full fine-tuning (of the same shape when the plan says it fits on this GPU, else of the 1.24B shape)."""
    import torch

    from verse.bench.plan_step import train_config
    from verse.optional import import_torchao
    from verse.train.loop import apply_finetune, build_model, prepare_model, train_step
    from verse.train.optim import TrainOptimizer
    from verse.train.planner import PlanSettings, finetune_from_config, plan

    cuda = not dry
    device = torch.device("cuda" if cuda else "cpu")
    preset, seq, batch, steps = ("tiny", 32, 1, 2) if dry else ("llama-3-8b", 2048, 1, 3)
    lora = {"rank": 16, "alpha": 32, "targets": "all"}

    def run(method: str, shape: str, settings: PlanSettings) -> Dict[str, Any]:
        finetune = {"method": method, **({"lora": lora} if method != "full" else {})}
        # eager: three shapes' per-block compiles would not fit the section's cap
        cfg = dataclasses.replace(train_config(settings, shape, finetune=finetune if method != "full" else None),
                                  compile=False)
        release()
        base = fresh_peak() if cuda else 0
        # a random base of the preset's shape built as `verse train` builds it (activation checkpointing included),
        # then the adapters applied as to a loaded checkpoint (saving and reading 16 GB would not fit the cap)
        model = build_model(dataclasses.replace(cfg, finetune={"method": "full"}), device)
        apply_finetune(model, cfg, device)
        optimizer = TrainOptimizer(model, cfg)
        prepare_model(model, cfg, device)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.args.vocab_size, (batch, seq), generator=g).to(device)
        micro = [{"input_ids": ids, "labels": ids}]
        train_step(model, optimizer, micro, cfg, cfg.autocast(device))  # warm-up: lazy state, kernels
        if cuda:
            fresh_peak()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step(model, optimizer, micro, cfg, cfg.autocast(device))
            times.append(time.perf_counter() - start)
        planned = plan(model.args, settings, "h200" if cuda else "cpu", device_memory=0, **finetune_from_config(cfg))
        out = {"tokens_per_s": batch * seq / min(times), "plan_gib": planned["peak_bytes"] / 2**30}
        if cuda:
            measured = torch.cuda.max_memory_allocated() - base
            out.update(measured_gib=measured / 2**30, plan_over_measured=planned["peak_bytes"] / measured,
                       within_5pct=abs(planned["peak_bytes"] / measured - 1) <= 0.05)
        else:
            out["measured_gib"] = NO_CUDA
        del model, optimizer
        release()
        return out

    adapters = PlanSettings(seq_len=seq, micro_batch_size=batch, precision="bf16", param_dtype="bfloat16")
    results: Dict[str, Dict[str, Any]] = {}
    for method in ("lora", "qlora"):
        if method == "qlora":
            try:
                import_torchao("torchao.quantization")
            except ImportError:
                rows.skip(f"{preset} qlora 1x{seq}", "torchao is not installed (carry its wheel)")
                continue
        results[method] = rows.measure(f"{preset} {method} {batch}x{seq}", lambda m=method: run(m, preset, adapters))
    # full fine-tuning of the same shape if the plan fits it on this GPU (bf16 parameters), else the 1.24B shape
    update = "master"  # the dry run skips compiling torchao's stochastic rounding (20 s on a CPU)
    if cuda:
        with contextlib.suppress(ImportError):  # bf16 parameters with stochastic rounding keep no fp32 master copy
            import_torchao("torchao.optim")
            update = "stochastic"
    full = PlanSettings(seq_len=seq, micro_batch_size=batch, precision="bf16", param_dtype="bfloat16",
                        bf16_update=update, activation_checkpointing=1)
    full_shape = preset
    if cuda:
        from verse.config import ModelArgs

        memory = torch.cuda.get_device_properties(device).total_memory
        if plan(ModelArgs.from_preset(preset), full, "h200", device_memory=0)["peak_bytes"] > 0.9 * memory:
            full_shape = "llama-3.2-1b"
    note = "" if full_shape == preset else f" (8B full FT does not fit in {memory / 2**30:.0f} GiB)"

    def full_row() -> Dict[str, Any]:
        out = run("full", full_shape, full)
        for method, result in results.items():
            if result and "tokens_per_s" in result:
                out[f"{method}_vs_full"] = result["tokens_per_s"] / out["tokens_per_s"]
        return out

    rows.measure(f"{full_shape} full fine-tune {batch}x{seq} ckpt=1{note}", full_row)


# --- CUDA-only tests -----------------------------------------------------------------------------------------------

def cuda_only_tests(tests: Path = ROOT / "tests") -> List[str]:
    """Node ids of the tests that skip without CUDA: a `skipif` decorator whose condition reads
    `cuda.is_available()` (read from the source's syntax tree, so text in strings never counts)."""
    import ast

    found = []
    for path in sorted(tests.glob("test_*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.skipif")
                        and decorator.args and "cuda.is_available()" in ast.unparse(decorator.args[0])):
                    found.append(f"{path.relative_to(ROOT)}::{node.name}")
                    break
    return found


def section_cuda_tests(rows: Rows, dry: bool) -> None:
    """Run every test that skips without CUDA (slow ones included), one row per test with its outcome; outcomes are
    read as pytest prints them, so a run stopped at the cap keeps those that finished."""
    tests = cuda_only_tests()
    rows.add("found", tests=len(tests), ids=tests)
    if dry:
        for test in tests:
            rows.skip(test, NO_CUDA)
        return
    start = time.perf_counter()
    cap = min(rows.left() - 2, 600.0)
    code, out, _ = run_capped([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "", "-rfEs",
                               f"--timeout={max(int(cap), 1)}", *tests], cap)
    seconds = time.perf_counter() - start
    outcomes = pytest_outcomes(out or "")
    for test in tests:
        rows.add(test, **outcomes.get(test, {"outcome": "not run"}))
    tail = (out or "").strip().splitlines()[-1:] or [""]
    rows.add("pytest", exit_code=code, seconds=seconds,
             summary=tail[0] if code is not None else f"stopped at its cap of {cap:.0f} s")


def pytest_outcomes(output: str) -> Dict[str, Dict[str, Any]]:
    """{node id: {outcome, message}} from `pytest -v -rfEs` output (parametrized ids under their test's id)."""
    outcomes: Dict[str, Dict[str, Any]] = {}
    for match in re.finditer(r"^(\S+::\w+)(?:\[\S*\])? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M):
        node, outcome = match.groups()
        if outcomes.get(node, {}).get("outcome") not in ("FAILED", "ERROR"):  # a failing case wins
            outcomes[node] = {"outcome": outcome.lower()}
    for match in re.finditer(r"^(?:FAILED|ERROR) (\S+?)(?:\[\S*\])? - (.*)$", output, re.M):
        if match.group(1) in outcomes:
            outcomes[match.group(1)].setdefault("message", match.group(2)[:300])
    # a skip is summarised by file and line, not by test: its reason goes to the file's next skipped test
    for match in re.finditer(r"^SKIPPED \[(\d+)\] (\S+?):\d+: (.*)$", output, re.M):
        count, path, reason = int(match.group(1)), match.group(2), match.group(3)
        waiting = [e for n, e in outcomes.items() if n.split("::")[0] == path and e["outcome"] == "skipped"
                   and "message" not in e]
        for entry in waiting[:count]:
            entry["message"] = reason[:300]
    return outcomes


# --- driver --------------------------------------------------------------------------------------------------------

FUNCTIONS = {"decode": section_decode, "decode_restart": section_decode_restart, "train": section_train,
             "distributed": section_distributed, "lora": section_lora, "cuda_tests": section_cuda_tests}


def environment() -> Dict[str, Any]:
    """Versions and the GPU, read without creating a CUDA context in this (the driver's) process."""
    import importlib.metadata as md

    import torch

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip() or None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpu": gpu,
            **{name: version(name) for name in ("transformers", "torchao", "triton", "peft")}}


def run_sections(names: List[str], rows_dir: Path, dry: bool, deadline: float = float("inf")) -> int:
    """The child process: run each section in turn, its rows and outcome in `rows_dir/NAME.json`; a section's
    exception is its error line, and the next section still runs."""
    if dry:  # tiny shapes: one thread, no contention with whatever else runs on a shared machine
        import torch

        torch.set_num_threads(1)
    for name in names:
        rows = Rows(name, rows_dir / f"{name}.json", deadline)
        start = time.monotonic()
        try:
            FUNCTIONS[name](rows, dry)
            rows.status = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, and the next section runs
            rows.status, rows.error = "error", one_line(e)
        rows.seconds = round(time.monotonic() - start, 1)
        rows.current = None
        rows.write()
    return 0


def collect(name: str, rows_dir: Path, code: Optional[int], stderr: str, cap: float) -> Dict[str, Any]:
    """A section's entry of gpu_check.json from its rows file and how its process ended."""
    path = rows_dir / f"{name}.json"
    stored = json.loads(path.read_text()) if path.exists() else {"rows": [], "status": "not run"}
    entry = {k: v for k, v in stored.items() if k != "current" and v is not None}
    if stored["status"] in ("running", "not run"):  # the process ended inside this section, or before it
        if code is None:
            during = f" during '{stored['current']}'" if stored.get("current") else ""
            entry.update(status="timeout", error=f"stopped at its cap of {cap:.0f} s{during}")
        elif stored["status"] == "running" or code != 0:
            entry.update(status="error", error=last_error(stderr, code))
    return entry


def main(argv: Optional[List[str]] = None) -> int:
    """Run the selected sections (each in its own capped process; the dry run's all in one), write gpu_check.json
    after each, and print one row per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, in seconds (CUDA rows skipped)")
    parser.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], help="run only these sections")
    parser.add_argument("--out", default=None, help="folder of gpu_check.json (default $OUT, else .)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all sections (default {BUDGET_S})")
    parser.add_argument("--cap", nargs="+", default=[], metavar="SECTION=S",
                        help="another time cap for a section (in a dry run: that section then runs in its own process)")
    parser.add_argument("--sections", nargs="+", choices=list(FUNCTIONS), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)  # time.time()
    args = parser.parse_args(argv)
    if args.sections:
        return run_sections(args.sections, Path(args.rows), args.dry_run, args.deadline)
    caps = {name: cap for name, _, cap in SECTIONS}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in caps:
            parser.error(f"--cap {item}: no section {name!r}")
        try:
            caps[name] = float(seconds)
        except ValueError:
            parser.error(f"--cap {item}: expected SECTION=SECONDS")
    given = {item.partition("=")[0] for item in args.cap}
    out_dir = Path(args.out or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "gpu_check.json"
    started = time.monotonic()
    result: Dict[str, Any] = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "dry_run": args.dry_run, "budget_s": args.budget, "environment": environment(),
                              "sections": {}}
    print(f"gpu check: {result['environment']}", flush=True)
    if not args.dry_run and not result["environment"]["cuda_available"]:
        print("gpu check: no CUDA device here: the sections' GPU rows will fail (--dry-run is the CPU check)",
              flush=True)
    issues = {name: issue for name, issue, _ in SECTIONS}
    selected = [name for name, _, _ in SECTIONS if not args.only or name in args.only]
    # a GPU run isolates every section (memory, a hung compile); the dry run's tiny sections share one process
    # (one import of torch), except those given their own cap
    groups = [[name] for name in selected if not args.dry_run or name in given]
    shared = [name for name in selected if args.dry_run and name not in given]
    if shared:
        groups.insert(0, shared)
    with tempfile.TemporaryDirectory(prefix="verse-gpu-check-") as tmp:
        for group in groups:
            left = args.budget - (time.monotonic() - started)
            cap = DRY_CAP_S if group is shared else min(caps[group[0]], left)
            start = time.monotonic()
            code, err = None, ""
            if cap >= 1:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--sections", *group, "--rows", tmp,
                       "--deadline", str(time.time() + cap), *(["--dry-run"] if args.dry_run else [])]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                code, _, err = run_capped(cmd, cap, capture=False)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
            for name in group:
                entry = {"issue": issues[name], "cap_s": round(cap, 1),
                         "command": f"python3 scripts/gpu_check.py --only {name}"}
                if cap < 1:
                    entry.update(status="skipped", error="no time left in the budget", rows=[])
                else:
                    entry.update(collect(name, Path(tmp), code, err, cap))
                    if len(group) == 1:
                        entry["seconds"] = round(time.monotonic() - start, 1)
                        entry["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
                if entry.get("error"):
                    print(format_row(name, {"name": f"section {entry['status']}", "error": entry["error"]}),
                          flush=True)
                result["sections"][name] = entry
            result["seconds"] = round(time.monotonic() - started, 1)
            result_path.write_text(json.dumps(result, indent=1, default=str) + "\n")  # after every process
    print(f"gpu check: {result['seconds']} s; results in {result_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
