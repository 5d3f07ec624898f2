"""`verse data preview|stats`: look at training data before a single step runs."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Tuple

HELP = ("Preview rendered training records with the trained (loss) tokens highlighted, or dry-run statistics of a "
        "data config: records, bad records by reason, tokens, loss tokens, lengths, truncation, padding/packing waste.")
EXAMPLES = """  verse data preview --config sft.yaml -n 3
  verse data preview --source openthoughts --tokenizer o200k --max-seq-len 4096
  verse data preview --source data/chats.jsonl --tokenizer runs/sft/final
  verse data stats --config sft.yaml --limit 10000
  verse data stats --source data/chats.parquet --tokenizer model.gguf --max-seq-len 2048 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["preview", "stats"], help="preview: rendered records; stats: dry-run report")
    parser.add_argument("--config", help="YAML training config (its `data:` section) or a data-only YAML")
    parser.add_argument("--source", action="append", default=[],
                        help="Hub name (openthoughts, opencodereasoning, ultrachat, owner/dataset) or local file; "
                             "repeat to mix equally")
    parser.add_argument("--schema", default="auto", help="record layout of --source (default: auto)")
    parser.add_argument("--tokenizer", help="o200k, byte, a model/tokenizer directory or a .gguf file "
                                            "(default: the config's tokenizer or model)")
    parser.add_argument("--max-seq-len", type=int, help="sequence length (default: the config's, else 2048)")
    parser.add_argument("--train-on", choices=["all_assistant", "last_assistant"], help="assistant turns with loss")
    parser.add_argument("--no-pack", action="store_true", help="pad one example per row instead of packing")
    parser.add_argument("-n", type=int, default=3, help="preview: number of records (default 3)")
    parser.add_argument("--limit", type=int, help="stats: stop after this many records")
    parser.add_argument("--seed", type=int, default=0, help="mixing and shuffle seed")
    parser.add_argument("--json", action="store_true", help="stats: print one JSON object")


def run(args: argparse.Namespace) -> int:
    from verse.errors import VerseError

    for name in ("n", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VerseError(f"{'-n' if name == 'n' else '--limit'} must be >= 1, got {value}")
    cfg, tokenizer_spec = _config(args)
    if tokenizer_spec is None:
        raise VerseError("no tokenizer: pass --tokenizer (o200k, byte, a model directory or .gguf), or set "
                         "`tokenizer:` or `model:` in the config")
    from verse.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    if args.action == "preview":
        from verse.data.preview import preview_examples, render

        from verse.terminal import for_stream, is_terminal

        color = is_terminal(sys.stdout)
        for k, enc in enumerate(preview_examples(cfg, tokenizer, n=args.n, max_seq_len=args.max_seq_len,
                                                 seed=args.seed), 1):
            state = f", DROPPED ({enc.dropped})" if enc.dropped else (f", truncated by {enc.truncated}"
                                                                      if enc.truncated else "")
            where = for_stream(enc.where, sys.stdout)
            print(f"=== record {k} · {where} · {len(enc.ids)} tokens, {int(enc.mask[1:].sum())} trained{state} ===")
            print(render(tokenizer, enc, color=color))
        if not color:
            print("(trained tokens are inside [[...]])")
        return 0
    from verse.data.stats import data_stats, format_stats

    stats = data_stats(cfg, tokenizer, max_seq_len=args.max_seq_len, limit=args.limit, seed=args.seed,
                       progress=not args.json)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _config(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The DataConfig and tokenizer spec from --config and/or --source options."""
    import yaml

    from verse.data.config import DataConfig
    from verse.errors import ConfigError, VerseError

    raw: dict = {}
    tokenizer = args.tokenizer
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise VerseError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with a `data:` section")
        tokenizer = tokenizer or raw.get("tokenizer") or _model_tokenizer(raw.get("model"))
        raw = dict(raw.get("data", raw))
        raw.pop("tokenizer", None)
        raw.pop("model", None)
    elif not args.source:
        raise VerseError("give --config CFG.yaml or --source NAME_OR_PATH")
    if args.source:
        from verse.data.config import HUB_SOURCES

        raw["sources"] = [{"name": s, "schema": args.schema}
                          if s in HUB_SOURCES or not (Path(s).exists() or Path(s).suffix)
                          else {"path": s, "schema": args.schema} for s in args.source]
    for key, value in (("max_seq_len", args.max_seq_len), ("train_on", args.train_on)):
        if value is not None:
            raw[key] = value
    if args.no_pack:
        raw["pack"] = False
    return DataConfig.from_dict(raw), tokenizer


def _model_tokenizer(model: Any) -> Any:
    """Tokenizer spec of a config's `model:` as `verse train` picks it: the checkpoint's own, or the preset's
    (`verse.tokenization.presets.run_tokenizer`); None when there is no model."""
    if not model:
        return None
    from verse.tokenization.presets import run_tokenizer

    return run_tokenizer(str(model))