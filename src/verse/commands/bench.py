"""`verse bench`: Verse vs a reference implementation, measured side by side in one run, printed as ratios."""

import argparse
import importlib

HELP = "Throughput of Verse vs a reference implementation in one run (absolute times on a shared machine are noise)."
EXAMPLES = """  verse bench generate                    # decode/prefill tokens/s vs transformers (SmolLM2-135M)
  verse bench generate --model run/final --json
  verse bench train                       # training tokens/s vs a reference loop
  verse bench plan                        # `verse plan` estimates vs measured peak memory
  verse bench tokenize                    # encode_batch tokens/s vs tiktoken and tokenizers
  verse bench data                        # data pipeline tokens/s vs training tokens/s
"""
BENCHES = {
    "generate": ("verse.infer.bench", "generation: Verse vs transformers generate (and llama.cpp when installed)"),
    "train": ("verse.train.bench", "training step throughput vs a reference"),
    "plan": ("verse.train.bench", "memory plan vs measured peak"),
    "tokenize": ("verse.tokenization.bench", "encode_batch vs tiktoken and tokenizers"),
    "data": ("verse.data.bench", "data pipeline vs training throughput"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, (module_name, text) in BENCHES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=text, description=text)
        # train.bench serves two benchmarks: it exposes add_<name>_arguments / run_<name> when it has several
        getattr(module, f"add_{name}_arguments", getattr(module, "add_arguments"))(p)
        p.set_defaults(_run=getattr(module, f"run_{name}", getattr(module, "run")))


def run(args: argparse.Namespace) -> int:
    return int(args._run(args) or 0)
