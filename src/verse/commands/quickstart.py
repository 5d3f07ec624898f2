"""`verse quickstart`: the offline demo — SFT SmolLM2-135M on a synthetic reasoning task, accuracy before/after."""

import argparse

HELP = ("Offline demo: fine-tune SmolLM2-135M-Instruct (bundled GGUF) to count words in lists with a worked "
        "<think> tally through `verse train`, score held-out accuracy before and after, save the model and a "
        "report card. About 10 minutes on a 2-core CPU, about a minute on a GPU.")
EXAMPLES = """  verse quickstart                              # runs/quickstart: report.md, loss_curve.png, final/
  verse quickstart --out runs/qs2 --seed 1
  verse quickstart --budget-s 300 --n-eval 32   # a shorter run (fewer steps, fewer held-out problems)
  verse quickstart --device cuda --steps 100
  verse quickstart --finetune lora              # LoRA adapters (rank 16, all projections) on the frozen base
  verse quickstart --rl                         # SFT, then GRPO on the same task: before -> SFT -> RL
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verse.quickstart.pipeline import QuickstartConfig

    d = QuickstartConfig()
    parser.add_argument("--out", default=d.out_dir,
                        help=f"run directory (default {d.out_dir}); a rerun replaces only the files the earlier "
                             f"quickstart recorded in its quickstart.json, never a user's")
    parser.add_argument("--budget-s", type=float, default=d.budget_s,
                        help=f"target wall time in seconds; fewer steps when they would not fit (default "
                             f"{d.budget_s:.0f}, 0 = no limit)")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"most SFT steps (default {d.steps})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"task and training seed (default {d.seed})")
    parser.add_argument("--n-eval", type=int, default=d.n_eval,
                        help=f"held-out problems scored before and after (default {d.n_eval})")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 2e-4 for full, 1e-3 for lora/qlora)")
    parser.add_argument("--finetune", choices=("full", "lora", "qlora"), default=d.finetune,
                        help="full fine-tune (default), or LoRA / QLoRA adapters on the frozen base")
    parser.add_argument("--rl", action="store_true",
                        help="after the SFT, reinforcement learning (GRPO, rewarded for the right answer) on the same "
                             "task; prints accuracy before -> after SFT -> after RL")
    parser.add_argument("--rl-steps", type=int, default=d.rl_steps, help=f"GRPO steps with --rl (default "
                                                                          f"{d.rl_steps})")
    parser.add_argument("--device", default=d.device, help="auto (default), cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from verse.errors import VerseError
    from verse.quickstart.pipeline import QuickstartConfig, record_run, run_quickstart
    from verse.quickstart.report import card_lines, next_commands, write_report

    for name in ("steps", "n_eval", "rl_steps"):
        if getattr(args, name) < 1:
            raise VerseError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget_s < 0 or (args.lr is not None and args.lr <= 0):
        raise VerseError("--budget-s must be >= 0 and --lr > 0")
    if args.rl and args.finetune != "full":
        raise VerseError(f"--rl continues a full fine-tune for now; drop --finetune {args.finetune} or --rl")
    cfg = QuickstartConfig(out_dir=args.out, budget_s=args.budget_s, steps=args.steps, seed=args.seed,
                           n_eval=args.n_eval, lr=args.lr, device=args.device, finetune=args.finetune, rl=args.rl,
                           rl_steps=args.rl_steps)
    result = run_quickstart(cfg)
    report = write_report(result.run_dir / "report.md", result.numbers, result.samples)
    record_run(result.run_dir, result.numbers)  # the report too is the quickstart's own (a rerun replaces it)
    print("\n== Verse quickstart report card ==")
    for line in card_lines(result.numbers):
        print(line)
    print(f"report: {report}   loss curve: {result.run_dir / 'loss_curve.png'}   model: {result.final_dir}")
    print("\nnext:")
    for line in next_commands(result.run_dir):
        print(f"  {line}")
    return 0
