"""`verse bench`: Verse vs a reference implementation, measured side by side in one run, printed as ratios."""

import argparse
import importlib

HELP = "Throughput of Verse vs a reference implementation in one run (absolute times on a shared machine are noise)."
EXAMPLES = """  verse bench generate                    # decode/prefill tokens/s vs transformers (SmolLM2-135M)
  verse bench generate --model run/final --json
  verse bench train                       # training tokens/s, MFU, memory vs transformers (+ a MoE row)
  verse bench plan                        # `verse plan` estimates vs measured peak memory
  verse bench tokenize                    # encode_batch tokens/s vs tiktoken and tokenizers
  verse bench data                        # data pipeline tokens/s vs training tokens/s
  verse bench grpo --group-size 8 --max-new-tokens 32   # GRPO s/step vs TRL's GRPOTrainer (pip install trl)
"""
BENCHES = {
    "generate": ("verse.bench.generate", "generation: Verse vs transformers generate (and llama.cpp when installed)"),
    "train": ("verse.bench.train", "training step throughput vs transformers (dense and MoE)"),
    "plan": ("verse.bench.plan", "memory plan vs measured peak"),
    "tokenize": ("verse.bench.tokenizer", "encode_batch vs tiktoken and tokenizers"),
    "data": ("verse.bench.data", "data pipeline vs training throughput"),
    "grpo": ("verse.bench.grpo", "GRPO step time vs TRL's GRPOTrainer on the same tiny model"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=list(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark (see verse bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    # Only the chosen benchmark's module is imported (each has add_arguments / run).
    module_name, text = BENCHES[args.bench]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"verse bench {args.bench}", description=text)
    module.add_arguments(parser)
    options = parser.parse_args(args.options)
    return int(module.run(options) or 0)
