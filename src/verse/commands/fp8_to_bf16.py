"""`verse fp8-to-bf16 SRC DST`: a DeepSeek FP8 checkpoint (128x128 block scales) to BF16, shard by shard."""

import argparse

HELP = ("Convert a DeepSeek FP8 checkpoint (float8_e4m3fn weights with 128x128 `weight_scale_inv` block scales, "
        "sharded safetensors + index) to BF16. Streams one shard at a time, drops the scales, rewrites the index, "
        "copies the other files (config.json without quantization_config; files linking outside SRC are skipped "
        "and named). DST must be new or an empty directory; with --overwrite an existing DST is replaced whole, "
        "atomically, only once the conversion has succeeded.")
EXAMPLES = """  verse fp8-to-bf16 DeepSeek-V3/ DeepSeek-V3-bf16/
  verse fp8-to-bf16 DeepSeek-V3/ DeepSeek-V3-bf16/ --device cuda   # dequantize with the Triton kernel
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `verse fp8-to-bf16`."""
    parser.add_argument("src", help="FP8 checkpoint directory (model.safetensors.index.json + shards)")
    parser.add_argument("dst", help="new BF16 checkpoint directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty DST whole (atomically, after the conversion succeeded)")
    parser.add_argument("--device", default="cpu", help="where to dequantize: cpu (default) or cuda")


def run(args: argparse.Namespace) -> int:
    """Convert, print one summary line (and one line per skipped file on stderr), return 0."""
    import sys

    from verse.interop.fp8_cast import fp8_to_bf16

    summary = fp8_to_bf16(args.src, args.dst, device=args.device, overwrite=args.overwrite)
    for name in summary.skipped:
        print(f"verse fp8-to-bf16: skipped {name}: it links to a file outside {args.src}", file=sys.stderr)
    print(f"wrote {summary.dst}: {summary.tensors} tensors ({summary.dequantized} dequantized from FP8) "
          f"in {summary.shards} shard(s), {summary.total_bytes / 2**30:.2f} GiB")
    return 0
