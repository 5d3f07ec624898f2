"""`verse bench grpo`: seconds per GRPO step of Verse's trainer vs TRL's `GRPOTrainer` (a dev-only reference, `pip
install trl`), on the same tiny Llama saved once, the same prompts, group size, completion length, reward and
update settings (β = 0, μ = 1, DAPO token-level loss, AdamW), in one run.

A step is the whole of it on both sides: sampling the group's completions, scoring them, the forward/backward and
the optimizer update. The random tiny model almost never samples its end-of-turn token, so both sides generate
`--max-new-tokens` per completion (their measured mean lengths are printed next to the times).
"""

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

from verse.errors import VerseError

# the tiny Llama both sides load (SmolLM2's tokenizer and chat template, so TRL reads the same files)
TINY = dict(arch="llama", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=384, max_seq_len=512,
            dtype="float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (T)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def length_reward(prompt: str, completion: str, reference: str) -> float:
    """A reward that differs between completions (so both sides train every row): its length modulo 7."""
    return float(len(completion) % 7)


def _verse_side(model_dir: Path, data: Path, out: Path, args: argparse.Namespace, device: str) -> Dict[str, Any]:
    from verse.rl.trainer import train_grpo
    from verse.train.config import TrainConfig

    n = args.group_size * args.prompts
    cfg = TrainConfig.from_dict(dict(
        mode="grpo", model=str(model_dir), out_dir=str(out), max_steps=args.steps + 1, max_seq_len=TINY["max_seq_len"],
        data={"sources": [str(data)]}, micro_batch_size=n, lr=1e-5, schedule="constant", weight_decay=0.0,
        precision="fp32", device=device, save_every=0, plot=False, tensorboard=False, seed=0,
        grpo={"group_size": args.group_size, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
              "beta": 0.0, "num_iterations": 1, "temperature": 1.0,
              "rewards": [f"{__name__}:length_reward"]}))
    steps = [m for m in train_grpo(cfg, progress=False).metrics if m["kind"] == "train"][1:]
    return {"s_per_step": statistics.median(m["step_time_s"] for m in steps),
            "completion_len": statistics.mean(m["completion_len"] for m in steps)}


def _trl_side(model_dir: Path, prompts: List[str], out: Path, args: argparse.Namespace, device: str
              ) -> Dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    times: List[float] = []
    lengths: List[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: Any = None, **k: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def reward(prompts: List[Any], completions: List[Any], **kwargs: Any) -> List[float]:
        return [length_reward("", c[0]["content"] if isinstance(c, list) else c, "") for c in completions]

    n = args.group_size * args.prompts
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=n, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, max_steps=args.steps + 1, learning_rate=1e-5,
        lr_scheduler_type="constant", weight_decay=0.0, beta=0.0, num_iterations=1, loss_type="dapo",
        temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=device == "cpu",
        bf16=False, fp16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    # the reference's per-step log dicts and loading bars are not the bench's output
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"s_per_step": statistics.median(times[1:]), "completion_len": statistics.mean(lengths[1:] or lengths)}


def run(args: argparse.Namespace) -> int:
    """Seconds per GRPO step, Verse vs TRL, on the same tiny model and settings."""
    from verse.optional import TORCHAO_IMPORT_LOGGERS, quiet_loggers

    try:
        with quiet_loggers(*TORCHAO_IMPORT_LOGGERS):  # trl imports torchao when it is installed
            import trl
    except ImportError:
        raise VerseError("verse bench grpo compares against TRL's GRPOTrainer, which is not installed: "
                         "pip install trl (it is in Verse's dev extra)") from None
    from verse.assets import smollm2_gguf
    from verse.config import ModelArgs
    from verse.model import ReasoningLLM
    from verse.tokenization import load_tokenizer

    if min(args.steps, args.prompts, args.max_new_tokens) < 1 or args.group_size < 2:
        raise VerseError("--steps, --prompts and --max-new-tokens must be >= 1 and --group-size >= 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [f"How many times does the word \"fig\" appear in this list? fig, plum, fig, kiwi {i}"
               for i in range(args.prompts * (args.steps + 1))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tokenizer = load_tokenizer(str(smollm2_gguf()))
        torch.manual_seed(0)
        ReasoningLLM(ModelArgs(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(tmp_path / "model",
                                                                                         tokenizer=tokenizer)
        data = tmp_path / "prompts.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": "Answer: 2"}]}) + "\n"
                                for p in prompts))
        results["verse"] = _verse_side(tmp_path / "model", data, tmp_path / "verse", args, device)
        # the reference's own import and deprecation noise is not the bench's output
        with quiet_loggers(*TORCHAO_IMPORT_LOGGERS), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            results["trl"] = _trl_side(tmp_path / "model", prompts, tmp_path / "trl", args, device)
    ratio = results["trl"]["s_per_step"] / results["verse"]["s_per_step"]
    if args.json:
        print(json.dumps({"device": device, "trl_version": trl.__version__, "group_size": args.group_size,
                          "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, **results,
                          "speedup": ratio}))
    else:
        print(f"GRPO step, {device}, tiny Llama (dim {TINY['dim']} x {TINY['n_layers']} layers, SmolLM2 vocab), "
              f"{args.prompts} prompts x G={args.group_size}, T={args.max_new_tokens} new tokens, fp32, "
              f"median of {args.steps} steps after a warm-up")
        for side, name in (("trl", f"TRL {trl.__version__} GRPOTrainer"), ("verse", "Verse mode=grpo")):
            r = results[side]
            print(f"  {name:<28} {r['s_per_step']:8.3f} s/step   completion length {r['completion_len']:.1f}")
        print(f"  Verse is {ratio:.2f}x TRL's speed")
    return 0
