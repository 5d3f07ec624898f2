"""`verse bench train`: training tokens/s of Verse's step vs a plain PyTorch (nanoGPT-style) loop."""

import argparse
import json
import time

import torch

from verse.bench.plan import BASE_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    """The nanoGPT loop: full logits, F.cross_entropy, AdamW."""
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> int:
    """Training tokens/s of Verse's step vs a plain PyTorch (nanoGPT-style) step on the same model."""
    from verse.config import ModelArgs
    from verse.model import ReasoningLLM
    from verse.train.config import TrainConfig
    from verse.train.loop import train_step
    from verse.train.metrics import device_peak_flops, mfu
    from verse.train.optim import TrainOptimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_args = ModelArgs(**{**BASE_MODEL, "max_seq_len": max(1024, args.seq_len), "dtype": "float32"})
    cfg = TrainConfig(max_seq_len=args.seq_len, micro_batch_size=args.micro_batch, precision="fp32",
                      loss_chunk_size=1024, weight_decay=0.0)
    ids = torch.randint(0, model_args.vocab_size, (args.micro_batch, args.seq_len), device=device)
    autocast = torch.autocast(device.type, enabled=False)
    results = {}
    for side in ("reference", "verse"):
        torch.manual_seed(0)
        with torch.device(device):
            model = ReasoningLLM(model_args).train()
        if side == "verse":
            opt = TrainOptimizer(model, cfg)
            batch = [{"input_ids": ids, "labels": ids}]

            def step(model=model, opt=opt, batch=batch):
                train_step(model, opt, batch, cfg, autocast)
        else:
            ref_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)

            def step(model=model, ref_opt=ref_opt):
                _reference_step(model, ref_opt, ids)
        step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[side] = args.steps * ids.numel() / (time.perf_counter() - start)
    ratio = results["verse"] / results["reference"]
    peak = device_peak_flops(device, torch.float32)
    mfus = {side: mfu(model_args, tps, 1.0, args.seq_len, peak) for side, tps in results.items()}
    if args.json:
        print(json.dumps({"device": str(device), "tokens_per_s": results, "mfu": mfus, "ratio": ratio}))
    else:
        print(f"training step, {device}, model dim 384 x 4 layers, vocab 8192, {args.micro_batch} x {args.seq_len}"
              f" tokens, fp32")
        shown = {side: f"{value:.1%}" if value is not None else "n/a" for side, value in mfus.items()}
        print(f"  reference (full logits + F.cross_entropy + AdamW): {results['reference']:>9.0f} tokens/s"
              f"   MFU {shown['reference']}")
        print(f"  verse (chunked CE + fused AdamW):                  {results['verse']:>9.0f} tokens/s"
              f"   MFU {shown['verse']}   ratio {ratio:.2f}x")
    return 0
