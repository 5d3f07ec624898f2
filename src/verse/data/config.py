"""`DataConfig`: the `data:` section of a training config (sources, mixing, length policy, packing)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from verse.errors import ConfigError
from verse.schema import check_keys, check_types

# Short names of the Hub datasets Verse knows: (repo id, config, split, schema), as on the Hub
# (nvidia/OpenCodeReasoning's config split_0 names its only split split_0 too).
HUB_SOURCES = {
    "openthoughts": ("open-thoughts/OpenThoughts-114k", None, "train", "openthoughts"),
    "opencodereasoning": ("nvidia/OpenCodeReasoning", "split_0", "split_0", "opencodereasoning"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "ultrachat"),
}
SCHEMAS = ("auto", "openthoughts", "opencodereasoning", "ultrachat", "messages", "text")
TRAIN_ON = ("all_assistant", "last_assistant")
TRUNCATION = ("truncate", "drop", "split")


@dataclass
class SourceConfig:
    """One data source of a mix.

    Args:
        name: a Hub short name (openthoughts, opencodereasoning, ultrachat), a Hub repo id
            ("owner/dataset"), or a label for a local `path`.
        path: local file, directory or glob (.jsonl, .json, .parquet, .txt); None for Hub sources. A directory
            laid out as a Hub dataset (a README.md with YAML front matter, e.g. from `huggingface-cli download
            --repo-type dataset REPO --local-dir DIR`) is read as the Hub repo is, with `config` and `split`
            (defaults from `name`, or from a directory path ending in a known repo id).
        weight: relative sampling weight in the mix (normalised over all sources).
        split: dataset split (Hub sources; default from the short name, else "train").
        config: Hub dataset configuration (e.g. "split_0"); default from the short name.
        schema: record layout: auto, openthoughts, opencodereasoning, ultrachat, messages or text.
    """

    name: str = ""
    path: Optional[str] = None
    weight: float = 1.0
    split: Optional[str] = None
    config: Optional[str] = None
    schema: str = "auto"

    @property
    def label(self) -> str:
        """Name shown in stats and error messages."""
        return self.name or str(self.path)


@dataclass
class DataConfig:
    """What to train on and how to turn it into batches: the `data:` section of a YAML config.

    Example (`verse train cfg.yaml`, `verse data stats --config cfg.yaml`)::

        data:
          sources:                                  # mixed by weight (normalised), e.g. 50/30/20
            - {name: openthoughts, weight: 50}      # open-thoughts/OpenThoughts-114k, streamed
            - {name: opencodereasoning, weight: 30} # nvidia/OpenCodeReasoning, config split_0
            - {name: ultrachat, weight: 20}         # HuggingFaceH4/ultrachat_200k, split train_sft
            - {path: data/mine.jsonl, weight: 5, schema: messages}  # local .jsonl/.json/.parquet/.txt
          max_seq_len: 2048       # tokens per sequence; the trainer's value wins when it passes one
          truncation: truncate    # truncate | drop | split (texts cut into chunks): longer examples, counted
          pack: true              # pack several examples per sequence (position ids restart per example)
          train_on: all_assistant # all_assistant | last_assistant: which assistant turns carry loss
          enable_thinking: null   # Qwen3 templates: false = each reply's empty <think> block is prompt, not trained
          eval_fraction: 0.01     # hold out this fraction of every source for split="eval" ...
          eval_sources: []        # ... or evaluate on these sources instead (same fields as sources)
          shuffle_buffer: 1000    # records shuffled together per source (a deterministic permutation)
          num_workers: 1          # tokenizer processes (0 = tokenize in the training process)

    Local files may hold any of the Hub schemas or plain `{"messages": [...]}` / `{"text": ...}`
    records (`schema: auto` detects the layout per record); `.txt` files are pretraining text, one
    document per line. Records that cannot be used are skipped and counted by reason, never fatal.

    Args:
        sources: the training mix.
        eval_sources: held-out sources for `split="eval"` (instead of `eval_fraction`).
        eval_fraction: fraction of each source's records held out for `split="eval"` (chosen by a
            hash of the record's position, so train and eval never share a record).
        max_seq_len: default sequence length (a loader built with an explicit `max_seq_len` uses that).
        truncation: "truncate" keeps the first `max_seq_len` tokens, "drop" skips the example, "split"
            cuts pretraining texts into consecutive `max_seq_len` chunks (conversations are truncated).
        pack: pack examples into full rows; otherwise one example per row, padded to the batch's longest.
        pad_to_multiple_of: unpacked rows are padded to a multiple of this (fewer compiled shapes).
        train_on: "all_assistant" or "last_assistant".
        enable_thinking: the chat template's reasoning switch (Qwen3's `enable_thinking`) for every render; None
            keeps the template's default.
        shuffle_buffer: records per source shuffled together (1 = file order).
        num_workers: background tokenizer processes (0 = inline).
        max_record_bytes: larger records are skipped as "too_large".
        cycle: restart a source when it ends (training); eval and dry runs read each source once.
    """

    sources: List[SourceConfig] = field(default_factory=list)
    eval_sources: List[SourceConfig] = field(default_factory=list)
    eval_fraction: float = 0.0
    max_seq_len: int = 2048
    truncation: str = "truncate"
    pack: bool = True
    pad_to_multiple_of: int = 64
    train_on: str = "all_assistant"
    enable_thinking: Optional[bool] = None
    shuffle_buffer: int = 1000
    num_workers: int = 1
    max_record_bytes: int = 4 << 20
    cycle: bool = True

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "DataConfig":
        """Build and validate a config from the `data:` mapping of a YAML file.

        Args:
            d: the mapping (sources may be dicts, Hub short names or local paths as plain strings).

        Returns:
            DataConfig: the validated config.

        Raises:
            ConfigError: on unknown keys or invalid values, naming the field.
        """
        d = check_keys(d or {}, cls, "data")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        for key in ("sources", "eval_sources"):  # `sources:` left empty in YAML is null
            if getattr(self, key) is None:
                setattr(self, key, [])
        check_types(self, "data.")
        self.sources = [_source_from(s, f"data.sources[{i}]") for i, s in enumerate(self.sources)]
        self.eval_sources = [_source_from(s, f"data.eval_sources[{i}]") for i, s in enumerate(self.eval_sources)]
        if not self.sources and not self.eval_sources:
            raise ConfigError("data.sources is empty: list at least one source (a Hub name or a local path)")
        if self.truncation not in TRUNCATION:
            raise ConfigError(f"data.truncation must be one of {TRUNCATION}, got {self.truncation!r}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_sources:
            raise ConfigError("data: set either eval_fraction or eval_sources, not both")
        for name in ("max_seq_len", "shuffle_buffer", "pad_to_multiple_of", "max_record_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


def _source_from(s: Any, where: str) -> SourceConfig:
    """A SourceConfig from a dict, a plain string (Hub name or local path) or a SourceConfig."""
    if isinstance(s, str):
        is_path = s not in HUB_SOURCES and (Path(s).exists() or bool(Path(s).suffix))
        s = {"path": s} if is_path else {"name": s}
    if not isinstance(s, SourceConfig):
        s = SourceConfig(**check_keys(s, SourceConfig, where))
    check_types(s, f"{where}.")
    if not s.name and not s.path:
        raise ConfigError(f"{where}: give a Hub `name` (e.g. openthoughts) or a local `path`")
    if s.schema not in SCHEMAS:
        raise ConfigError(f"{where}.schema must be one of {SCHEMAS}, got {s.schema!r}")
    if not s.weight > 0:
        raise ConfigError(f"{where}.weight must be > 0, got {s.weight}")
    return s
