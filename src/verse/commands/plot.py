"""`verse plot RUN_DIR`: loss and throughput curves of a training run as a PNG."""

import argparse

HELP = "Write a PNG with the training / held-out loss and the tokens/s of a run (from its metrics.jsonl)."
EXAMPLES = """  verse plot runs/verse                    # writes runs/verse/plot.png
  verse plot runs/verse --out curves.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/plot.png)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from verse.errors import VerseError
    from verse.train.metrics import plot_run, read_metrics

    if not read_metrics(Path(args.run_dir)):
        raise VerseError(f"{args.run_dir}: no metrics.jsonl with training steps; is it a run directory?")
    print(plot_run(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0
