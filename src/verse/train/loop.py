"""`train(cfg)`: the training loop behind `verse train` (pretraining and SFT, one device)."""

import contextlib
import dataclasses
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import yaml

from verse.config import ModelArgs, list_presets
from verse.errors import CheckpointError, ConfigError, VerseError
from verse.model import ReasoningLLM
from verse.model.masks import document_mask
from verse.train import checkpoint as ckpt
from verse.train.config import TrainConfig
from verse.train.loss import IGNORE_INDEX, chunked_cross_entropy
from verse.train.metrics import (MetricsLog, compute_dtype, device_peak_flops, memory_bytes, mfu, moe_stats,
                                 plot_run)
from verse.train.optim import TrainOptimizer
from verse.train.schedule import lr_at

CONFIG_FILE = ckpt.CONFIG_FILE
# keys a checkpoint's train_state must hold to resume
STATE_KEYS = ("step", "skipped", "bad_in_row", "tokens_seen", "optimizer", "rng")


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        run_dir (Path): the run directory.
        final_dir (Optional[Path]): the last checkpoint written.
        metrics (List[Dict[str, Any]]): one dict per optimizer step of this invocation (and eval records).
        step (int): optimizer steps done in total.
        stopped_by_signal (bool): the run saved and stopped on SIGTERM/SIGINT.
    """

    run_dir: Path
    final_dir: Optional[Path]
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    step: int = 0
    stopped_by_signal: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_preset(cfg: TrainConfig) -> bool:
    """Whether `cfg.model` names a preset (a fresh model) rather than a checkpoint path."""
    if Path(cfg.model).exists():
        return False
    if cfg.model in list_presets():
        return True
    raise ConfigError(f"model={cfg.model!r}: neither an existing path nor a preset ({', '.join(list_presets())})")


def load_tokenizer(cfg: TrainConfig):
    """`cfg.tokenizer`; else the checkpoint's own; else, for a preset, byte (ByteGPT presets) or o200k."""
    import verse

    if cfg.tokenizer is not None:
        return verse.load_tokenizer(cfg.tokenizer)
    if not is_preset(cfg):
        return verse.load_tokenizer(cfg.model)
    return verse.load_tokenizer("byte" if ModelArgs.from_preset(cfg.model).tokenizer == "byte" else "o200k")


def build_model(cfg: TrainConfig, device: torch.device, tokenizer: Any = None) -> ReasoningLLM:
    """A preset gives a freshly initialised model (its vocabulary sized to `tokenizer` unless overridden);
    a path loads a checkpoint or .gguf."""
    overrides = dict(cfg.model_overrides)
    if cfg.activation_checkpointing:
        overrides.update(checkpointing=True, checkpoint_every=cfg.activation_checkpointing)
    if is_preset(cfg):
        if cfg.mode == "sft":
            raise ConfigError(f"mode=sft fine-tunes a pretrained checkpoint, but model={cfg.model} is a preset "
                              "(random weights): give model=PATH, or mode=pretrain")
        if tokenizer is not None and "vocab_size" not in overrides:
            overrides.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                             eos_token_id=tokenizer.eos_id)
        if cfg.finetune_method != "full":
            raise ConfigError(f"finetune.method={cfg.finetune_method} adapts a pretrained checkpoint, but "
                              f"model={cfg.model} is a preset (random weights): give model=PATH")
        args = ModelArgs.from_preset(cfg.model, **{**overrides, "dtype": cfg.param_dtype})
        with torch.device(device):
            model = ReasoningLLM(args)
    else:
        import verse

        base_dtype = torch.bfloat16 if cfg.finetune_method == "qlora" else getattr(torch, cfg.param_dtype)
        model = verse.load(cfg.model, device=device, dtype=base_dtype, **overrides)
        lora = cfg.lora_args()
        if lora is not None:  # LoRA / QLoRA: frozen (NF4) base, trainable adapters (verse.peft)
            from verse.peft import apply_lora, quantize_nf4_

            if cfg.finetune_method == "qlora":
                quantize_nf4_(model)
            apply_lora(model, lora, dtype=getattr(torch, cfg.param_dtype))
    if cfg.max_seq_len > model.args.max_seq_len:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds the model's limit ({model.args.max_seq_len}); "
                          f"lower max_seq_len")
    if tokenizer is not None and tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                          f"{model.args.vocab_size}; set tokenizer= to the model's own")
    return model.train()


def check_data(cfg: TrainConfig) -> None:
    """Validate the `data:` section and that its local sources exist (quick; no model, nothing written).

    Raises:
        VerseError: naming the bad field or the missing path.
    """
    from verse.data.config import DataConfig
    from verse.data.sources import resolve_parts

    if dataclasses.is_dataclass(cfg.data):
        cfg.data.validate()
        data = cfg.data
    else:
        data = DataConfig.from_dict(cfg.data)
    for source in (*data.sources, *data.eval_sources):
        if source.path is not None:  # Hub sources are reached when the loader opens them
            resolve_parts(source)


def build_loaders(cfg: TrainConfig, tokenizer: Any):
    """Train loader and (when evaluating) eval loader from the `data:` section."""
    from verse.data import build_loader

    common = dict(max_seq_len=cfg.max_seq_len, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed)
    loader = build_loader(cfg.data or {}, tokenizer, split="train", **common)
    eval_loader = build_loader(cfg.data or {}, tokenizer, split="eval", **common) if cfg.eval_every else None
    return loader, eval_loader


class _Batches:
    """Endless micro-batches from a loader: a new epoch starts when one ends."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.it: Optional[Iterator] = None

    def next(self) -> Dict[str, torch.Tensor]:
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise VerseError("the data loader yielded no batches: check the data sources and max_seq_len")


def _forward_loss(model: ReasoningLLM, batch: Dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Summed token loss of one micro-batch (packed batches get a document mask)."""
    position_ids = batch.get("position_ids")
    mask = document_mask(position_ids) if position_ids is not None else None
    hidden = model.hidden_states(batch["input_ids"], position_ids=position_ids, attn_mask=mask)
    return chunked_cross_entropy(hidden, batch["labels"], model.head, chunk_size)


def train_step(model: ReasoningLLM, optimizer: TrainOptimizer, micro: List[Dict[str, torch.Tensor]],
               cfg: TrainConfig, autocast: contextlib.AbstractContextManager):
    """One optimizer step over the micro-batches of an accumulation step.

    The loss is normalised over the loss tokens of ALL micro-batches (not per micro-batch), so
    micro-batch 1 x accumulation 8 equals micro-batch 8 x accumulation 1. A NaN/inf loss or gradient norm
    skips the update.

    Returns:
        tuple: (summed loss or None when non-finite, loss tokens, grad norm or None, whether the update ran).
    """
    n_tokens = int(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro))
    for moe in getattr(model, "moe_layers", {}).values():
        moe.aux_loss_scale = 1.0 / len(micro)  # the MoE balance loss, too, is a mean over the accumulation step
    loss_sum: Optional[float] = 0.0
    for b in micro:
        with autocast:
            loss = _forward_loss(model, b, cfg.loss_chunk_size)
        if not torch.isfinite(loss):  # checked before backward: fused_backward would already have stepped
            loss_sum = None
            break
        if n_tokens:
            (loss / n_tokens).backward()
        loss_sum += loss.item()
    grad_norm = optimizer.clip_and_norm(cfg.grad_clip) if loss_sum is not None and n_tokens else None
    applied = loss_sum is not None and n_tokens > 0 and bool(torch.isfinite(grad_norm))
    if applied:
        optimizer.step()
        for moe in getattr(model, "moe_layers", {}).values():
            moe.update_bias()  # DeepSeek-V3 auxiliary-loss-free balancing (no-op unless configured)
    optimizer.zero_grad()
    return loss_sum, n_tokens, grad_norm, applied


class _StopSignal:
    """SIGTERM / SIGINT: the first lets the step finish, then the loop saves a checkpoint and stops; a second waits
    for that save (saying so, so a run is never lost to an impatient Ctrl-C); only a third aborts."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.count = 0
        self.previous: Dict[int, Any] = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.signum = signum
            _say("verse train: stopping: finishing this step and saving a checkpoint")
        elif self.count == 2:
            _say("verse train: waiting for the checkpoint to be saved so the run is not lost; "
                 "a third interrupt aborts and loses the steps since the last checkpoint")
        else:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _say(line: str) -> None:
    """One line on stderr from a signal handler (which may interrupt another write to stderr)."""
    with contextlib.suppress(RuntimeError, OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _oom_message(cfg: TrainConfig, model: ReasoningLLM, device: torch.device) -> str:
    from verse.train.planner import plan_from_config

    peak = memory_bytes(device).get("peak_memory_bytes", 0)
    estimate = plan_from_config(cfg, model.args)["peak_bytes"]
    return (f"out of memory at micro_batch_size={cfg.micro_batch_size}, max_seq_len={cfg.max_seq_len}: measured "
            f"peak {peak / 2**30:.1f} GiB, `verse plan` estimate {estimate / 2**30:.1f} GiB. Try, in this order: "
            f"1) a shorter max_seq_len; 2) micro_batch_size=1 with more gradient_accumulation_steps; "
            f"3) activation_checkpointing=1 and/or optimizer=adamw8bit")


@torch.no_grad()
def evaluate(model: ReasoningLLM, loader: Iterable, n_batches: int, device: torch.device,
             autocast: contextlib.AbstractContextManager, chunk_size: int) -> float:
    """Mean token loss over the first `n_batches` micro-batches of `loader` (NaN when it has no loss tokens)."""
    model.eval()
    total, tokens = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            with autocast:
                total += _forward_loss(model, batch, chunk_size).item()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    finally:
        model.train()
    return total / tokens if tokens else float("nan")


def train(cfg: TrainConfig, *, resume: bool = False, loader: Optional[Iterable] = None,
          eval_loader: Optional[Iterable] = None, tokenizer: Any = None, progress: bool = True) -> TrainResult:
    """Run training as configured; what `verse train` calls.

    Args:
        cfg (TrainConfig): the configuration (validated).
        resume (bool): continue the run in `cfg.out_dir` from its `latest` checkpoint, exactly.
        loader (Optional[Iterable]): micro-batches (dicts of `input_ids`, shifted `labels`, optional
            `position_ids`) with `state_dict`/`load_state_dict`; default `verse.data.build_loader(cfg.data, ...)`.
        eval_loader (Optional[Iterable]): held-out micro-batches; default the data's eval split.
        tokenizer: saved with each checkpoint; default loaded from `cfg.tokenizer` / the model.
        progress (bool): show a tqdm progress bar.

    Returns:
        TrainResult: run directory, last checkpoint, per-step metrics.
    """
    cfg.validate()
    run_dir = Path(cfg.out_dir).expanduser()
    # everything a user can get wrong is checked before anything heavy runs or anything is written
    if loader is None:
        check_data(cfg)
    ckpt.check_run_dir(run_dir, resume)
    device = resolve_device(cfg.device)
    is_preset(cfg)  # the model names a preset or an existing path
    step, skipped, bad_in_row, tokens_seen = 0, 0, 0, 0
    if resume:
        ckpt.clean_partial(run_dir)
        step_dir, step = ckpt.latest_checkpoint(run_dir)
        if step >= cfg.max_steps:
            print(f"{run_dir}: already finished ({step_dir.name}, max_steps={cfg.max_steps}); nothing to do. "
                  f"To train on, give a larger max_steps: `verse train --resume {run_dir} max_steps=N`")
            return TrainResult(run_dir=run_dir, final_dir=step_dir, step=step)
        state = ckpt.load_state(step_dir / ckpt.STATE_DIR, device, required=STATE_KEYS)
    seed_everything(cfg.seed)
    if loader is None and tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    byte_level = getattr(tokenizer, "name", None) == "byte"  # then also log bits per byte
    model = build_model(cfg, device, tokenizer)
    if loader is None:
        loader, default_eval = build_loaders(cfg, tokenizer)
        eval_loader = eval_loader if eval_loader is not None else default_eval
    optimizer = TrainOptimizer(model, cfg)

    if resume:
        _load_weights(model, step_dir)
        try:
            optimizer.load_state_dict(state["optimizer"])
            if state.get("loader") is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(state["loader"])
            ckpt.set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{step_dir / ckpt.STATE_DIR}: the training state does not fit this run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume "
                                  f"with the configuration the run was started with") from None
        skipped, bad_in_row, tokens_seen = state["skipped"], state["bad_in_row"], state["tokens_seen"]
        del state
        if not ckpt.is_run_dir(run_dir):  # a run from before the marker
            ckpt.create_run_dir(run_dir)
    else:
        ckpt.create_run_dir(run_dir)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.compile:
        for layer in model.layers:
            layer.compile()

    def save() -> Path:
        state = {"step": step, "skipped": skipped, "bad_in_row": bad_in_row, "tokens_seen": tokens_seen,
                 "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(),
                 "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        return ckpt.save_checkpoint(run_dir, step, model, state, tokenizer=tokenizer, keep_last=cfg.keep_last,
                                    adapter_base=adapter_base(cfg))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    peak_flops = cfg.peak_flops or device_peak_flops(device, compute_dtype(cfg.precision, cfg.param_dtype))
    log = MetricsLog(run_dir, tensorboard=cfg.tensorboard)
    batches = _Batches(loader)
    metrics: List[Dict[str, Any]] = []
    final_dir: Optional[Path] = step_dir if resume else None  # never re-save a step: it is on disk already
    stop = _StopSignal()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        with stop:
            while step < cfg.max_steps and stop.signum is None:
                start = time.perf_counter()
                lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, max_steps=cfg.max_steps,
                           warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
                optimizer.set_lr(lr)
                micro = [{k: v.to(device, non_blocking=True) for k, v in batches.next().items() if torch.is_tensor(v)}
                         for _ in range(cfg.gradient_accumulation_steps)]
                try:
                    loss_sum, n_tokens, grad_norm, applied = train_step(model, optimizer, micro, cfg, autocast)
                except (torch.OutOfMemoryError, MemoryError):
                    optimizer.zero_grad()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # return the cached blocks before reporting
                    raise VerseError(_oom_message(cfg, model, device)) from None
                finite = loss_sum is not None and (grad_norm is None or bool(torch.isfinite(grad_norm)))
                if applied:
                    bad_in_row = 0
                else:
                    skipped += 1
                    bad_in_row += not finite
                optimizer.zero_grad()
                step += 1
                seq_tokens = sum(b["input_ids"].numel() for b in micro)
                tokens_seen += seq_tokens
                elapsed = time.perf_counter() - start
                tps = seq_tokens / elapsed
                record = {"kind": "train", "step": step, "loss": loss_sum / n_tokens if applied else None,
                          "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "loss_tokens": n_tokens, "tokens": tokens_seen, "tokens_per_s": round(tps, 2),
                          "mfu": mfu(model.args, seq_tokens, elapsed, cfg.max_seq_len, peak_flops),
                          "step_time_s": round(elapsed, 4),
                          "skipped": skipped, **memory_bytes(device), **moe_stats(model)}
                if byte_level and record["loss"] is not None:
                    record["bpb"] = record["loss"] / math.log(2)  # byte tokens: nats/token -> bits per byte
                metrics.append(record)
                log.log(record)
                if bad_in_row >= cfg.max_bad_steps:
                    raise VerseError(f"loss or gradient was NaN/inf for {bad_in_row} steps in a row (up to step "
                                     f"{step}); lower lr (now {cfg.lr}), raise warmup_steps or set grad_clip")
                if bar is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "skip",
                                    **({"bpb": f"{record['bpb']:.3f}"} if "bpb" in record else {}),
                                    tok_s=f"{tps:.0f}",
                                    mfu=f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a")
                if eval_loader is not None and cfg.eval_every and (step % cfg.eval_every == 0
                                                                   or step == cfg.max_steps):
                    eval_loss = evaluate(model, eval_loader, cfg.eval_batches, device, autocast, cfg.loss_chunk_size)
                    record = {"kind": "eval", "step": step, "eval_loss": eval_loss,
                              "eval_ppl": math.exp(min(eval_loss, 50))}
                    if byte_level:
                        record["eval_bpb"] = eval_loss / math.log(2)
                    metrics.append(record)
                    log.log(record)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    final_dir = save()
            if final_dir is None or not final_dir.name.endswith(f"{step:07d}"):
                final_dir = save()
    finally:
        log.close()
        if bar is not None:
            bar.close()
    if stop.signum is not None:
        print(f"stopped by signal {stop.signum} at step {step}; saved {final_dir}; "
              f"continue with `verse train --resume {run_dir}`")
    if cfg.plot and metrics:
        plot_run(run_dir)
    return TrainResult(run_dir=run_dir, final_dir=final_dir, metrics=metrics, step=step,
                       stopped_by_signal=stop.signum is not None)


def adapter_base(cfg: TrainConfig) -> Optional[str]:
    """For LoRA/QLoRA runs, the absolute path of the base checkpoint their adapters name (None when full)."""
    return None if cfg.finetune_method == "full" else str(Path(cfg.model).resolve())


def _load_weights(model: ReasoningLLM, step_dir: Path) -> None:
    """Copy a checkpoint's weights into `model` in place (same architecture; values and dtype exact); a LoRA run's
    checkpoint holds only the adapter."""
    from verse.interop.hf import load_into
    from verse.peft import is_adapter_dir, load_adapter

    if is_adapter_dir(step_dir):
        load_adapter(model, step_dir)
        return

    load_into(model, step_dir)


def load_run_config(run_dir: str | Path, overrides=()) -> TrainConfig:
    """The configuration a run was started with (`RUN_DIR/config.yaml`), with `key=value` overrides applied."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a training run directory (no {CONFIG_FILE})")
    cfg = TrainConfig.load(str(path), overrides)
    return dataclasses.replace(cfg, out_dir=str(run_dir))
