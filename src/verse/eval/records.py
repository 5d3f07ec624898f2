"""Conversations of a data source (local file or Hub dataset, any schema `verse.data` reads), for evaluation."""

from itertools import islice
from typing import Dict, List, Optional, Tuple

from verse.data import SourceConfig
from verse.data.config import DataConfig, _source_from
from verse.data.sources import SourceReader
from verse.errors import VerseError

Messages = List[Dict[str, str]]


def as_source(data: str | SourceConfig) -> SourceConfig:
    """A `SourceConfig` from a local path or Hub name (as `verse.data` understands a plain string)."""
    return data if isinstance(data, SourceConfig) else _source_from(data, "--data")


def eval_data_config(data: str | SourceConfig) -> DataConfig:
    """A data config that reads `data` once, in file order, as the held-out split."""
    return DataConfig(eval_sources=[as_source(data)], pack=False, shuffle_buffer=1, num_workers=0, cycle=False)


def read_conversations(data: str | SourceConfig, limit: Optional[int] = None) -> List[Messages]:
    """The first `limit` usable conversations of a source, in file order (bad records are skipped, as in training).

    Args:
        data (str | SourceConfig): local path (.jsonl/.json/.parquet) or Hub name.
        limit (Optional[int]): most conversations; None = all.

    Returns:
        List[Messages]: conversations, each ending with an assistant turn.
    """
    reader = SourceReader(as_source(data), 0, seed=0, rank=0, world_size=1, holdout=(0.0, False), cycle=False,
                          shuffle_buffer=1, max_record_bytes=DataConfig.max_record_bytes)
    conversations = [example for example, _ in islice(reader, limit)]
    if any(isinstance(c, str) for c in conversations):
        raise VerseError(f"--data {reader.src.label}: holds plain-text records; exact-match needs conversations "
                         "(use --task loss for text)")
    return conversations


def split_prompt(conversation: Messages) -> Tuple[Messages, str]:
    """(prompt messages before the last assistant turn, that turn's content)."""
    return conversation[:-1], conversation[-1]["content"]
