"""`verse merge BASE ADAPTER OUT`: base model + LoRA/DoRA adapter -> one checkpoint directory."""

import argparse
from pathlib import Path

HELP = ("Fold a LoRA or DoRA adapter (PEFT format: adapter_config.json + adapter_model.safetensors, written by "
        "`verse train` with finetune.method=lora|qlora or by PEFT) into its base model and write one checkpoint "
        "directory that verse.load and transformers' AutoModelForCausalLM load (config.json, safetensors, verse.json, "
        "the base's tokenizer). The base's dtype is kept unless --dtype is given.")
EXAMPLES = """  verse merge smollm2/ runs/lora/latest smollm2-lora/        # a LoRA run's latest adapter
  verse merge smollm2/ runs/lora/step-0000200 merged/ --dtype bf16
  verse merge meta-llama/Llama-2-7b-hf my-peft-adapter/ llama-merged/   # an adapter written by PEFT
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `verse merge`."""
    parser.add_argument("base", metavar="BASE", help="the base model: checkpoint directory, Hub id or .gguf file")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory (or a LoRA run directory)")
    parser.add_argument("out", metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="parameter dtype of the merged model (default: the base's)")


def run(args: argparse.Namespace) -> int:
    """Load BASE, add ADAPTER, merge, write OUT, print one summary line; return 0."""
    import time

    from verse.interop.load import load_model
    from verse.tokenization import load_tokenizer
    from verse.errors import ConfigError, VerseError
    from verse.interop.load import checkpoint_dir
    from verse.interop.adapter import load_adapter
    from verse.peft import merge_lora

    out = Path(args.out).expanduser().absolute()
    if out in (Path(args.base).expanduser().absolute(), Path(args.adapter).expanduser().absolute()):
        raise ConfigError(f"{args.out}: OUT must differ from BASE and ADAPTER")
    adapter = checkpoint_dir(Path(args.adapter))
    start = time.perf_counter()
    model = load_model(args.base, dtype=args.dtype)
    load_adapter(model, adapter)
    merge_lora(model)
    try:
        tokenizer = load_tokenizer(args.base)
    except (VerseError, ImportError):
        tokenizer = None
    model.save_pretrained(out, tokenizer=tokenizer)
    print(f"wrote {args.out} ({args.base} + {args.adapter}, {model.num_params() / 1e6:.1f}M params, "
          f"{str(model.embed.weight.dtype).removeprefix('torch.')}) in {time.perf_counter() - start:.1f} s")
    return 0
