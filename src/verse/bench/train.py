"""`verse bench train`: training tokens/s of Verse's step vs transformers on the same model, in one run.

Both sides get the same architecture built from one `ModelArgs` (transformers' `LlamaForCausalLM`, or
`DeepseekV3ForCausalLM` for the MoE row, loaded from the checkpoint Verse saves, so the weights are identical),
the same token batch, AdamW with the same hyperparameters (fused), gradient clipping at 1.0 and bf16 autocast
(`--precision`). Verse runs `train_step` as `verse train` does (its defaults, e.g. per-block compile where that
is the default, and on CPU its heap setting, `verse.train.heap`); on CPU transformers runs in a child process of
its own, as a user's script would, since that setting belongs to the whole process. After warm-up the sides
alternate step by step, so a slow spell of a shared machine hits both; each keeps its fastest step. MFU divides by
the matmul peak measured between the steps in the step's own dtype (`verse.train.metrics.matmul_flops`). Peak
memory, measured in an untimed step of its own, is what a step adds above what was resident before it
(activations, gradients, temporaries): the CUDA allocator's peak, or on CPU the process's resident high-water
mark (reset through /proc/self/clear_refs, after the C heap's free pages are handed back)."""

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from verse.config import ModelArgs
from verse.errors import VerseError

MOE_PRESET = "bytegpt-tiny"
# the MoE row: every layer after the first MoE, no balance loss or bias updates (transformers has neither in
# training), so both sides do the same work
MOE_OVERRIDES = {"moe_layer_freq": 1, "aux_loss_alpha": 0.0, "router_bias_update_rate": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smollm2-135m", help="dense model shape (a Llama-type preset; default "
                                                                 "smollm2-135m)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, after warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp8"),
                        help="Verse's precision (default bf16): bf16 or fp32 autocast, or fp8 (torchao float8 "
                             "linear layers in the blocks, Hopper GPUs; transformers then runs bf16)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="Verse's per-block torch.compile (default auto: as `verse train`, on CUDA only)")
    parser.add_argument("--no-moe", action="store_true", help=f"skip the MoE row ({MOE_PRESET} shape vs "
                                                              "transformers' DeepseekV3ForCausalLM)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _step_memory() -> Callable[[], Optional[int]]:
    """Start measuring one step's peak memory; the returned function gives its bytes above the start (None when
    the platform cannot tell)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() - base
    from verse.train.heap import release_free_memory
    from verse.train.metrics import memory_bytes

    release_free_memory()  # what the last step freed counts again when this one takes it
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return lambda: None
    base = memory_bytes(torch.device("cpu")).get("memory_bytes")
    return lambda: (memory_bytes(torch.device("cpu"))["peak_memory_bytes"] - base) if base is not None else None


def transformers_twin(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """transformers' model of the same architecture holding the same weights, in training mode.

    Loaded from the checkpoint directory Verse writes (`save_pretrained`, DESIGN.md's contract), so every name
    and layout conversion is the tested one.

    Args:
        model (torch.nn.Module): a Verse `ReasoningLLM`.
        device (torch.device): where the copy lives.

    Returns:
        torch.nn.Module: e.g. `LlamaForCausalLM` with SDPA attention.
    """
    with tempfile.TemporaryDirectory(prefix="verse-bench-") as tmp:
        model.save_pretrained(Path(tmp) / "model")
        return load_twin(Path(tmp) / "model", model.embed.weight.dtype, device)


def load_twin(model_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """transformers' model loaded from a Verse checkpoint directory, in training mode (see `transformers_twin`)."""
    from verse.optional import TORCHAO_IMPORT_LOGGERS, quiet_loggers

    # transformers' loader imports torchao (when installed) and some of its submodules: quietly
    with quiet_loggers(*TORCHAO_IMPORT_LOGGERS):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        twin = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return twin.to(device).train()


class _Side:
    """One trainer of a row: its step as a closure, its step times, peak memory and first loss."""

    def __init__(self, name: str, step: Callable[[], torch.Tensor]):
        self.name, self.step = name, step
        self.times: List[float] = []
        self.memory: List[int] = []
        self.first_loss: Optional[float] = None

    def run(self, device: torch.device, timed: bool, memory: bool = False) -> None:
        """One step; `timed` keeps its time, `memory` its peak memory (measured apart from the timed steps: on CPU
        it starts by returning the heap's free pages, which the step then faults in again)."""
        measure = _step_memory() if memory else None
        start = time.perf_counter()
        loss = self.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if self.first_loss is None:
            self.first_loss = float(loss)
        if timed:
            self.times.append(elapsed)
        used = measure() if measure is not None else None
        if used is not None:
            self.memory.append(used)


class _ChildSide:
    """A side whose steps run in a child process, driven step by step like a local `_Side`.

    On CPU transformers runs apart from Verse's process: `verse train` keeps freed memory in its heap for reuse
    (`verse.train.heap`), a setting of the whole process that a user's own transformers script does not have.
    """

    def __init__(self, name: str, model_dir: Path, dtype: torch.dtype, cfg: Any, ids: torch.Tensor):
        import multiprocessing

        self.name = name
        self.times: List[float] = []
        self.memory: List[int] = []
        self.first_loss: Optional[float] = None
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's heap
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_child_main, daemon=True, args=(
            child, str(model_dir), str(dtype).removeprefix("torch."), cfg.to_dict(), ids.tolist(),
            torch.get_num_threads()))
        self.process.start()
        child.close()
        self.experts_implementation = self._receive()  # loaded: transformers' MoE implementation (or None)

    def _receive(self) -> Any:
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise VerseError(f"verse bench train: the {self.name} process ended unexpectedly (exit code "
                             f"{self.process.exitcode}); out of memory? try a smaller --micro-batch or --seq-len"
                             ) from None
        if kind == "error":
            raise VerseError(f"verse bench train: the {self.name} side failed: {value}")
        return value

    def run(self, device: torch.device, timed: bool, memory: bool = False) -> None:
        self.conn.send((timed, memory))
        elapsed, used, loss = self._receive()
        if self.first_loss is None:
            self.first_loss = loss
        if timed:
            self.times.append(elapsed)
        if used is not None:
            self.memory.append(used)

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def _child_main(conn: Any, model_dir: str, dtype: str, cfg_dict: Dict[str, Any], ids: List[List[int]],
                threads: int) -> None:
    """The child of `_ChildSide`: loads transformers' twin, then runs one step per (timed, memory) message."""
    from verse.train.config import TrainConfig

    try:
        torch.set_num_threads(threads)
        device = torch.device("cpu")
        cfg = TrainConfig.from_dict(cfg_dict)
        twin = load_twin(Path(model_dir), getattr(torch, dtype), device)
        side = _transformers_side(twin, cfg, torch.tensor(ids), device)
        conn.send(("ready", getattr(twin.config, "_experts_implementation", None)))
        while (message := conn.recv()) is not None:
            timed, memory = message
            side.run(device, timed, memory)
            conn.send(("step", (side.times[-1] if timed else None, side.memory.pop() if side.memory else None,
                                side.first_loss)))
    except Exception as e:  # reported by the parent in one line
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _verse_side(model: torch.nn.Module, cfg: Any, batch: Dict[str, torch.Tensor], device: torch.device) -> _Side:
    from verse.train.loop import prepare_model, train_step
    from verse.train.optim import TrainOptimizer

    prepare_model(model, cfg, device)
    optimizer = TrainOptimizer(model, cfg)
    autocast = cfg.autocast(device)
    tokens = int((batch["labels"] != -100).sum())

    def step() -> torch.Tensor:
        loss_sum = train_step(model, optimizer, [batch], cfg, autocast)[0]
        return loss_sum / tokens if loss_sum is not None else torch.tensor(float("nan"))

    return _Side("verse", step)


def _transformers_side(twin: torch.nn.Module, cfg: Any, ids: torch.Tensor, device: torch.device) -> _Side:
    optimizer = torch.optim.AdamW(twin.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    autocast = cfg.autocast(device)

    def step() -> torch.Tensor:
        with autocast:
            loss = twin(input_ids=ids, labels=ids).loss  # shifted inside: the same T - 1 targets as Verse's
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _Side("transformers", step)


def bench_row(model_args: ModelArgs, cfg: Any, device: torch.device, steps: int, warmup: int,
              peak: Callable[[], float]) -> Dict[str, Any]:
    """Time Verse and transformers on one model, interleaved step by step after warm-up.

    Args:
        model_args (ModelArgs): the model (fp32 parameters).
        cfg (TrainConfig): Verse's training configuration (shape, precision, optimizer hyperparameters).
        device (torch.device): where both run.
        steps (int): timed steps per side.
        warmup (int): untimed steps per side first.
        peak (Callable[[], float]): measures the matmul peak now (FLOP/s); called between rounds, best kept.

    Returns:
        Dict[str, Any]: per side `tokens_per_s`, `mfu`, `peak_memory_bytes`, `first_loss`; `ratio`, `peak_flops`.
    """
    from verse.model import ReasoningLLM
    from verse.train.metrics import mfu

    torch.manual_seed(0)
    with torch.device(device):
        model = ReasoningLLM(model_args).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_args.vocab_size, (cfg.micro_batch_size, cfg.max_seq_len), generator=generator)
    ids = ids.to(device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # the last position has no target
    with tempfile.TemporaryDirectory(prefix="verse-bench-") as tmp, contextlib.ExitStack() as stack:
        if device.type == "cpu":  # transformers in its own process (see `_ChildSide`)
            model.save_pretrained(Path(tmp) / "model")
            twin = _ChildSide("transformers", Path(tmp) / "model", model.embed.weight.dtype, cfg, ids)
            stack.callback(twin.close)
            experts = twin.experts_implementation
        else:
            local = transformers_twin(model, device)
            experts = getattr(local.config, "_experts_implementation", None)
            twin = _transformers_side(local, cfg, ids, device)
        sides = [_verse_side(model, cfg, {"input_ids": ids, "labels": labels}, device), twin]
        for _ in range(warmup):
            for side in sides:
                side.run(device, timed=False)
        for side in sides:
            side.run(device, timed=False, memory=True)
        peaks = []
        for _ in range(steps):
            peaks.append(peak())
            for side in sides:
                side.run(device, timed=True)
    peak_flops = max(peaks)
    tokens = ids.numel()
    row: Dict[str, Any] = {"micro_batch": cfg.micro_batch_size, "seq_len": cfg.max_seq_len, "peak_flops": peak_flops}
    for side in sides:
        tps = tokens / min(side.times)
        row[side.name] = {"tokens_per_s": tps, "mfu": mfu(model_args, tokens, min(side.times), cfg.max_seq_len,
                                                          peak_flops),
                          "step_s": min(side.times), "peak_memory_bytes": max(side.memory) if side.memory else None,
                          "first_loss": side.first_loss}
    row["ratio"] = row["verse"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
    row["experts_implementation"] = experts
    return row


def run(args: argparse.Namespace) -> int:
    """Training tokens/s of Verse vs transformers: a dense row (`--preset`) and a MoE row, printed or as JSON."""
    from verse.config import list_presets
    from verse.train.config import TrainConfig
    from verse.train.heap import reuse_freed_memory
    from verse.train.loop import compiles_blocks
    from verse.train.metrics import compute_dtype, device_name, matmul_flops

    for flag in ("seq_len", "micro_batch", "steps"):
        if getattr(args, flag) < 1:
            raise VerseError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise VerseError(f"--warmup must be >= 0, got {args.warmup}")
    if args.preset not in list_presets():
        raise VerseError(f"--preset {args.preset}: no such preset ({', '.join(list_presets())})")
    dense = ModelArgs.from_preset(args.preset)
    if dense.attention != "gqa" or dense.is_moe:
        raise VerseError(f"--preset {args.preset}: the dense row needs a Llama-type preset (GQA, no MoE); the MoE "
                         f"row always runs the {MOE_PRESET} shape")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp8":  # before any model is built
        from verse.train.fp8 import fp8_unsupported

        why = fp8_unsupported(device)
        if why:
            raise VerseError(f"--precision fp8: {why}")
    cfg = TrainConfig(max_seq_len=args.seq_len, micro_batch_size=args.micro_batch, precision=args.precision,
                      param_dtype="float32", device=device.type,
                      compile={"auto": None, "on": True, "off": False}[args.compile])
    dtype = compute_dtype(cfg.precision, cfg.param_dtype)

    def peak() -> float:
        return matmul_flops(device, dtype, seconds=0.2)

    def shaped(model_args: ModelArgs, seq_len: int) -> ModelArgs:
        return dataclasses.replace(model_args, dtype="float32", max_seq_len=max(model_args.max_seq_len, seq_len),
                                   original_seq_len=model_args.original_seq_len)

    # this process runs Verse's steps, with the heap setting of `verse train` (transformers runs in its own)
    with reuse_freed_memory(device.type == "cpu"):
        rows = {"dense": bench_row(shaped(dense, args.seq_len), cfg, device, args.steps, args.warmup, peak)}
        rows["dense"]["preset"] = args.preset
        if not args.no_moe:
            moe_args = dataclasses.replace(ModelArgs.from_preset(MOE_PRESET), **MOE_OVERRIDES)
            moe_len = min(args.seq_len, moe_args.max_seq_len)
            moe_cfg = dataclasses.replace(cfg, max_seq_len=moe_len)
            rows["moe"] = bench_row(shaped(moe_args, moe_len), moe_cfg, device, args.steps, args.warmup, peak)
            rows["moe"]["preset"] = MOE_PRESET
    report = {"device": str(device), "device_name": device_name(device), "precision": args.precision,
              "steps": args.steps, "verse_compiled": compiles_blocks(cfg, device),
              # the contract of DESIGN.md: the dense row's numbers at the top level
              "tokens_per_s": {s: rows["dense"][s]["tokens_per_s"] for s in ("verse", "transformers")},
              "mfu": {s: rows["dense"][s]["mfu"] for s in ("verse", "transformers")},
              "ratio": rows["dense"]["ratio"], "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    compiled = "per-block compiled" if report["verse_compiled"] else "eager"
    print(f"verse bench train: {report['device_name']} ({device}), {args.precision} autocast, fp32 parameters, "
          f"AdamW (fused), clip 1.0; Verse {compiled}; fastest of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up")
    names = {"dense": "LlamaForCausalLM", "moe": "DeepseekV3ForCausalLM"}
    labels = {(key, side): f"{row['preset']} {row['micro_batch']}x{row['seq_len']} "
                           + ("verse train_step" if side == "verse" else f"transformers {names[key]}")
              for key, row in rows.items() for side in ("verse", "transformers")}
    width = max(map(len, labels.values()))
    print(f"{'':{width}} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak mem':>10} {'1st loss':>9} {'ratio':>7}")
    for key, row in rows.items():
        for side in ("verse", "transformers"):
            r, label = row[side], labels[key, side]
            mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            memory = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r["peak_memory_bytes"] is not None else "n/a"
            ratio = f"{row['ratio']:.2f}x" if side == "verse" else "1.00x"
            print(f"{label:{width}} {r['tokens_per_s']:10.1f} {mfu_text:>7} {r['step_s']:8.3f} {memory:>10} "
                  f"{r['first_loss']:9.4f} {ratio:>7}")
        print(f"{'':{width}} matmul peak {row['peak_flops'] / 1e12:.3g} TFLOP/s ({dtype}, measured between the steps)")
    return 0
