"""Reading records from the Hub or local files with `datasets` streaming: shard, hold out, shuffle, resume.

Every source is a list of parts (one Hub split, or one local file each) read with
`datasets.load_dataset(..., streaming=True)`. JSON Lines go through the `text` builder and are parsed
line by line here, so that one broken line (bad JSON, non-UTF-8 bytes, a type that would break Arrow's
schema inference for the whole file) is skipped and reported with its file and line instead of failing
the file. A Hub dataset is split over the data-parallel ranks by `datasets.distributed.split_dataset_by_node`
(whole shards per rank when their number allows, else every `world_size`-th row), and a hash of the row's content
decides train vs eval (the same rows whatever the number of ranks); row `r` of a local file belongs to rank
`r % world_size`, and a hash of its position decides train vs eval. Rows are shuffled in blocks of
`shuffle_buffer` by a permutation seeded by (seed, source, epoch, block), so a position is just (epoch, part, row,
block, offset), the row counted within the rank's share of a Hub part: a resume re-reads at most one block per
source.
"""

import glob
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from verse.data.config import HUB_SOURCES, SourceConfig
from verse.data.formats import BadRecord, Example, to_example
from verse.errors import VerseError

log = logging.getLogger("verse.data")

LOCAL_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
                  ".md": "text", ".py": "text"}
REPORT_FIRST = 5  # bad records reported (with file and line) per source


@dataclass
class Part:
    """One stream of rows: a Hub split or a local file."""

    kind: str  # hub | jsonl | json | parquet | text
    path: str  # repo id or file path
    config: Optional[str] = None
    split: str = "train"

    def where(self, row: int) -> str:
        """Human location of a row: `file:line` for line-based files, else the row index."""
        if self.kind in ("jsonl", "text"):
            return f"{self.path}:{row + 1}"
        return f"{self.path}" + (f"[{self.split}]" if self.kind == "hub" else "") + f" row {row}"


def resolve_parts(src: SourceConfig) -> List[Part]:
    """The parts of a source, checked to exist (local) or to be reachable (Hub), so a run fails at start.

    Args:
        src: the source.

    Returns:
        List[Part]: parts in a fixed order.

    Raises:
        VerseError: a missing local path, an unsupported file type, or a Hub dataset that cannot be reached.
    """
    if src.path is not None:
        path = Path(src.path).expanduser()
        if is_hub_layout(path):
            return [_hub_part(src, str(path))]
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path))))
                       if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise VerseError(f"data source {src.label!r}: no .jsonl/.json/.parquet/.txt/.md/.py file at {src.path}; "
                             "check the path")
        parts = [Part(_local_kind(p), str(p)) for p in files]
        for part in parts:
            if part.kind == "parquet":
                _check_parquet(part.path)
        return parts
    return [_hub_part(src, None)]


def is_hub_layout(path: Path) -> bool:
    """Whether `path` is a directory laid out as a Hub dataset repo (a README.md dataset card with YAML header)."""
    card = path / "README.md"
    if not card.is_file():
        return False
    with open(card, "rb") as f:
        return f.read(4).rstrip(b"\r\n") == b"---"


def hub_defaults(src: SourceConfig) -> Tuple[str, Optional[str], str, str]:
    """(repo id, config, split, schema) of a source: its short name's, or those of the known repo its path ends in."""
    if src.name in HUB_SOURCES:
        return HUB_SOURCES[src.name]
    if src.path is not None:
        resolved = Path(src.path).expanduser().resolve().as_posix()
        for known in HUB_SOURCES.values():
            if resolved.endswith("/" + known[0]):
                return known
    return (src.name, None, "train", "auto")


def _hub_part(src: SourceConfig, local_dir: Optional[str]) -> Part:
    """The one part of a Hub dataset (or of a local copy laid out as one), checked to open with its config/split."""
    repo, config, split, _ = hub_defaults(src)
    part = Part("hub", local_dir or repo, src.config or config, src.split or split)
    try:
        open_part(part)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        where = f"{local_dir} (a local copy of a Hub dataset)" if local_dir else f"{repo} from the Hugging Face Hub"
        hint = ("check the data source's `config:` and `split:` against the dataset card's configs" if local_dir else
                "check the network (HF_HUB_OFFLINE), the source's `config:`/`split:`, or use a local `path:`")
        raise VerseError(f"data source {src.label!r}: cannot load {where} (config {part.config}, split {part.split}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; {hint}") from None
    return part


def source_schema(src: SourceConfig) -> str:
    """The schema a source's records are read with (its own, or the Hub short name's)."""
    if src.schema != "auto" or (src.path is not None and not is_hub_layout(Path(src.path).expanduser())):
        return src.schema
    return hub_defaults(src)[3]


def open_part(part: Part, skip: int = 0, rank: int = 0, world_size: int = 1):
    """A streaming `datasets.IterableDataset` over a part's rows, after skipping `skip` rows.

    Args:
        part: the part.
        skip: rows to skip (resume; rows of this rank's share for a Hub part).
        rank: data-parallel rank: a Hub part yields only this rank's share (`split_dataset_by_node`).
        world_size: number of data-parallel ranks.

    Returns:
        datasets.IterableDataset: rows as dicts ({"text": line} for jsonl and text files).
    """
    import datasets

    if part.kind == "hub":
        ds = datasets.load_dataset(part.path, part.config, split=part.split, streaming=True)
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    elif part.kind in ("jsonl", "text"):
        # "replace" keeps the stream going; the replacement character then marks the line as non-UTF-8.
        ds = datasets.load_dataset("text", data_files=[part.path], split="train", streaming=True,
                                   encoding_errors="replace",
                                   sample_by="line" if part.kind == "jsonl" else "paragraph")
    else:
        ds = datasets.load_dataset(part.kind, data_files=[part.path], split="train", streaming=True)
    return ds.skip(skip) if skip else ds


def parse_row(part: Part, row: Dict[str, Any], max_bytes: int) -> Any:
    """Decode one raw row to a record; raise BadRecord for bytes that are not a record.

    Args:
        part: the part the row came from.
        row: the row as `datasets` yields it.
        max_bytes: larger rows are rejected as too_large.

    Returns:
        Any: the record (a dict; {"text": ...} for text files), or None for a blank line.
    """
    if part.kind in ("jsonl", "text"):
        line = row["text"]
        if len(line) > max_bytes:
            raise BadRecord("too_large", f"{len(line)} characters > max_record_bytes {max_bytes}")
        if "\ufffd" in line:
            raise BadRecord("non_utf8", "bytes that are not UTF-8")
        if part.kind == "text":
            return {"text": line.strip("\n")} if line.strip() else None
        if not line.strip():
            return None
        try:
            return json.loads(line)
        except (ValueError, RecursionError) as e:  # bad JSON, an integer past 4300 digits, nesting past the stack
            raise BadRecord("bad_json", f"{type(e).__name__}: {str(e)[:200]}") from None
    size = _approx_size(row)
    if size > max_bytes:
        raise BadRecord("too_large", f"about {size} characters > max_record_bytes {max_bytes}")
    return row


class SourceReader:
    """Normalised examples of one source for one rank and split, in a seeded, resumable shuffled order.

    Args:
        src: the source.
        index: its position in the mix (part of the shuffle seed).
        seed: run seed.
        rank: data-parallel rank.
        world_size: number of data-parallel ranks.
        holdout: (fraction, want_eval): keep rows whose hash is below `fraction` iff `want_eval`.
        cycle: start a new epoch when the source ends (else it is exhausted).
        shuffle_buffer: rows per shuffled block.
        max_record_bytes: larger records are skipped.
    """

    def __init__(self, src: SourceConfig, index: int, *, seed: int, rank: int, world_size: int,
                 holdout: Tuple[float, bool], cycle: bool, shuffle_buffer: int, max_record_bytes: int) -> None:
        self.src, self.index, self.seed = src, index, seed
        self.rank, self.world_size = rank, world_size
        self.holdout, self.cycle = holdout, cycle
        self.shuffle_buffer, self.max_record_bytes = shuffle_buffer, max_record_bytes
        self.parts = resolve_parts(src)
        self.schema = source_schema(src)
        self.bad: Counter = Counter()
        self.reported: set = set()  # locations already reported (a cycled source meets them every epoch)
        self._pos = {"epoch": 0, "part": 0, "row": 0, "block": 0, "offset": 0, "bad": {}, "exhausted": False}
        self._block: Optional[List[Tuple[Example, str]]] = None
        self._ended = False
        self._perm = np.arange(0)
        self._block_end: Tuple[int, int, int] = (0, 0, 0)
        self._rows: Optional[Iterator] = None
        self._rows_at: Tuple[int, int, int] = (-1, -1, -1)

    def state_dict(self) -> Dict[str, Any]:
        """Position of the next example: block start (epoch, part, row), block number, offset in block."""
        return {**self._pos, "bad": dict(self._pos["bad"])}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a `state_dict()`; the current block is re-read on the next example."""
        self._pos = {**state, "bad": dict(state["bad"])}
        self.bad = Counter(state["bad"])
        self._block = None

    @property
    def exhausted(self) -> bool:
        """True once a non-cycling source has yielded all its examples."""
        return self._pos["exhausted"]

    def __iter__(self) -> "SourceReader":
        return self

    def __next__(self) -> Tuple[Example, str]:
        pos = self._pos
        if self._block is None:
            self._read_block()
        while pos["offset"] >= len(self._block):
            if self._ended or pos["exhausted"]:
                pos["exhausted"] = True
                raise StopIteration
            pos["epoch"], pos["part"], pos["row"] = self._block_end
            pos["block"] += 1
            pos["offset"] = 0
            pos["bad"] = dict(self.bad)
            self._read_block()
        item = self._block[self._perm[pos["offset"]]]
        pos["offset"] += 1
        return item

    def _read_block(self) -> None:
        """Read the next `shuffle_buffer` usable examples from the block start; count the bad ones."""
        pos = self._pos
        self.bad = Counter(pos["bad"])
        epoch, part, row = pos["epoch"], pos["part"], pos["row"]
        block: List[Tuple[Example, str]] = []
        self._ended = False
        wraps = 0
        while len(block) < self.shuffle_buffer:
            if part >= len(self.parts):  # end of an epoch
                if not self.cycle:
                    self._ended = True
                    break
                if not block and (wraps or (pos["part"], pos["row"]) == (0, 0)):  # a whole epoch without one
                    raise VerseError(self._no_records_message())
                epoch, part, row, wraps = epoch + 1, 0, 0, wraps + 1
                continue
            rows = self._rows_from(epoch, part, row)
            try:
                raw = next(rows)
            except StopIteration:
                part, row = part + 1, 0
                continue
            except Exception as e:  # a corrupt file: count it, go on with the next part
                log.error("cannot read %s further (%s: %s); skipping the rest of it", self.parts[part].where(row),
                          type(e).__name__, e)
                self.bad["unreadable_file"] += 1
                part, row = part + 1, 0
                continue
            here = row
            row += 1
            self._rows_at = (epoch, part, row)
            hub = self.parts[part].kind == "hub"  # rows of this rank's share only, numbered within it
            if (not hub and here % self.world_size != self.rank) or not self._in_split(part, here, raw):
                continue
            where = self.parts[part].where(here) + (f" of rank {self.rank}'s share" if hub and self.world_size > 1
                                                    else "")
            try:
                record = parse_row(self.parts[part], raw, self.max_record_bytes)
                if record is not None:
                    block.append((to_example(record, self.schema), where))
            except BadRecord as e:
                self._count(e, where)
        self._block_end = (epoch, part, row)
        rng = np.random.default_rng([self.seed, self.index, pos["epoch"], pos["block"]])
        self._perm = rng.permutation(len(block)) if self.shuffle_buffer > 1 else np.arange(len(block))
        self._block = block

    def _rows_from(self, epoch: int, part: int, row: int) -> Iterator:
        """The open row iterator when it is at (epoch, part, row), else a new one skipped there."""
        if self._rows is None or self._rows_at != (epoch, part, row):
            self._rows = iter(open_part(self.parts[part], skip=row, rank=self.rank, world_size=self.world_size))
            self._rows_at = (epoch, part, row)
        return self._rows

    def _in_split(self, part: int, row: int, raw: Dict[str, Any]) -> bool:
        fraction, want_eval = self.holdout
        if not fraction:
            return not want_eval
        # a local file's rows keyed by file name and row, so renaming the source or moving its folder keeps the
        # split; a Hub row by its content (its index within a rank's share depends on the number of ranks)
        key = (json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str) if self.parts[part].kind == "hub"
               else f"{Path(self.parts[part].path).name}/{row}")
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "little") / 2.0**64 < fraction) == want_eval

    def _count(self, e: BadRecord, where: str) -> None:
        self.bad[e.reason] += 1
        if len(self.reported) < REPORT_FIRST and where not in self.reported:
            self.reported.add(where)
            log.warning("skipped bad record at %s: %s", where, e)

    def _no_records_message(self) -> str:
        bad = ", ".join(f"{k}: {v}" for k, v in sorted(self.bad.items())) or "none"
        share = f" in rank {self.rank}'s share" if self.world_size > 1 else ""
        return (f"data source {self.src.label!r}: no usable records{share} (bad records: {bad}); "
                "check the file, its schema, or the eval_fraction")


def _local_kind(path: Path) -> str:
    kind = LOCAL_SUFFIXES[path.suffix.lower()]
    if kind == "json":  # a .json file is either one JSON array/object or JSON Lines
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    return kind


def _check_parquet(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as e:
        raise VerseError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); re-export it") from None


def _approx_size(obj: Any) -> int:
    """Characters in the strings of a nested record (cheap stand-in for its byte size)."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_approx_size(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_approx_size(v) for v in obj)
    return 8
