"""The `verse` command: picks the subcommand, parses its arguments, and calls its `run` function.

Each subcommand lives in `verse/commands/NAME.py` with `HELP`, `EXAMPLES`, `add_arguments(parser)` and
`run(args) -> int`; it is imported only when used, so `verse --help` is instant.
"""

import argparse
import importlib
import sys
from typing import List, NoReturn, Optional

from verse.errors import VerseError

COMMANDS = {
    "train": "pretrain or fine-tune (SFT) a model; --resume continues a run exactly",
    "quickstart": "offline demo: fine-tune SmolLM2-135M to reason on a task, eval before/after",
    "generate": "generate text from a checkpoint, HF directory or .gguf file",
    "chat": "chat in the terminal, or in a Gradio web UI with --ui",
    "serve": "OpenAI-compatible HTTP API (chat/completions, streaming) with continuous batching",
    "convert": "convert between Verse, Hugging Face, GGUF and model-parallel shards",
    "fp8-to-bf16": "convert a DeepSeek FP8 checkpoint (block scales) to BF16",
    "merge": "fold a LoRA adapter into its base: one HF-loadable checkpoint directory",
    "plan": "memory and time of a training run before launch: does it fit?",
    "data": "preview rendered training records, or dry-run statistics of a data config",
    "eval": "held-out loss, perplexity and exact-match accuracy",
    "bench": "throughput of Verse vs a reference implementation, side by side",
    "plot": "loss and throughput curves of a training run as a PNG",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (what was wrong, where to look) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _module_name(command: str) -> str:
    return "verse.commands." + command.replace("-", "_")


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return ("usage: verse COMMAND [options]   (verse COMMAND --help for its options and examples)\n\n"
            "Build, train and serve reasoning LLMs in plain PyTorch.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
            "examples:\n  verse quickstart\n  verse plan --preset mistral-7b --gpu a100-80gb\n"
            "  verse generate model.gguf --prompt 'What is 2+2?' --chat\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `verse` console script.

    Returns:
        int: exit code (0 ok, 2 usage or input error, 1 other failure).
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from verse.version import __version__

        print(f"verse {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"verse: error: unknown command {command!r}; run `verse --help` for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(_module_name(command))
    parser = _Parser(
        prog=f"verse {command}", description=module.HELP, epilog="examples:\n" + module.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except VerseError as e:
        print(f"verse {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"verse {command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # torch.OutOfMemoryError on CUDA is not a MemoryError subclass; see train
        print(f"verse {command}: error: out of memory ({e}); try a smaller batch or sequence length", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
