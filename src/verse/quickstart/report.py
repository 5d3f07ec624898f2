"""The quickstart's report card: printed at the end of the run and written as RUN/report.md."""

from pathlib import Path
from typing import Any, Dict, List


def card_lines(numbers: Dict[str, Any]) -> List[str]:
    """The report card as plain lines (the DESIGN.md lines `held-out accuracy: ...` and `wall time: ...` included).

    Args:
        numbers (Dict[str, Any]): `QuickstartResult.numbers`.

    Returns:
        List[str]: one line per fact.
    """
    gain = 100 * (numbers["accuracy_after"] - numbers["accuracy_before"])
    if "accuracy_sft" in numbers:  # --rl: SFT, then GRPO
        accuracy = (f"held-out accuracy: before {100 * numbers['accuracy_before']:.1f}% -> after SFT "
                    f"{100 * numbers['accuracy_sft']:.1f}% -> after RL {100 * numbers['accuracy_after']:.1f}%")
    else:
        accuracy = (f"held-out accuracy: before {100 * numbers['accuracy_before']:.1f}% -> after "
                    f"{100 * numbers['accuracy_after']:.1f}%")
    lines = [
        f"model: {numbers['model']} on {numbers['device']}",
        accuracy,
        f"accuracy gain: {gain:+.1f} points on {numbers['config']['n_eval']} held-out problems (greedy, exact match)",
    ]
    if "unanswered_before" in numbers:
        lines.append(f"replies without an 'Answer: N' line: before {numbers['unanswered_before']}, "
                     f"after {numbers['unanswered_after']}; base model scored on the last number of its reply: "
                     f"{100 * numbers['accuracy_before_last_number']:.1f}%")
    if "loss_first" in numbers:
        lines += [
            f"train loss: {numbers['loss_first']:.3f} -> {numbers['loss_last']:.3f} (mean of first/last 5 steps; "
            f"min {numbers['loss_min']:.3f}) over {numbers['steps']} steps, {numbers['tokens']:,} tokens",
            f"throughput: {numbers['tokens_per_s']:.0f} tokens/s, MFU "
            + (f"{100 * numbers['mfu']:.1f}%" if numbers.get("mfu") is not None else "n/a (computed above 100 %: "
               "the device's peak FLOP/s is underestimated; set peak_flops=)"),
            f"peak memory: {numbers['peak_memory_bytes'] / 2**30:.2f} GiB",
        ]
    lines += [
        f"time: load {numbers['load_s']:.0f} s, eval before {numbers['eval_before_s']:.0f} s, "
        f"train {numbers['train_s']:.0f} s, eval after {numbers['eval_after_s']:.0f} s"
        + (f", RL {numbers['rl_s']:.0f} s, eval after RL {numbers['eval_after_rl_s']:.0f} s" if "rl_s" in numbers
           else ""),
        f"wall time: {numbers['wall_s']:.0f} s",
    ]
    return lines


def next_commands(run_dir: Path) -> List[str]:
    """What to run next: chat with the model, and the same config on OpenThoughts from the Hub."""
    final = run_dir / "final"
    return [
        f"verse chat {final}                # terminal chat with the fine-tuned model",
        f"verse chat {final} --ui           # Gradio web chat at http://127.0.0.1:7860",
        f"verse eval {final} --data {run_dir / 'data' / 'heldout.jsonl'} --task exact-match",
        "# the same config on OpenThoughts-114k from the Hub (a GPU: `verse plan` it first):",
        f"verse train {run_dir / 'train.yaml'} out_dir=runs/openthoughts 'data.sources=[openthoughts]' \\",
        "    data.eval_sources=[] max_seq_len=2048 max_steps=1000 device=auto precision=bf16",
    ]


def write_report(path: Path, numbers: Dict[str, Any], samples: List[Dict[str, Any]], n_samples: int = 3) -> Path:
    """Write the Markdown report: the card, the loss curve, a few held-out replies before and after, next steps.

    Args:
        path (Path): the .md file.
        numbers (Dict[str, Any]): `QuickstartResult.numbers`.
        samples (List[Dict[str, Any]]): `QuickstartResult.samples`.
        n_samples (int): replies shown.

    Returns:
        Path: the file written.
    """
    run_dir = path.parent
    out = ["# Verse quickstart report", "", "```", *card_lines(numbers), "```", "",
           "![loss curve](loss_curve.png)", "", "## Held-out replies", ""]
    for s in samples[:n_samples]:
        out += [f"**{s['question']}** (answer {s['reference']})", "",
                f"before ({'correct' if s['before_correct'] else 'wrong'}):", "", "```", s["before"].strip(), "```",
                f"after ({'correct' if s['after_correct'] else 'wrong'}):", "", "```", s["after"].strip(), "```", ""]
    out += ["## Next", "", "```", *next_commands(run_dir), "```", ""]
    path.write_text("\n".join(out))
    return path
