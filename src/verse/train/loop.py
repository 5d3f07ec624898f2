"""`train(cfg)`: the loop behind `verse train` (pretraining, SFT, GRPO; one process or every torchrun rank)."""

import contextlib
import dataclasses
import itertools
import math
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import yaml

from verse.config import ModelArgs, list_presets
from verse.devices import resolve_device
from verse.errors import CheckpointError, ConfigError, VerseError
from verse.interop.dcp import is_sharded, load_sharded
from verse.model import ReasoningLLM
from verse.tokenization.presets import preset_args, run_tokenizer
from verse.train import checkpoint as ckpt
from verse.train.config import TrainConfig
from verse.train.distributed import Dist, ParallelConfig, env_world, init_distributed, is_comm_failure
from verse.train.heap import reuse_freed_memory
from verse.train.loss import IGNORE_INDEX, batch_loss
from verse.train.metrics import (MetricsLog, compute_dtype, device_peak_flops, memory_bytes, mfu, moe_stats,
                                 plot_run)
from verse.train.optim import TrainOptimizer
from verse.train.parallelize import apply_ac, update_router_bias
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
    is_main: bool = True


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
    """`cfg.tokenizer`; else the checkpoint's own; else the preset's (`verse.tokenization.presets.run_tokenizer`)."""
    from verse.tokenization import load_tokenizer as load

    return load(run_tokenizer(cfg.model, cfg.tokenizer))


def build_model(cfg: TrainConfig, device: torch.device, tokenizer: Any = None, dist: Optional[Dist] = None
                ) -> ReasoningLLM:
    """A preset gives a freshly initialised model (its vocabulary sized to `tokenizer` unless overridden);
    a path loads a checkpoint or .gguf. With several ranks the model is built on the meta device and sharded
    (`verse.train.parallelize`) before any weight exists."""
    overrides = dict(cfg.model_overrides)
    if cfg.activation_checkpointing:
        overrides.update(checkpointing=True, checkpoint_every=cfg.activation_checkpointing)
    if is_preset(cfg):
        if cfg.mode in ("sft", "grpo"):
            raise ConfigError(f"mode={cfg.mode} fine-tunes a pretrained checkpoint, but model={cfg.model} is a "
                              "preset (random weights): give model=PATH, or mode=pretrain")
        if cfg.finetune_method != "full":
            raise ConfigError(f"finetune.method={cfg.finetune_method} adapts a pretrained checkpoint, but "
                              f"model={cfg.model} is a preset (random weights): give model=PATH")
        args = preset_args(cfg.model, tokenizer, **{**overrides, "dtype": cfg.param_dtype})
        if dist is not None and dist.enabled:
            model = _sharded_model(cfg, args, dist)
        else:
            with torch.device(device):
                model = ReasoningLLM(args)
    elif dist is not None and dist.enabled:
        model = _sharded_pretrained(cfg, overrides, dist)
    else:
        from verse.interop.load import load_model

        qlora = cfg.finetune_method == "qlora"  # the bf16 base is read on the CPU and quantized layer by layer
        model = load_model(cfg.model, device="cpu" if qlora else device,
                           dtype=torch.bfloat16 if qlora else getattr(torch, cfg.param_dtype), **overrides)
        apply_finetune(model, cfg, device)
    if cfg.max_seq_len > model.args.max_seq_len:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds the model's limit ({model.args.max_seq_len}); "
                          f"lower max_seq_len")
    if model.args.checkpointing:  # activation_checkpointing=k (or a model override): applied from outside
        apply_ac(model, every=model.args.checkpoint_every)
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


def apply_finetune(model: ReasoningLLM, cfg: TrainConfig, device: torch.device) -> None:
    """LoRA / QLoRA of `cfg.finetune` applied to a loaded base in place: frozen base (QLoRA: quantized to NF4 on
    `device`, layer by layer), trainable adapters (`verse.peft`); nothing for a full fine-tune.

    Args:
        model (ReasoningLLM): the base model (for QLoRA in bf16, on the CPU or on `device`).
        cfg (TrainConfig): its `finetune_method`, `lora_args()` and `param_dtype` (the adapters' dtype).
        device (torch.device): where the NF4 weights go.
    """
    lora = cfg.lora_args()
    if lora is None:
        return
    from verse.peft import apply_lora, quantize_nf4_

    if cfg.finetune_method == "qlora":
        quantize_nf4_(model, device=device)
    apply_lora(model, lora, dtype=getattr(torch, cfg.param_dtype))


def _sharded_model(cfg: TrainConfig, args: ModelArgs, dist: Dist) -> ReasoningLLM:
    """A fresh model built on meta, sharded, then initialised shard by shard (values as on one process)."""
    from verse.train.parallelize import init_sharded, parallelize

    with torch.device("meta"):
        model = ReasoningLLM(args)
    parallelize(model, dist, param_dtype=_fsdp_param_dtype(cfg))
    init_sharded(model, dist.device, cfg.seed)
    return model


def _sharded_pretrained(cfg: TrainConfig, overrides: Dict[str, Any], dist: Dist) -> ReasoningLLM:
    """A checkpoint read on rank 0 (CPU) and scattered: every other rank only ever holds its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from verse.interop.load import load_model
    from verse.train.parallelize import parallelize

    dtype = getattr(torch, cfg.param_dtype)
    lora = cfg.lora_args()
    if lora is not None:
        _check_lora_layout(cfg, dist)
    if cfg.finetune_method == "qlora":
        return _sharded_qlora(cfg, overrides, dist)
    full = load_model(cfg.model, device="cpu", dtype=dtype, **overrides) if dist.is_main else None
    args = ModelArgs.from_dict(dist.broadcast_object(full.args.to_dict() if full is not None else None))
    with torch.device("meta"):
        model = ReasoningLLM(args)
    if lora is not None:  # adapters before sharding: FSDP2 shards them with the frozen base (one process's values)
        from verse.peft import apply_lora

        if full is not None:  # rank 0 draws the adapters' initial values as one process would
            apply_lora(full, lora, dtype=dtype)
        apply_lora(model, lora, dtype=dtype)
        torch.set_rng_state(dist.broadcast_object(torch.get_rng_state()))  # every rank continues from there
    parallelize(model, dist, param_dtype=_fsdp_param_dtype(cfg))
    model.to_empty(device=dist.device)
    model.reset_buffers()
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _sharded_qlora(cfg: TrainConfig, overrides: Dict[str, Any], dist: Dist) -> ReasoningLLM:
    """QLoRA's model under FSDP2: every rank reads the bf16 base on the CPU and quantizes it to NF4 itself (the same
    values everywhere: quantization is deterministic), adds the adapters (the same draws: one seed), then shards it;
    torchao's NF4Tensor implements FSDP2's all-gather hooks, so the NF4 base is sharded as NF4."""
    from verse.interop.load import load_model
    from verse.peft import apply_lora, quantize_nf4_
    from verse.peft.qlora import check_nf4_shardable
    from verse.train.parallelize import dp_mesh, parallelize

    model = load_model(cfg.model, device="cpu", dtype=torch.bfloat16, **overrides)
    quantize_nf4_(model)
    check_nf4_shardable(model, dp_mesh(dist).size(-1))
    apply_lora(model, cfg.lora_args(), dtype=getattr(torch, cfg.param_dtype))
    parallelize(model, dist, param_dtype=_fsdp_param_dtype(cfg))  # fully_shard moves the shards to the device
    return model


def _check_lora_layout(cfg: TrainConfig, dist: Dist) -> None:
    """Adapters are sharded by FSDP2 over the data-parallel ranks (`dp_shard`, `dp_replicate`); refuse, in one
    line, the layouts that would split them in ways not built yet."""
    split = [f"parallel.{k}={getattr(dist.parallel, k)}" for k in ("tp", "ep") if getattr(dist.parallel, k) > 1]
    if split:
        raise ConfigError(f"finetune.method={cfg.finetune_method} with {', '.join(split)}: adapters are sharded over "
                          "data-parallel ranks only; use parallel.dp_shard / parallel.dp_replicate (tp=1, ep=1)")


def _fsdp_param_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """bf16 compute with fp32 stored parameters: FSDP2 all-gathers bf16 and reduces gradients in fp32."""
    return torch.bfloat16 if cfg.precision in ("bf16", "fp8") and cfg.param_dtype == "float32" else None


def build_loaders(cfg: TrainConfig, tokenizer: Any, dist: Optional[Dist] = None):
    """Train loader and (when evaluating) eval loader from the `data:` section; each data-parallel rank reads
    its own share of every source."""
    from verse.data import build_loader

    common = dict(max_seq_len=cfg.max_seq_len, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                  rank=dist.dp_rank if dist else 0, world_size=dist.dp_size if dist else 1)
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


def compiles_blocks(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run compiles its blocks: `compile`, or when unset (auto) on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def prepare_model(model: ReasoningLLM, cfg: TrainConfig, device: torch.device) -> None:
    """The speed options of a run, applied to `model` in place (by `verse train` and `verse bench train` alike).

    `precision: fp8` swaps the blocks' linear layers for torchao float8 ones (`verse.train.fp8`), then per-block
    `torch.compile` (regional compilation: one compiled graph reused by every layer of the same shape, so compile
    time stays short; `compiles_blocks`).

    Args:
        model (ReasoningLLM): the model to train.
        cfg (TrainConfig): `precision`, `fp8_recipe`, `compile`.
        device (torch.device): where it trains.

    Raises:
        ConfigError: precision=fp8 where FP8 training cannot run.
    """
    if cfg.precision == "fp8":
        from verse.train.fp8 import convert_to_fp8

        convert_to_fp8(model, cfg.fp8_recipe, device)
    if compiles_blocks(cfg, device):
        for layer in model.layers:
            layer.compile()


@dataclass
class StepTensors:
    """What `step_tensors` leaves on the device (reading any of them is a host-device sync).

    Attributes:
        loss_sum (torch.Tensor): summed token loss of the step (over all ranks), fp32; non-finite when a
            micro-batch's loss was.
        n_tokens (torch.Tensor): loss tokens of the step (over all ranks), int64.
        grad_norm (torch.Tensor): the global gradient norm before clipping.
        applied (torch.Tensor): bool, whether the update ran (finite loss and norm, and loss tokens).
    """

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    grad_norm: torch.Tensor
    applied: torch.Tensor


def step_tensors(model: ReasoningLLM, optimizer: TrainOptimizer, micro: List[Dict[str, torch.Tensor]],
                 cfg: TrainConfig, autocast: contextlib.AbstractContextManager, dist: Optional[Dist] = None
                 ) -> StepTensors:
    """One optimizer step over the micro-batches of an accumulation step, without a host-device sync.

    The loss is normalised over the loss tokens of ALL micro-batches of all ranks (not per micro-batch), so
    micro-batch 1 x accumulation 8 equals micro-batch 8 x accumulation 1, and N ranks equal one process with
    N times the batch. A NaN/inf loss or gradient norm skips the update (on every rank): fused AdamW skips inside
    its kernel, as `torch.amp.GradScaler` makes it, so nothing waits for the device. The host waits only where the
    decision cannot stay on the device: several ranks, `fused_backward` (which steps inside backward, so a
    non-finite loss must be seen before it), other optimizers, router-bias balancing, and the MoE layers' own
    routing.

    Returns:
        StepTensors: the step's loss sum, loss tokens, gradient norm and whether it was applied, on the device.
    """
    dist = dist or Dist()
    n_tokens = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro]).sum()
    if dist.enabled:
        n_tokens = torch.tensor(int(dist.sum(int(n_tokens))), device=n_tokens.device)
    # the MoE balance loss, too, is a mean over the accumulation step and the data-parallel ranks
    aux_loss_scale = 1.0 / (len(micro) * dist.dp_size)
    loss_sum = torch.zeros((), dtype=torch.float32, device=n_tokens.device)
    for i, b in enumerate(micro):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 reduces the gradients once, after the last
            model.set_requires_gradient_sync(i == len(micro) - 1)
        with autocast:
            loss = batch_loss(model, b, cfg.loss_chunk_size, aux_loss_scale)
        loss_sum = loss_sum + loss.detach()
        if cfg.fused_backward and not dist.enabled and not bool(torch.isfinite(loss)):
            break  # checked before backward: fused_backward would already have stepped
        # no loss tokens: the gradient is zero and the update skipped (several ranks: backward runs anyway, as
        # its collectives must match)
        (loss / n_tokens.clamp(min=1)).backward()
    if dist.enabled:
        loss_sum = torch.tensor(dist.sum(float(loss_sum)), dtype=torch.float32, device=n_tokens.device)
    grad_norm = optimizer.clip_and_norm(cfg.grad_clip)
    applied = torch.isfinite(loss_sum) & torch.isfinite(grad_norm) & (n_tokens > 0)
    optimizer.step(skip=~applied)
    if model_balances_by_bias(model) and bool(applied):
        update_router_bias(model)  # DeepSeek-V3 auxiliary-loss-free balancing
    optimizer.zero_grad()
    return StepTensors(loss_sum, n_tokens, grad_norm, applied)


def model_balances_by_bias(model: torch.nn.Module) -> bool:
    """Whether any MoE layer of `model` balances its experts by a router bias (updated after each step)."""
    return any(moe.balances_by_bias for moe in getattr(model, "moe_layers", {}).values())


def train_step(model: ReasoningLLM, optimizer: TrainOptimizer, micro: List[Dict[str, torch.Tensor]],
               cfg: TrainConfig, autocast: contextlib.AbstractContextManager, dist: Optional[Dist] = None):
    """`step_tensors`, read back on the host (the step's one sync, for its metrics record).

    Returns:
        tuple: (summed loss or None when non-finite, loss tokens, grad norm or None (loss non-finite or no loss
        tokens), whether the update ran).
    """
    out = step_tensors(model, optimizer, micro, cfg, autocast, dist)
    loss_sum, n_tokens = float(out.loss_sum), int(out.n_tokens)
    finite = math.isfinite(loss_sum)
    grad_norm = out.grad_norm if finite and n_tokens else None
    return (loss_sum if finite else None), n_tokens, grad_norm, bool(out.applied)


class _StopSignal:
    """SIGTERM / SIGINT: the first lets the step finish, then the loop saves a checkpoint and stops; a second waits
    for that save (saying so, so a run is never lost to an impatient Ctrl-C); only a third aborts. Under torchrun
    every rank gets the signal and only rank 0 (`speak`) says so."""

    def __init__(self, speak: bool = True):
        self.signum: Optional[int] = None
        self.count = 0
        self.speak = speak
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
            if self.speak:
                _say("verse train: stopping: finishing this step and saving a checkpoint")
        elif self.count == 2:
            if self.speak:
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
             autocast: contextlib.AbstractContextManager, chunk_size: int, dist: Optional[Dist] = None) -> float:
    """Mean token loss over the first `n_batches` micro-batches of `loader` (NaN when it has no loss tokens);
    with several ranks, over their batches together (they stop together when the shortest share ends)."""
    dist = dist or Dist()
    model.eval()
    total, tokens = 0.0, 0
    batches = iter(loader)
    try:
        for i in itertools.count():
            batch = next(batches, None)
            if i >= n_batches or dist.any(batch is None):  # ranks run the same forwards (FSDP all-gathers in each)
                break
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            with autocast:
                total += batch_loss(model, batch, chunk_size).item()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    finally:
        model.train()
    total, tokens = dist.sum(total), dist.sum(tokens)
    return total / tokens if tokens else float("nan")


def train(cfg: TrainConfig, *, resume: bool = False, loader: Optional[Iterable] = None,
          eval_loader: Optional[Iterable] = None, tokenizer: Any = None, progress: bool = True,
          algorithm: Optional[Callable] = None) -> TrainResult:
    """Run training as configured; what `verse train` calls.

    Args:
        cfg (TrainConfig): the configuration (validated).
        resume (bool): continue the run in `cfg.out_dir` from its `latest` checkpoint, exactly.
        loader (Optional[Iterable]): micro-batches (dicts of `input_ids`, shifted `labels`, optional
            `position_ids`) with `state_dict`/`load_state_dict`; default `verse.data.build_loader(cfg.data, ...)`.
        eval_loader (Optional[Iterable]): held-out micro-batches; default the data's eval split.
        tokenizer: saved with each checkpoint; default loaded from `cfg.tokenizer` / the model.
        progress (bool): show a tqdm progress bar.
        algorithm (Optional[Callable]): mode=grpo: `(cfg, model, tokenizer, dist=Dist) ->` the object that runs
            each step in place of `train_step` (`step(optimizer, step, autocast)`, `evaluate()`, `args.eval_every`),
            optionally with a `check_layout(cfg, parallel)` run before anything is built;
            `verse.rl.trainer.train_grpo` passes its `GrpoTrainer`.

    Under `torchrun` (WORLD_SIZE > 1) every rank runs this: the `parallel:` section lays the ranks out, `loader`
    (when given) must yield this data-parallel rank's share of each global batch, and only rank 0 prints,
    logs and draws the progress bar.

    Returns:
        TrainResult: run directory, last checkpoint, per-step metrics.
    """
    cfg.validate()
    if (cfg.mode == "grpo") != (algorithm is not None):
        raise ConfigError("mode=grpo runs through verse.rl.trainer.train_grpo (as `verse train` does), and only it "
                          "takes an algorithm")
    if algorithm is not None and hasattr(algorithm, "check_layout"):  # e.g. prompts the ranks do not divide
        algorithm.check_layout(cfg, ParallelConfig.from_dict(cfg.parallel).resolve(env_world()[1]))
    run_dir = Path(cfg.out_dir).expanduser()
    # everything a user can get wrong is checked before anything heavy runs or anything is written
    if loader is None:
        check_data(cfg)
    ckpt.check_run_dir(run_dir, resume)
    device = resolve_device(cfg.device)
    if cfg.precision == "fp8":
        from verse.train.fp8 import fp8_unsupported

        reason = fp8_unsupported(device)
        if reason is not None:
            raise ConfigError(reason, "precision")
    is_preset(cfg)  # the model names a preset or an existing path
    dist = init_distributed(ParallelConfig.from_dict(cfg.parallel), device)
    try:
        # on CPU the steps' large temporaries reuse freed heap pages instead of faulting in fresh ones (heap.py)
        with reuse_freed_memory(device.type == "cpu"):
            return _train(cfg, dist, run_dir, resume=resume, loader=loader, eval_loader=eval_loader,
                          tokenizer=tokenizer, progress=progress, algorithm=algorithm)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, run_dir: Path, *, resume: bool, loader: Optional[Iterable],
           eval_loader: Optional[Iterable], tokenizer: Any, progress: bool, algorithm: Optional[Callable] = None
           ) -> TrainResult:
    device = dist.device
    step, skipped, bad_in_row, tokens_seen = 0, 0, 0, 0
    if resume:
        dist.barrier()  # every rank has checked the run directory before rank 0 tidies it
        if dist.is_main:
            ckpt.clean_partial(run_dir)
        dist.barrier()
        step_dir, step = ckpt.latest_checkpoint(run_dir)
        if step >= cfg.max_steps:
            if dist.is_main:
                print(f"{run_dir}: already finished ({step_dir.name}, max_steps={cfg.max_steps}); nothing to do. "
                      f"To train on, give a larger max_steps: `verse train --resume {run_dir} max_steps=N`")
            return TrainResult(run_dir=run_dir, final_dir=step_dir, step=step, is_main=dist.is_main)
        state = ckpt.load_state(step_dir / ckpt.STATE_DIR, device, required=STATE_KEYS)
        if is_sharded(step_dir):
            state["loader"] = _loader_state(state["loaders"], dist, step_dir)
        elif dist.enabled:
            raise ConfigError(f"{step_dir} was written by one process: resume it with one process (plain "
                              f"`verse train --resume`), or start the distributed run from it with model={step_dir}")
    seed_everything(cfg.seed)  # the same seed on every rank: they agree on everything random
    if loader is None and tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    byte_level = getattr(tokenizer, "name", None) == "byte" and cfg.mode != "grpo"  # then also log bits per byte
    model = build_model(cfg, device, tokenizer, dist)
    if tokenizer is not None:  # e.g. the byte tokenizer without special ids for a 256-id ByteGPT
        tokenizer = tokenizer.fit_vocab(model.args.vocab_size, f"model={cfg.model}")
    rl = None
    if algorithm is not None:  # GRPO samples its own batches from the data's prompts (verse.rl)
        rl = algorithm(cfg, model, tokenizer, dist=dist)
    elif loader is None:
        loader, default_eval = build_loaders(cfg, tokenizer, dist)
        eval_loader = eval_loader if eval_loader is not None else default_eval
    optimizer = TrainOptimizer(model, cfg)
    if dist.enabled:
        optimizer.torch_optimizer()  # sharded checkpoints need it: say so before the first step, not at the save

    if resume:
        try:
            if is_sharded(step_dir):
                load_sharded(step_dir, model, optimizer.torch_optimizer())
            else:
                _load_weights(model, step_dir)
                optimizer.load_state_dict(state["optimizer"])
            if state.get("loader") is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(state["loader"])
            ckpt.set_rng_state(state["rng"])
        except ConfigError as e:  # e.g. a data position that cannot continue on this number of ranks
            raise ConfigError(f"{step_dir}: {e}") from None
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{step_dir / ckpt.STATE_DIR}: the training state does not fit this run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume "
                                  f"with the configuration the run was started with") from None
        skipped, bad_in_row, tokens_seen = state["skipped"], state["bad_in_row"], state["tokens_seen"]
        del state
        if not ckpt.is_run_dir(run_dir) and dist.is_main:  # a run from before the marker
            ckpt.create_run_dir(run_dir)
    elif dist.is_main:
        ckpt.create_run_dir(run_dir)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    prepare_model(model, cfg, device)

    def save() -> Path:
        state = {"step": step, "skipped": skipped, "bad_in_row": bad_in_row, "tokens_seen": tokens_seen,
                 "rng": ckpt.rng_state(), "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        if dist.enabled:
            return ckpt.save_sharded(run_dir, step, model, optimizer.torch_optimizer(), state, dist,
                                     tokenizer=tokenizer, keep_last=cfg.keep_last, adapter_base=adapter_base(cfg))
        state["optimizer"] = optimizer.state_dict()
        return ckpt.save_checkpoint(run_dir, step, model, state, tokenizer=tokenizer, keep_last=cfg.keep_last,
                                    adapter_base=adapter_base(cfg))

    autocast = cfg.autocast(device)
    # tokens/s are the whole job's: the peak of all its devices
    peak_flops = (cfg.peak_flops or device_peak_flops(device, compute_dtype(cfg.precision, cfg.param_dtype))
                  ) * dist.world_size
    log = MetricsLog(run_dir, tensorboard=cfg.tensorboard) if dist.is_main else _NoLog()
    batches = _Batches(loader)
    metrics: List[Dict[str, Any]] = []
    final_dir: Optional[Path] = step_dir if resume else None  # never re-save a step: it is on disk already
    stop = _StopSignal(speak=dist.is_main)
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        with stop:
            while step < cfg.max_steps and not dist.any(stop.signum is not None):  # a signal stops every rank
                start = time.perf_counter()
                lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, max_steps=cfg.max_steps,
                           warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
                optimizer.set_lr(lr)
                extra: Dict[str, Any] = {}
                try:
                    if rl is not None:
                        loss_sum, n_tokens, grad_norm, applied, seq_tokens, extra = rl.step(optimizer, step, autocast)
                    else:
                        micro = [{k: v.to(device, non_blocking=True) for k, v in batches.next().items()
                                  if torch.is_tensor(v)} for _ in range(cfg.gradient_accumulation_steps)]
                        loss_sum, n_tokens, grad_norm, applied = train_step(model, optimizer, micro, cfg, autocast,
                                                                            dist)
                        seq_tokens = int(dist.sum(sum(b["input_ids"].numel() for b in micro)))
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
                tokens_seen += seq_tokens
                elapsed = time.perf_counter() - start
                tps = seq_tokens / elapsed
                record = {"kind": "train", "step": step, "loss": loss_sum / n_tokens if applied else None,
                          "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "loss_tokens": n_tokens, "tokens": tokens_seen, "tokens_per_s": round(tps, 2),
                          "mfu": mfu(model.args, seq_tokens, elapsed, cfg.max_seq_len, peak_flops),
                          "step_time_s": round(elapsed, 4),
                          "skipped": skipped, **extra, **memory_bytes(device), **moe_stats(model)}
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
                                    **({"reward": f"{extra['reward_mean']:.3f}"} if extra else {}),
                                    **({"bpb": f"{record['bpb']:.3f}"} if "bpb" in record else {}),
                                    tok_s=f"{tps:.0f}",
                                    mfu=f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a")
                if eval_loader is not None and cfg.eval_every and (step % cfg.eval_every == 0
                                                                   or step == cfg.max_steps):
                    eval_loss = evaluate(model, eval_loader, cfg.eval_batches, device, autocast, cfg.loss_chunk_size,
                                         dist)
                    record = {"kind": "eval", "step": step, "eval_loss": eval_loss,
                              "eval_ppl": math.exp(min(eval_loss, 50))}
                    if byte_level:
                        record["eval_bpb"] = eval_loss / math.log(2)
                    metrics.append(record)
                    log.log(record)
                if rl is not None and rl.args.eval_every and (step % rl.args.eval_every == 0
                                                              or step == cfg.max_steps):
                    held_out = rl.evaluate()  # eval_accuracy, eval_problems
                    record = {"kind": "eval", "step": step, **{f"eval_{k}": v for k, v in held_out.items()}}
                    metrics.append(record)
                    log.log(record)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    final_dir = save()
            if final_dir is None or not final_dir.name.endswith(f"{step:07d}"):
                final_dir = save()
    except RuntimeError as e:
        if not (dist.enabled and is_comm_failure(e)):
            raise
        raise VerseError(_lost_rank_message(dist, step, run_dir, e)) from None
    finally:
        log.close()
        if bar is not None:
            bar.close()
    if stop.signum is not None and dist.is_main:
        print(f"stopped by signal {stop.signum} at step {step}; saved {final_dir}; "
              f"continue with `verse train --resume {run_dir}`")
    if cfg.plot and metrics and dist.is_main:
        plot_run(run_dir)
    return TrainResult(run_dir=run_dir, final_dir=final_dir, metrics=metrics, step=step,
                       stopped_by_signal=stop.signum is not None, is_main=dist.is_main)


class _NoLog:
    """The metrics log of ranks other than 0: they compute the same numbers and write none."""

    def log(self, record: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _lost_rank_message(dist: Dist, step: int, run_dir: Path, e: BaseException) -> str:
    """One line for a collective that failed because another rank died or hung: what, and how to go on."""
    try:
        last = f"the last complete checkpoint, {ckpt.latest_checkpoint(run_dir)[0]}, is intact: continue with " \
               f"`torchrun ... -m verse train --resume {run_dir}`"
    except VerseError:
        last = "no checkpoint was completed yet"
    cause = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]) if str(e) else type(e).__name__  # no source path
    return (f"rank {dist.rank}: lost contact with another rank during step {step + 1} ({cause[:160]}); every rank "
            f"stops (a rank died, or hung longer than parallel.timeout_s={dist.parallel.timeout_s:g}); {last}")


def _loader_state(saved: List[Any], dist: Dist, step_dir: Path) -> Any:
    """This rank's data position from the positions of the data-parallel ranks that saved `step_dir`.

    Verse's loader saves one global position (the same on every rank), which continues on any number of ranks; a
    per-rank position (a Hub stream's share, or a loader of state version 1, from before the global order) only on
    as many ranks as saved it: the loader checks that against the `world_size` recorded here.
    """
    if len(saved) == dist.dp_size:
        state = saved[dist.dp_rank]
    elif all(s == saved[0] for s in saved):  # a position that does not depend on the rank count
        state = saved[0]
    else:
        raise ConfigError(f"{step_dir}: the data position was saved by {len(saved)} data-parallel ranks, each reading "
                          f"its own share of the sources; resume with {len(saved)} data-parallel ranks "
                          f"(now {dist.dp_size})")
    if isinstance(state, dict) and state.get("version") == 1:  # per-rank shares of this many ranks
        state = {**state, "world_size": len(saved)}
    return state


def adapter_base(cfg: TrainConfig) -> Optional[str]:
    """For LoRA/QLoRA runs, the absolute path of the base checkpoint their adapters name (None when full)."""
    return None if cfg.finetune_method == "full" else str(Path(cfg.model).resolve())


def _load_weights(model: ReasoningLLM, step_dir: Path) -> None:
    """Copy a checkpoint's weights into `model` in place (same architecture; values and dtype exact); a LoRA run's
    checkpoint holds only the adapter."""
    from verse.interop.hf import load_into
    from verse.interop.adapter import is_adapter_dir, load_adapter

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
