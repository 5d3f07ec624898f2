"""`verse quickstart`: fine-tune SmolLM2-135M-Instruct on a synthetic reasoning task, offline, and show the gain.

The run directory ends up with everything a user needs to repeat, edit or continue the run::

    RUN/data/{train,heldout}.jsonl   the generated task (OpenThoughts schema)
    RUN/train.yaml                   the `verse train` config the SFT ran with
    RUN/train/                       the training run (checkpoint, metrics.jsonl, config.yaml)
    RUN/rl.yaml, RUN/rl/             with --rl: the GRPO config and run that continue from the SFT model
    RUN/final/                       the fine-tuned model (transformers-loadable)
    RUN/report.md, RUN/loss_curve.png, RUN/quickstart.json, RUN/samples.jsonl
"""

import contextlib
import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from verse.errors import VerseError
from verse.publish import staged
from verse.quickstart import task

MARKER = "quickstart.json"
# what a quickstart writes into its run directory (besides MARKER); a rerun deletes only recorded files in these
OWN_ENTRIES = ("data", "train.yaml", "train", "rl.yaml", "rl", "final", "report.md", "loss_curve.png",
               "samples.jsonl")
# peak learning rate by fine-tuning method: adapters start at zero and need a larger step than full weights
DEFAULT_LR = {"full": 2e-4, "lora": 1e-3, "qlora": 1e-3}
LORA = {"rank": 16, "alpha": 32, "targets": ["all"]}
LAST_NUMBER = r"(-?\d+)"
# with --rl: SFT, then GRPO, which reinforces whatever its samples get right. After 10 or 16 SFT steps the sampled
# tallies were right 12-19% of the time, less than guessing the commonest count (`Answer: 1`, a third of the
# problems): GRPO learned to cut the tally short and guess (held-out 25 -> 30%, 44 -> 30%). SFT runs its full course:
# its samples at RL_TEMPERATURE are right 50% of the time, pass@8 75% (greedy 56%; 16 held-out problems)
RL_SFT_STEPS = 30
RL_LR = 2e-5
# rollouts at 0.7: at 1.0 the samples scramble the tally, right far less often than the greedy reply (16% vs 44%)
RL_TEMPERATURE = 0.7


@dataclass
class QuickstartConfig:
    """Sizes and knobs of the quickstart (the defaults finish in about 10 minutes on a 2-core CPU).

    Attributes:
        out_dir (str): run directory (an earlier quickstart's recorded files there are replaced, nothing else).
        steps (int): most SFT optimizer steps.
        budget_s (float): target wall time of the whole run in seconds; fewer steps are run when a measured
            step would not fit (0 = no limit).
        seed (int): seed of the task generator and of training.
        n_train (int): training problems generated (the run samples from them).
        n_eval (int): held-out problems scored before and after.
        lr (Optional[float]): peak learning rate (default: `DEFAULT_LR` of the fine-tuning method).
        finetune (str): full (every weight), lora or qlora (adapters of `LORA`; the base stays frozen).
        micro_batch_size (int): packed rows per step.
        max_seq_len (int): tokens per packed row.
        eval_batch_size (int): problems generated together.
        max_new_tokens (int): reply length limit when scoring.
        device (str): auto | cpu | cuda.
        rl (bool): continue after SFT (capped at `RL_SFT_STEPS` steps) with `rl_steps` GRPO steps on the same
            task, rewarded for the right `Answer: N` (sampled at `RL_TEMPERATURE`).
        rl_steps (int): GRPO steps (held-out accuracy along one 32-step run from a 68.8% SFT model: 67.2% at
            step 16, 78.1% at 24, 85.9% at 32; 20 steps gave 73.4-82.8% over two runs).
    """

    out_dir: str = "runs/quickstart"
    steps: int = 30
    budget_s: float = 600.0
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 64
    lr: Optional[float] = None
    finetune: str = "full"
    micro_batch_size: int = 3
    max_seq_len: int = 256
    eval_batch_size: int = 32
    max_new_tokens: int = 112
    device: str = "auto"
    rl: bool = False
    rl_steps: int = 32


@dataclass
class QuickstartResult:
    """Measured outcome of a quickstart run (every number comes from this run).

    Attributes:
        run_dir (Path): the run directory.
        final_dir (Path): the fine-tuned model.
        numbers (Dict[str, Any]): accuracies, losses, throughput, memory and timings (also in quickstart.json).
        samples (List[Dict[str, Any]]): held-out replies before and after.
    """

    run_dir: Path
    final_dir: Path
    numbers: Dict[str, Any] = field(default_factory=dict)
    samples: List[Dict[str, Any]] = field(default_factory=list)


def own_files(run_dir: Path) -> List[str]:
    """Every file and link under the quickstart's own entries (`OWN_ENTRIES`), relative to `run_dir`, sorted."""
    found = []
    for name in OWN_ENTRIES:
        entry = run_dir / name
        if entry.is_symlink() or entry.is_file():
            found.append(name)
        elif entry.is_dir():
            for root, dirs, files in os.walk(entry):  # links to directories are listed, not followed
                found += [os.path.relpath(os.path.join(root, f), run_dir) for f in files]
                found += [os.path.relpath(os.path.join(root, d), run_dir) for d in dirs
                          if os.path.islink(os.path.join(root, d))]
    return sorted(found)


def record_run(run_dir: Path, numbers: Dict[str, Any]) -> None:
    """Write the marker: `numbers` and the list of files this quickstart wrote (the only ones a rerun deletes)."""
    text = json.dumps({**numbers, "files": own_files(run_dir)}, indent=2, default=str) + "\n"
    with staged(run_dir / MARKER, directory=False, replace=True) as tmp:
        tmp.write_text(text)


def _recorded_files(run_dir: Path) -> List[str]:
    """The files an earlier quickstart in `run_dir` recorded as its own (only relative paths in `OWN_ENTRIES`)."""
    marker = run_dir / MARKER
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not isinstance(files, list):
        raise VerseError(f"--out {run_dir}: {MARKER} records no list of files (an interrupted or older quickstart, "
                         f"or not Verse's); delete the directory yourself or choose another --out")
    safe = [f for f in files if isinstance(f, str) and not Path(f).is_absolute()]
    return [f for f in safe if Path(f).parts and Path(f).parts[0] in OWN_ENTRIES and ".." not in Path(f).parts]


def prepare_run_dir(out_dir: str | Path) -> Path:
    """Create the run directory. An earlier quickstart there is removed: exactly the files it recorded in its
    marker, then its directories left empty; anything else (a user's file, even inside `final/`) is kept.

    Raises:
        VerseError: when `out_dir` exists, is not empty and is not a quickstart run, or when a user's file lies where
            the quickstart writes (its own entries `OWN_ENTRIES`).
    """
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise VerseError(f"--out {run_dir}: exists and is not a directory; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).is_file():
            raise VerseError(f"--out {run_dir}: directory exists and is not a quickstart run; choose another --out")
        for name in _recorded_files(run_dir):
            if (run_dir / name).is_symlink() or (run_dir / name).is_file():
                (run_dir / name).unlink()
        for name in OWN_ENTRIES:
            for root, _, _ in os.walk(run_dir / name, topdown=False):  # deepest first; only empty ones go
                with contextlib.suppress(OSError):
                    os.rmdir(root)
        left = own_files(run_dir) or [n for n in OWN_ENTRIES if (run_dir / n).exists()]
        if left:
            raise VerseError(f"--out {run_dir}: {run_dir / left[0]} is not among the files the earlier quickstart "
                             f"recorded (a file of yours, or of a run killed before recording it) and lies where "
                             f"the quickstart writes; move it away or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    record_run(run_dir, {"status": "running"})  # replaced by the numbers at the end
    return run_dir


def train_config(cfg: QuickstartConfig, run_dir: Path, model_path: str, steps: int, device: torch.device,
                 peak_flops: float = 0.0) -> Dict[str, Any]:
    """The `verse train` config of the SFT (written to RUN/train.yaml), as a plain mapping.

    Args:
        cfg (QuickstartConfig): quickstart settings.
        run_dir (Path): run directory.
        model_path (str): the GGUF (or checkpoint) to start from.
        steps (int): optimizer steps.
        device (torch.device): training device; CPUs train in fp32 (their bf16 matmuls are emulated and slow).
        peak_flops (float): the MFU denominator (0 = the trainer's default for the device).

    Returns:
        Dict[str, Any]: TrainConfig fields.
    """
    from verse.infer.runtime import cpu_has_fast_bf16

    fast_bf16 = device.type == "cuda" or cpu_has_fast_bf16()
    lr = cfg.lr or DEFAULT_LR[cfg.finetune]
    finetune = {} if cfg.finetune == "full" else {"finetune": {"method": cfg.finetune, "lora": dict(LORA)}}
    return {
        "mode": "sft",
        "model": model_path,
        "tokenizer": model_path,
        "out_dir": str(run_dir / "train"),
        "max_steps": steps,
        "max_seq_len": cfg.max_seq_len,
        "micro_batch_size": cfg.micro_batch_size,
        "precision": "bf16" if fast_bf16 else "fp32",
        "param_dtype": "float32",
        "lr": lr,
        "min_lr": lr / 10,
        **finetune,
        "schedule": "cosine",
        "warmup_steps": min(3, steps),
        "weight_decay": 0.0,
        "seed": cfg.seed,
        "device": device.type,
        "save_every": 0,
        "keep_last": 1,
        "tensorboard": False,
        "peak_flops": peak_flops,
        "data": {
            "sources": [{"path": str(run_dir / "data" / "train.jsonl"), "schema": "openthoughts"}],
            "eval_sources": [{"path": str(run_dir / "data" / "heldout.jsonl"), "schema": "openthoughts"}],
            "pack": True,
            "num_workers": 0,
        },
    }


def rl_config(cfg: QuickstartConfig, run_dir: Path, model_path: str, tokenizer_path: str, device: torch.device
              ) -> Dict[str, Any]:
    """The `verse train mode=grpo` config of `--rl` (written to RUN/rl.yaml): GRPO from the SFT model on the same
    training problems, the held-out split scored at the end.

    Args:
        cfg (QuickstartConfig): quickstart settings.
        run_dir (Path): run directory.
        model_path (str): the SFT model (a checkpoint, or with LoRA the adapter directory).
        tokenizer_path (str): where its tokenizer is.
        device (torch.device): training device.

    Returns:
        Dict[str, Any]: TrainConfig fields.
    """
    sft = train_config(cfg, run_dir, model_path, cfg.rl_steps, device)
    sft["data"].update(pack=False)
    return {**sft, "mode": "grpo", "tokenizer": tokenizer_path, "out_dir": str(run_dir / "rl"),
            "lr": RL_LR, "min_lr": RL_LR, "schedule": "constant", "warmup_steps": 0, "micro_batch_size": 8,
            # the longest reference (8 items) is 100 tokens + the stop token, within max_new_tokens: a completion cut
            # there is a runaway tally, a wrong answer that scores 0 (so no overlong_filter)
            # 8 prompts x 4 samples: twice the problems per step of 4 x 8 at the same cost (over 20 steps, held-out
            # 68.8 -> 82.8% vs 75.0%); lr 5e-5 collapsed onto short guesses (28.1%)
            "grpo": {"group_size": 4, "prompts_per_step": 8, "num_iterations": 1, "beta": 0.0,
                     "max_new_tokens": cfg.max_new_tokens, "temperature": RL_TEMPERATURE,
                     # the right answer only: SFT already teaches the format, and a format term, divided by the std
                     # of a group whose answers are all wrong, gives it the advantages of a right answer (+-2.6)
                     "rewards": [{"name": "exact_answer", "weight": 1.0}]}}


def run_stage(run_dir: Path, name: str, config: Dict[str, Any], trainer, progress: bool, log, what: str
              ) -> tuple[Any, float]:
    """Write a stage's config to RUN/name, run it as `verse train RUN/name` does, and record the run's files.

    Returns:
        tuple[Any, float]: the trainer's result and the stage's seconds.
    """
    from verse.train.config import TrainConfig

    (run_dir / name).write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"{what}: verse train {run_dir / name}")
    t = time.perf_counter()
    result = trainer(TrainConfig.load(str(run_dir / name)), progress=progress)
    record_run(run_dir, {"status": "running"})
    return result, time.perf_counter() - t


def measure_step_seconds(model, micro_batch_size: int, max_seq_len: int) -> float:
    """Seconds of one training forward + backward on a full packed micro-batch (to fit steps in a budget).

    Args:
        model (ReasoningLLM): the model (gradients are cleared afterwards).
        micro_batch_size (int): rows.
        max_seq_len (int): tokens per row.

    Returns:
        float: wall seconds of the step.
    """
    from verse.train.loss import chunked_cross_entropy

    device = model.embed.weight.device
    ids = torch.randint(0, model.args.vocab_size, (micro_batch_size, max_seq_len), device=device)
    labels = ids.roll(-1, dims=1)
    labels[:, : max_seq_len // 2] = -100  # about the share of prompt tokens in the task's records
    model.train()
    start = time.perf_counter()
    chunked_cross_entropy(model.hidden_states(ids), labels, model.head).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds


def _problems(records: List[Dict[str, Any]]) -> tuple[list, list]:
    prompts, references = [], []
    for messages, reply in task.iter_problems(records):
        prompts.append(messages)
        references.append(reply.rsplit("Answer:", 1)[1].strip())
    return prompts, references


def run_quickstart(cfg: QuickstartConfig, progress: bool = True, log=print) -> QuickstartResult:
    """Generate the task, score the base model, SFT it with `verse.train.train`, score it again, save and report.

    Args:
        cfg (QuickstartConfig): settings.
        progress (bool): tqdm progress bars.
        log (Callable[[str], None]): where progress lines go.

    Returns:
        QuickstartResult: the measured numbers and the paths.
    """
    run_dir = prepare_run_dir(cfg.out_dir)
    try:
        return _run(cfg, run_dir, progress, log)
    except BaseException:
        record_run(run_dir, {"status": "failed"})  # what it wrote so far stays removable by a rerun
        raise


def _run(cfg: QuickstartConfig, run_dir: Path, progress: bool, log) -> QuickstartResult:
    from verse.interop.load import load_model
    from verse.tokenization import load_tokenizer
    from verse.assets import smollm2_gguf
    from verse.eval import exact_match, extract_answer
    from verse.infer.runtime import inference_dtype
    from verse.train import train
    from verse.devices import resolve_device
    from verse.train.metrics import plot_run

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    gguf = str(smollm2_gguf())
    numbers: Dict[str, Any] = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "device": str(device),
                               "seed": cfg.seed, "config": asdict(cfg)}

    train_problems, heldout = task.make_splits(cfg.n_train, cfg.n_eval, seed=cfg.seed)
    train_records = [task.to_record(p) for p in train_problems]
    heldout_records = [task.to_record(p) for p in heldout]
    task.write_jsonl(train_records, run_dir / "data" / "train.jsonl")
    task.write_jsonl(heldout_records, run_dir / "data" / "heldout.jsonl")
    record_run(run_dir, {"status": "running"})  # recorded as they come: even a killed run's files are known
    prompts, references = _problems(heldout_records)
    log(f"task: {len(train_records)} train / {len(heldout_records)} held-out word-counting problems "
        f"-> {run_dir / 'data'}")

    log(f"loading {Path(gguf).name} on {device} ...")
    t = time.perf_counter()
    dtype = inference_dtype("auto", device) or torch.float32
    model = load_model(gguf, device=device, dtype=dtype)
    tokenizer = load_tokenizer(gguf)
    numbers["load_s"] = time.perf_counter() - t

    def score(name: str, model) -> Any:
        log(f"scoring {len(prompts)} held-out problems ({name}) ...")
        result = exact_match(model, tokenizer, prompts, references, pattern=task.ANSWER_PATTERN,
                             batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress)
        numbers[f"accuracy_{name}"] = result.accuracy
        numbers[f"eval_{name}_s"] = result.seconds
        numbers[f"unanswered_{name}"] = result.unanswered
        log(f"held-out accuracy {name}: {result.accuracy:.1%} ({result.correct}/{result.total}, "
            f"{result.seconds:.0f} s)")
        return result

    before = score("before", model)
    # the base model rarely writes the 'Answer: N' line: also score the last number of its replies
    lenient = [extract_answer(b["reply"], LAST_NUMBER) == b["reference"] for b in before.samples]
    numbers["accuracy_before_last_number"] = sum(lenient) / len(lenient)
    steps = min(cfg.steps, RL_SFT_STEPS) if cfg.rl else cfg.steps
    if cfg.budget_s and not cfg.rl:
        step_s = measure_step_seconds(model, cfg.micro_batch_size, cfg.max_seq_len) * 1.15  # + optimizer update
        # what is left after training: loading twice more, saving, scoring again (trained replies are longer)
        rest = time.perf_counter() - start + 2 * before.seconds + 3 * numbers["load_s"]
        fit = int(max(0.0, cfg.budget_s - rest) // step_s)
        if fit < steps:
            steps = max(fit, min(10, cfg.steps))
            log(f"budget {cfg.budget_s:.0f} s: {steps} steps fit (measured {step_s:.1f} s per step)")
        numbers["measured_step_s"] = step_s
    del model
    gc.collect()

    result, numbers["train_s"] = run_stage(run_dir, "train.yaml", train_config(cfg, run_dir, gguf, steps, device),
                                           train, progress, log, f"fine-tuning for {steps} steps")

    model = load_model(result.final_dir, device=device, dtype=dtype)  # a LoRA run's: the base + its adapter
    after = score("after", model)
    if cfg.rl:
        del model
        gc.collect()
        from verse.rl.trainer import train_grpo

        numbers["accuracy_sft"] = after.accuracy
        numbers["sft_steps"] = result.step
        rl_result, numbers["rl_s"] = run_stage(
            run_dir, "rl.yaml", rl_config(cfg, run_dir, str(result.final_dir), gguf, device), train_grpo, progress,
            log, f"reinforcement learning (GRPO) for {cfg.rl_steps} steps")
        rewards = [m["reward_mean"] for m in rl_result.metrics if m.get("kind") == "train"]
        numbers["reward_first"], numbers["reward_last"] = rewards[0], sum(rewards[-5:]) / len(rewards[-5:])
        model = load_model(rl_result.final_dir, device=device, dtype=dtype)
        after = score("after_rl", model)
        numbers["accuracy_after"], numbers["unanswered_after"] = after.accuracy, after.unanswered
        shutil.rmtree(rl_result.final_dir / "train_state", ignore_errors=True)
    final_dir = run_dir / "final"
    if cfg.finetune != "full":
        from verse.peft import merge_lora

        merge_lora(model)  # final/ is one transformers checkpoint; RUN/train/ keeps the adapter itself
    model.save_pretrained(final_dir, tokenizer=tokenizer)
    del model
    shutil.rmtree(result.final_dir / "train_state", ignore_errors=True)  # optimizer state: 2x the weights
    plot_run(result.run_dir, out=run_dir / "loss_curve.png")

    steps_metrics = [m for m in result.metrics if m.get("kind") == "train" and m.get("loss") is not None]
    numbers.update(train_summary(steps_metrics))
    numbers["steps"] = result.step
    numbers["wall_s"] = time.perf_counter() - start
    samples = [{"question": b["question"], "reference": b["reference"], "before": b["reply"],
                "before_correct": b["correct"], "after": a["reply"], "after_correct": a["correct"]}
               for b, a in zip(before.samples, after.samples, strict=True)]
    with (run_dir / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    record_run(run_dir, numbers)
    return QuickstartResult(run_dir=run_dir, final_dir=final_dir, numbers=numbers, samples=samples)


def train_summary(metrics: List[Dict[str, Any]], k: int = 5) -> Dict[str, Any]:
    """Loss curve and throughput summary of per-step training metrics.

    Args:
        metrics (List[Dict[str, Any]]): `kind == "train"` records with a loss.
        k (int): steps averaged at each end of the curve.

    Returns:
        Dict[str, Any]: loss_first, loss_last (means of the first / last k steps), loss_min, tokens_per_s and mfu
        (means over the steps after the first, which includes warm-up; mfu None when a step has none), tokens,
        peak_memory_bytes.
    """
    if not metrics:
        return {}
    losses = [m["loss"] for m in metrics]
    steady = metrics[1:] or metrics
    mean = lambda key: sum(m.get(key, 0.0) for m in steady) / len(steady)  # noqa: E731
    # a step whose MFU came out above 100 % has none (the peak was wrong): then neither has the summary
    mfu = mean("mfu") if all(m.get("mfu") is not None for m in steady) else None
    return {"loss_first": sum(losses[:k]) / len(losses[:k]), "loss_last": sum(losses[-k:]) / len(losses[-k:]),
            "loss_min": min(losses), "tokens_per_s": mean("tokens_per_s"), "mfu": mfu,
            "tokens": metrics[-1].get("tokens", 0),
            "peak_memory_bytes": max(m.get("peak_memory_bytes", 0) for m in metrics)}
