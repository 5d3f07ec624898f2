"""`verse convert SRC DST`: HF / GGUF / Verse checkpoints in; Verse (HF layout), GGUF or model-parallel shards out."""

import argparse
from pathlib import Path

HELP = ("Convert a model between formats. SRC is a Verse or Hugging Face checkpoint directory (Llama, Mistral, "
        "DeepSeek), a Hub id, or a .gguf file (Llama architecture, quantized tensors are dequantized). DST is a "
        "checkpoint directory (--to verse or hf: config.json + safetensors + verse.json + tokenizer, loadable by "
        "transformers and verse.load; the two are the same layout) or a .gguf file (--to gguf). The tokenizer of "
        "SRC is carried along when it has one. The source dtype is kept unless --dtype is given. DST must be new (or "
        "an empty directory) and must not be, hold or lie inside SRC; --overwrite replaces an existing DST whole, "
        "atomically, only once the conversion has succeeded (a failed one leaves it as it was). A directory of "
        "model-parallel shards loads back with verse.load, generate, chat and eval.")
EXAMPLES = """  verse convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/          # GGUF -> HF/Verse directory (bf16)
  verse convert smollm2/ smollm2-f16.gguf --dtype f16            # HF/Verse directory -> GGUF
  verse convert meta-llama/Llama-3.2-1B llama-1b/ --dtype bf16   # from the Hub
  verse convert deepseek-v2-lite/ dsv2-mp2/ --model-parallel 2   # one safetensors file per rank
  verse convert smollm2/ smollm2.gguf --overwrite                # replace an earlier smollm2.gguf
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `verse convert`."""
    from verse.config import DTYPE_ALIASES, DTYPES

    parser.add_argument("src", help="checkpoint directory, Hub id, or .gguf file")
    parser.add_argument("dst", help="output directory, or a .gguf file with --to gguf")
    parser.add_argument("--to", choices=("verse", "hf", "gguf"), default=None,
                        help="output format (default: gguf when DST ends in .gguf, else verse)")
    parser.add_argument("--dtype", choices=sorted({*DTYPES, *DTYPE_ALIASES}), default=None, metavar="{bf16,f16,fp32}",
                        help="parameter dtype of the output (also f32, fp16, bfloat16, float16, float32; "
                             "default: keep the source's)")
    parser.add_argument("--model-parallel", type=int, default=None, metavar="N",
                        help="write N model-parallel shards (model0-mpN.safetensors, ...) for N ranks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST (file or non-empty directory) whole, atomically, after the "
                             "conversion succeeded")


def run(args: argparse.Namespace) -> int:
    """Load SRC, write DST, print one summary line; return 0."""
    import time

    import torch

    from verse.interop.load import load_model
    from verse.tokenization import load_tokenizer
    from verse.errors import ConfigError, VerseError
    from verse.publish import check_destination, check_distinct

    target = args.to or ("gguf" if args.dst.lower().endswith(".gguf") else "verse")
    if args.model_parallel is not None and (target == "gguf" or args.model_parallel < 1):
        raise ConfigError("--model-parallel N needs N >= 1 and a directory DST (not --to gguf)")
    check_distinct(Path(args.src).expanduser(), args.dst)
    check_destination(args.dst, overwrite=args.overwrite, directory=target != "gguf")  # before the slow load
    if args.model_parallel is not None:
        try:
            from verse.interop.parallel import save_model_parallel
        except ImportError:
            raise VerseError("--model-parallel is not available in this Verse build (verse.interop.parallel "
                             "is missing)") from None
    from verse.interop.load import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    start = time.perf_counter()
    model = load_model(args.src, dtype=dtype)
    try:
        tokenizer = load_tokenizer(args.src)
    except (VerseError, ImportError):
        tokenizer = None
    if args.model_parallel is not None:
        save_model_parallel(model, args.dst, args.model_parallel, tokenizer=tokenizer, overwrite=args.overwrite)
    elif target == "gguf":
        from verse.interop.gguf import gguf_tokenizer_pre, save_gguf

        src = Path(args.src)
        pre = gguf_tokenizer_pre(src) if src.is_file() and src.suffix.lower() == ".gguf" else None
        save_gguf(model, args.dst, tokenizer=tokenizer, pre=pre, overwrite=args.overwrite)
    else:
        from verse.interop.hf import save_pretrained

        save_pretrained(model, args.dst, tokenizer=tokenizer, overwrite=args.overwrite)
    dtype_name = str(model.embed.weight.dtype).removeprefix("torch.")
    print(f"wrote {args.dst} ({target}{f', {args.model_parallel} shards' if args.model_parallel else ''}, "
          f"{model.num_params() / 1e6:.1f}M params, {dtype_name}, tokenizer: "
          f"{'yes' if tokenizer is not None else 'none'}) in {time.perf_counter() - start:.1f} s")
    return 0
