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
    import sys
    from pathlib import Path

    from verse.errors import VerseError
    from verse.train.metrics import count_bad_metrics, plot_run, read_metrics

    run_dir = Path(args.run_dir).expanduser()
    out = Path(args.out).expanduser() if args.out else run_dir / "plot.png"
    if not read_metrics(run_dir):
        raise VerseError(f"{args.run_dir}: no metrics.jsonl with training steps; is it a run directory?")
    if out.is_dir():
        raise VerseError(f"--out {out}: is a directory; give the PNG file to write, e.g. {out / 'plot.png'}")
    if not out.parent.is_dir():
        raise VerseError(f"--out {out}: directory {out.parent} does not exist; create it or choose another path")
    bad = count_bad_metrics(run_dir)
    if bad:
        print(f"verse plot: skipped {bad} malformed line(s) of {run_dir / 'metrics.jsonl'}", file=sys.stderr)
    try:
        print(plot_run(run_dir, out))
    except OSError as e:
        raise VerseError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    return 0
