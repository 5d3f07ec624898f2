"""`verse plan`: memory and time of a training run before launch: does it fit?"""

import argparse
import dataclasses
from typing import Optional

HELP = ("Estimate the memory (weights, grads, optimizer, activations, logits, temporaries, peak) and the time of "
        "a training step on a GPU before launching it, and the cheapest changes that make it fit.")
EXAMPLES = """  verse plan --preset mistral-7b --seq-len 2048 --gpu a100-80gb
  verse plan --preset mistral-7b --optimizer adamw8bit --checkpointing 1 --fused-backward --json
  verse plan runs/sft/latest --micro-batch 4
  verse plan my_train.yaml --gpu h100-80gb
  verse plan --preset llama-2-70b --finetune qlora --lora-rank 8 --checkpointing 1   # QLoRA on one A100 80 GB
  verse plan --preset llama-2-70b --gpus 8 --checkpointing 1          # the smallest layout that fits 8 A100s
  verse plan --preset deepseek-v3-671b --gpu h100-80gb --gpus 64 --parallel dp_shard=8,ep=8 --optimizer adamw8bit
"""

# PlanSettings field -> the option that sets it
FLAGS = {"seq_len": "--seq-len", "micro_batch_size": "--micro-batch", "gradient_accumulation_steps": "--grad-accum",
         "activation_checkpointing": "--checkpointing"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="checkpoint dir / .gguf, or a training CONFIG.yaml")
    parser.add_argument("--preset", help="model preset (instead of SOURCE)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048, or the config's)")
    parser.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    parser.add_argument("--tokenizer", help="with a preset: the tokenizer it trains with, whose vocabulary the model "
                                            "takes (default: the preset's own; e.g. o200k)")
    parser.add_argument("--gpu", default="a100-80gb", help="a100-80gb, a100-40gb, h100-80gb, h200, l4, l40s, ...")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"])
    parser.add_argument("--param-dtype", choices=["bfloat16", "float32"])
    parser.add_argument("--bf16-update", choices=["master", "stochastic", "nearest"])
    parser.add_argument("--precision", choices=["bf16", "fp32"])
    parser.add_argument("--checkpointing", type=int, metavar="K", help="checkpoint every K-th layer (0 = off)")
    parser.add_argument("--fused-backward", action="store_true", default=None, help="optimizer step inside backward")
    parser.add_argument("--finetune", choices=["full", "lora", "qlora"],
                        help="full (default, or the config's), lora (frozen base) or qlora (frozen NF4 base)")
    parser.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank with --finetune lora|qlora (default 8)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="ranks of a torchrun job: memory per rank; without --parallel, every layout of N is "
                             "planned and the one with the least model parallelism that fits is named")
    parser.add_argument("--parallel", metavar="SPEC", help="the layout, as the config's parallel section: "
                        "dp_shard=N,tp=N,ep=N,dp_replicate=N (unnamed dimensions 1; dp_shard=-1 = the rest of --gpus)")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the time estimate (default 0.4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import json

    from verse.config import ModelArgs, count_params, list_presets
    from verse.tokenization.presets import preset_tokenizer
    from verse.errors import ConfigError
    from verse.train.distributed import MESH_DIMS, ParallelConfig
    from verse.train.planner import (GPUS, MOVES, PlanSettings, check_settings, finetune_from_config, format_bytes,
                                      format_layouts, format_plan, layout_name, plan, search_layouts,
                                      settings_from_config, suggestions)

    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu {args.gpu}: unknown device; choose one of {', '.join(GPUS)}")
    settings = PlanSettings()
    finetune: dict = {}
    section: dict = {}
    preset, tokenizer = args.preset, args.tokenizer  # the preset trained, and the tokenizer named (if any)
    if args.preset:
        model_args = _model_args(args.preset, {}, args.tokenizer)
    elif args.source and args.source.endswith((".yaml", ".yml")):
        from verse.train.config import TrainConfig

        cfg = TrainConfig.load(args.source)
        tokenizer = args.tokenizer or cfg.tokenizer
        model_args = _model_args(cfg.model, cfg.model_overrides, tokenizer)
        preset = cfg.model if cfg.model in list_presets() and "vocab_size" not in cfg.model_overrides else None
        settings = settings_from_config(cfg)
        finetune = finetune_from_config(cfg)
        section = {k: v for k, v in cfg.parallel.items() if k in MESH_DIMS}  # its layout, unless --parallel
    elif args.source:
        model_args = _model_args(args.source, {})
    else:
        raise ConfigError("give --preset NAME, a checkpoint path or a CONFIG.yaml (see verse plan --help)")
    changes = {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
               "gradient_accumulation_steps": args.grad_accum, "optimizer": args.optimizer,
               "param_dtype": args.param_dtype, "bf16_update": args.bf16_update, "precision": args.precision,
               "activation_checkpointing": args.checkpointing, "fused_backward": args.fused_backward}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    check_settings(settings, FLAGS)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: must be a fraction in (0, 1] (0.4 = 40 % of the peak)")
    if settings.seq_len > model_args.max_seq_len:
        raise ConfigError(f"--seq-len {settings.seq_len} exceeds the model's max_seq_len ({model_args.max_seq_len})")
    if args.finetune is not None:
        finetune["finetune"] = args.finetune
    if args.lora_rank is not None:
        if finetune.get("finetune", "full") == "full":
            raise ConfigError("--lora-rank needs --finetune lora or qlora")
        if args.lora_rank < 1:
            raise ConfigError(f"--lora-rank {args.lora_rank}: must be a positive integer")
        finetune["lora_rank"] = args.lora_rank
    layouts: list = []
    if args.gpus is not None or args.parallel is not None or section:
        layout = _layout(args.parallel, args.gpus, model_args, section)
        if layout is None:  # search: the least model parallelism that fits, else the one with the lowest peak
            layouts = search_layouts(model_args, settings, args.gpu, args.gpus, mfu=args.mfu, **finetune)
            if not layouts:
                raise ConfigError(f"--gpus {args.gpus}: no layout of {args.gpus} ranks splits this model (tp must "
                                  f"divide the heads, vocabulary and MLP width); try a power of two")
            best = next((r for r in layouts if r["fits"]), min(layouts, key=lambda r: r["peak_bytes"]))
            layout = ParallelConfig(**best["parallel"])
        finetune["parallel"] = layout
    result = plan(model_args, settings, args.gpu, mfu=args.mfu, **finetune)
    moves = [] if result["fits"] else suggestions(model_args, settings, args.gpu, **finetune)
    for move in moves if layouts else []:  # each change with the least model parallelism that fits with it
        relaid = search_layouts(model_args, dataclasses.replace(settings, **move["changes"]), args.gpu, args.gpus,
                                mfu=args.mfu)
        fit = next(r for r in relaid if r["fits"])  # the layout the move was found on fits at least
        move.update(parallel=fit["parallel"], peak_bytes=fit["peak_bytes"])
    fewest = None
    if layouts and not result["fits"] and not moves:  # every move on: the fewest GPUs (doubling) that fit
        every = dataclasses.replace(settings, **{k: v for _, change in MOVES for k, v in change.items()})
        n = args.gpus
        while fewest is None and n < MAX_GPUS:
            n *= 2
            fewest = next((r for r in search_layouts(model_args, every, args.gpu, n, mfu=args.mfu) if r["fits"]), None)
    if args.json:
        print(json.dumps({**result, "vocab_size": model_args.vocab_size, "suggestions": moves,
                          **({"fewest_gpus": {"gpus": fewest["gpus"], "parallel": fewest["parallel"],
                                              "moves": [m for m, _ in MOVES], "peak_bytes": fewest["peak_bytes"]}}
                             if fewest else {}),
                          **({"layouts": [{k: r[k] for k in LAYOUT_KEYS} for r in layouts]} if layouts else {})}))
    else:
        if layouts:
            print(f"layouts of {args.gpus} x {args.gpu}, least model parallelism first:")
            print(format_layouts(layouts))
            print("no layout fits with these settings; the plan of the one with the lowest peak:"
                  if not result["fits"] else "the plan of the smallest layout that fits:")
        print(format_plan(model_args, result, moves))
        if layouts and not result["fits"] and not moves:
            print(f"with every move above, the fewest GPUs that fit: {fewest['gpus']} x {args.gpu} as "
                  f"{layout_name(fewest['parallel'])} (peak {format_bytes(fewest['peak_bytes'])} per rank)"
                  if fewest else f"even with every move, no layout of up to {MAX_GPUS} x {args.gpu} fits")
        if preset and model_args.vocab_size != ModelArgs.from_preset(preset).vocab_size:
            published = ModelArgs.from_preset(preset)
            print(f"vocabulary: {model_args.vocab_size:,} ids of the {tokenizer or preset_tokenizer(preset)} tokenizer "
                  f"(the published {preset} has {published.vocab_size:,}, {count_params(published) / 1e9:.2f} B "
                  f"params; --tokenizer names another)")
    return 0


MAX_GPUS = 1024  # how far `--gpus` searches (doubling) for the fewest GPUs when no move fits the given number
LAYOUT_KEYS = ("parallel", "peak_bytes", "fits", "step_time_s", "tokens_per_s", "comm_time_s")


def _layout(spec: Optional[str], gpus: Optional[int], model_args: "ModelArgs",  # noqa: F821
            section: Optional[dict] = None):
    """The `--parallel` layout (else the config's `parallel:` section) for `--gpus` ranks (None: search them),
    checked against the model.

    Raises:
        ConfigError: a malformed spec, a product that is not --gpus, or a split the model does not allow.
    """
    from verse.train.distributed import MESH_DIMS, ParallelConfig
    from verse.errors import ConfigError
    from verse.train.planner import layout_problems

    if gpus is not None and (isinstance(gpus, bool) or gpus < 1):
        raise ConfigError(f"--gpus {gpus}: must be a positive integer")
    if spec is None and not section:
        return None
    degrees = {} if spec is not None else dict(section)
    for item in filter(None, (spec or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_DIMS or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--parallel {spec}: expected NAME=INT items separated by commas, NAME one of "
                              f"{', '.join(MESH_DIMS)}; got {item!r}")
        degrees[name] = int(value)
    if spec is None:  # the config's section, as `verse train` reads it (dp_shard -1 unless set)
        label = "the config's parallel: " + ",".join(f"{k}={v}" for k, v in degrees.items())
    else:
        label = f"--parallel {spec}"
        degrees = {"dp_shard": 1 if gpus is None else -1, **degrees}
    layout = ParallelConfig.from_dict(degrees, "--parallel")
    others = layout.dp_replicate * layout.tp * layout.ep
    if layout.dp_shard == -1:
        if gpus is None or gpus % others:
            raise ConfigError(f"{label}: dp_shard=-1 (the rest) needs --gpus N, a multiple of "
                              f"dp_replicate x tp x ep = {others}")
        layout = dataclasses.replace(layout, dp_shard=gpus // others)
    total = others * layout.dp_shard
    if gpus is not None and total != gpus:
        raise ConfigError(f"{label}: dp_replicate x dp_shard x ep x tp = {total}, but --gpus is {gpus}; "
                          f"make the product equal the number of GPUs")
    problems = layout_problems(model_args, layout)
    if problems:
        raise ConfigError(f"{label}: {'; '.join(problems)}; choose degrees that divide them")
    return layout


def _model_args(source: str, overrides: dict, tokenizer: Optional[str] = None) -> "ModelArgs":  # noqa: F821
    """ModelArgs of a preset as `verse train` builds it (its vocabulary sized to its tokenizer), or of a checkpoint
    (reads only its config, never the weights)."""
    from verse.config import list_presets
    from verse.tokenization.presets import preset_args, preset_tokenizer
    from verse.interop.load import load_args

    if source in list_presets():
        return preset_args(source, tokenizer or preset_tokenizer(source), **overrides)
    return load_args(source).replace(**overrides)
