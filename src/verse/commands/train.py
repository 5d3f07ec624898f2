"""`verse train`: pretrain or fine-tune (SFT) a model; `--resume RUN_DIR` continues a run exactly."""

import argparse

HELP = ("Pretrain or fine-tune (SFT) a model from a YAML config plus key=value overrides; "
        "checkpoints, metrics.jsonl and plot.png go to out_dir, which must be new or empty (a run directory is "
        "continued only with --resume). --print-config lists every field.")
EXAMPLES = """  verse train --print-config > my.yaml           # every field, its default and one line of help
  verse train my.yaml lr=1e-4 max_steps=2000     # SFT as configured, two values overridden
  verse train --preset bytegpt-tiny max_steps=200 # byte-level MLA+MoE on the stdlib's sources, bits/byte
  verse train --preset tiny max_steps=50 data.sources='[{path: corpus.txt}]'   # pretrain from scratch
  verse train model=Qwen/Qwen3-0.6B mode=sft data.sources='[{path: chat.jsonl}]'   # no YAML: fields alone
  verse train --resume runs/verse                # continue after a crash, kill or Ctrl-C, exactly
  verse train my.yaml param_dtype=bfloat16 optimizer=adamw8bit activation_checkpointing=1
  torchrun --nproc-per-node 8 -m verse train my.yaml parallel.dp_shard=8   # FSDP2 over 8 GPUs
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (see --print-config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config fields; values are YAML (data.pack=true, model_overrides.dim=64)")
    parser.add_argument("--preset", help="pretrain this model preset from scratch (mode=pretrain, model=NAME)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print every field with default and help, exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from verse.errors import ConfigError
    from verse.train.config import TrainConfig, describe_fields

    if args.print_config:
        print("\n".join(describe_fields()))
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `verse train --preset tiny lr=1e-3`
    from verse.train.loop import load_run_config, train

    if args.resume:
        if config is not None:
            overrides = [config, *overrides] if "=" in config else overrides
        cfg = load_run_config(args.resume, overrides)
    elif config is None and args.preset is None and not any(o.split("=", 1)[0] == "model" for o in overrides):
        raise ConfigError("give a CONFIG.yaml, --preset NAME, model=DIR_OR_PRESET or --resume RUN_DIR "
                          "(see verse train --help)")
    else:
        cfg = TrainConfig.load(config, overrides, preset=args.preset)
    if cfg.mode == "grpo":
        from verse.rl.trainer import train_grpo as train
    result = train(cfg, resume=bool(args.resume), progress=not args.no_progress)
    if not result.is_main:  # under torchrun only rank 0 reports
        return 0
    last = next((m for m in reversed(result.metrics) if m.get("kind") == "train" and m.get("loss") is not None), None)
    bpb = f" ({last['bpb']:.3f} bits/byte)" if last and "bpb" in last else ""
    print(f"step {result.step}: loss {last['loss']:.4f}{bpb}" if last else f"step {result.step}",
          f"| checkpoint {result.final_dir} | metrics {result.run_dir / 'metrics.jsonl'}")
    return 0
