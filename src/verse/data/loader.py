"""`build_loader`: the resumable, deterministic batch iterator the trainer consumes.

Pipeline: per-source readers (`sources.py`) -> weighted mix -> tokenize in worker processes
(`encode.py`) -> pack or pad (`packing.py`) -> LongTensor batches. Everything before the tokenizer is
a pure function of (seed, position), so `state_dict()` is just a position: where the mix and each
source stand at the start of a block of examples, plus how many examples of that block (and chunks of a
split text) are already in yielded batches. `load_state_dict()` replays from there without tokenizing
the skipped examples.

Data-parallel ranks (issue #14) read the training data in one GLOBAL order: every rank reads, tokenizes and packs
the same rows, and of each global micro-batch of `world_size * micro_batch_size` rows rank r keeps the r-th
contiguous `micro_batch_size`. The rows of a step are then those of one process with the whole batch, and the
position after a global micro-batch is the same on every rank and does not depend on the number of ranks: a
checkpoint saved on N ranks resumes exactly on M (no example twice, none skipped) as long as the global batch
(ranks x micro-batch x accumulation) is kept. The price is that each rank tokenizes the whole stream (in its
`num_workers` processes), not its share. Two cases read per-rank SHARES instead (`SourceReader` with rank and
world_size), whose positions differ per rank and resume only on the same number of ranks: a Hub stream (each rank
streams only its part of it, `datasets.distributed.split_dataset_by_node`, so no rank can see the global order),
and the eval split (read from the start at every evaluation, never resumed); positions saved before global orders
existed (state version 1) are read the same way.
"""

import copy
import dataclasses
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from verse.data.config import DataConfig
from verse.data.encode import Encoded, Encoder
from verse.data.packing import collate, packed_row, padded_row
from verse.data.sources import SourceReader, is_hub_layout
from verse.errors import ConfigError, VerseError

BLOCK = 128  # examples tokenized per round trip to the workers
MIX_CHUNK = 1024  # mixing draws generated per RNG call


class MixedStream:
    """Examples drawn from several sources with fixed weights; draw k is a pure function of (seed, k).

    Args:
        readers: one `SourceReader` per source.
        weights: sampling probabilities (sum 1).
        seed: run seed.
    """

    def __init__(self, readers: List[SourceReader], weights: np.ndarray, seed: int) -> None:
        self.readers, self.weights, self.seed = readers, weights, seed
        self.draws = 0
        self._chunk = (-1, np.zeros(0, dtype=np.int64))

    def state_dict(self) -> Dict[str, Any]:
        """Draw counter and every source's position."""
        return {"draws": self.draws, "sources": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
        if len(state["sources"]) != len(self.readers):
            raise ConfigError(f"data state has {len(state['sources'])} sources but the config has "
                              f"{len(self.readers)}; resume with the same data config")
        self.draws = state["draws"]
        for reader, s in zip(self.readers, state["sources"]):
            reader.load_state_dict(s)

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> Tuple[int, Any, str]:
        while not all(r.exhausted for r in self.readers):
            i = self._choice(self.draws)
            self.draws += 1
            try:
                example, where = next(self.readers[i])
            except StopIteration:  # only non-cycling sources end; their draws are skipped
                continue
            return i, example, where
        raise StopIteration

    def _choice(self, k: int) -> int:
        chunk, choices = self._chunk
        if chunk != k // MIX_CHUNK:
            chunk = k // MIX_CHUNK
            rng = np.random.default_rng([self.seed, 0x6D6978, chunk])
            choices = rng.choice(len(self.weights), size=MIX_CHUNK, p=self.weights)
            self._chunk = (chunk, choices)
        return int(choices[k % MIX_CHUNK])


class DataLoader:
    """Batches of `input_ids`, shifted `labels` and (packed) `position_ids` for one rank; see `build_loader`.

    Attributes:
        shares (bool): whether this rank reads its own share of every source (a Hub stream or the eval split on
            several ranks, or a resumed per-rank position) rather than its slice of the global order.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, max_seq_len: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if split == "eval" and not (cfg.eval_sources or cfg.eval_fraction):
            raise ConfigError("data: split='eval' needs data.eval_fraction > 0 or data.eval_sources")
        if micro_batch_size < 1 or max_seq_len < 2:
            raise ConfigError(f"micro_batch_size must be >= 1 and max_seq_len >= 2, got {micro_batch_size}, "
                              f"{max_seq_len}")
        template = getattr(tokenizer, "chat_template", None) or ""
        if cfg.enable_thinking is not None and "enable_thinking" not in template:
            name = getattr(tokenizer, "name", "the tokenizer")
            raise ConfigError(f"data.enable_thinking: the chat template of {name} has no enable_thinking switch "
                              "(Qwen3's); remove the field")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.max_seq_len, self.micro_batch_size, self.seed = max_seq_len, micro_batch_size, seed
        self.split, self.rank, self.world_size = split, rank, world_size
        use_eval_sources = split == "eval" and bool(cfg.eval_sources)
        sources = cfg.eval_sources if use_eval_sources else cfg.sources
        if not sources:
            raise ConfigError("data.sources is empty: list at least one training source")
        self.sources = sources
        self.hub = next((s.label for s in sources if s.path is None or is_hub_layout(Path(s.path).expanduser())),
                        None)  # a Hub stream: read in per-rank shares
        self.shares = world_size > 1 and (split == "eval" or self.hub is not None)
        self.readers = self._readers()
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        self.counters: Counter = Counter()
        self.lengths: Optional[List[int]] = None  # set to [] to record every example's length (stats)
        self.limit: Optional[int] = None  # stop after this many examples (dry runs)
        self._resume: Dict[str, Any] = {"stream": None, "skip": 0, "counters": {}}
        self._start = MixedStream(self.readers, self.weights, seed).state_dict()  # nothing read yet

    def _readers(self) -> List[SourceReader]:
        """One reader per source: of this rank's share (`shares`), else of the whole source (the global order)."""
        rank, world_size = (self.rank, self.world_size) if self.shares else (0, 1)
        holdout = (0.0, False) if self.split == "eval" and self.cfg.eval_sources else (
            self.cfg.eval_fraction, self.split == "eval")
        return [SourceReader(s, i, seed=self.seed, rank=rank, world_size=world_size, holdout=holdout,
                             cycle=self.cfg.cycle and self.split == "train",
                             shuffle_buffer=self.cfg.shuffle_buffer if self.split == "train" else 1,  # eval: file order
                             max_record_bytes=self.cfg.max_record_bytes)
                for i, s in enumerate(self.sources)]

    def state_dict(self) -> Dict[str, Any]:
        """Position after the last yielded batch (plain ints, strings and dicts: JSON- and torch.save-able).

        `order` is "global" (the same on every rank, valid for any number of ranks) or "shares" (this rank's own,
        with the `world_size` it is valid for)."""
        order = {"order": "shares", "world_size": self.world_size} if self.shares else {"order": "global"}
        return copy.deepcopy({"version": 2, **order, **self._resume})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Make the next iteration continue exactly after the batch the state was taken at.

        A global position resumes on any number of ranks; a per-rank one (state version 1, or `order: shares`)
        only on the number of ranks that saved it, or as a global one when that number was 1.

        Raises:
            ConfigError: a position that cannot continue on this number of ranks.
        """
        saved = 1 if state.get("order") == "global" else state.get("world_size", self.world_size)
        if saved == 1 and self.shares:
            raise ConfigError(f"data source {self.hub!r} is a Hub stream, which each of the {self.world_size} "
                              "data-parallel ranks reads in its own share (split_dataset_by_node), but the saved data "
                              "position is of the whole stream (1 rank); resume with 1 data-parallel rank")
        if saved not in (1, self.world_size):
            raise ConfigError(f"the saved data position is {saved} data-parallel ranks' shares of the sources, which "
                              f"continue only on {saved} ranks (now {self.world_size}); resume with {saved} "
                              "data-parallel ranks")
        if saved > 1 and not self.shares:  # a per-rank position of a run from before the global order
            self.shares = True
            self.readers = self._readers()
            self._start = MixedStream(self.readers, self.weights, self.seed).state_dict()
        self._resume = copy.deepcopy({k: state[k] for k in ("stream", "skip", "counters")})
        self._resume["piece"] = state.get("piece", 0)

    @property
    def bad_by_reason(self) -> Dict[str, int]:
        """Skipped records by reason, summed over sources (up to the records read so far)."""
        total: Counter = Counter()
        for r in self.readers:
            total.update(r.bad)
        if self.counters["dropped_tokenizer_error"]:
            total["tokenizer_error"] = self.counters["dropped_tokenizer_error"]
        return dict(sorted(total.items()))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches from the saved position on (the start for `split="eval"`, or after a finished pass)."""
        if self.split == "eval":
            self._resume = {"stream": None, "skip": 0, "counters": {}}
        stream = MixedStream(self.readers, self.weights, self.seed)
        stream.load_state_dict(self._resume["stream"] or self._start)
        self.counters = Counter(self._resume["counters"])
        workers = self.cfg.num_workers if self.split == "train" else 0  # eval reads a few batches: no pool
        encoder = Encoder(self.tokenizer, workers, max_seq_len=self.max_seq_len, train_on=self.cfg.train_on,
                          truncation=self.cfg.truncation, enable_thinking=self.cfg.enable_thinking)
        try:
            yield from self._batches(encoder.map(self._blocks(stream, self._resume["skip"])))
        finally:
            encoder.close()
        self._resume = {"stream": None, "skip": 0, "counters": {}}  # a finished pass: the next one starts over

    def _blocks(self, stream: MixedStream, skip: int) -> Iterator[Tuple[Tuple[dict, int], list]]:
        """(position tag, examples) blocks; the tag is (stream state at block start, examples before it)."""
        snap = stream.state_dict()
        for _ in islice(stream, skip):  # already in yielded batches (and in the restored counters)
            pass
        drawn = self.counters["examples"]
        while True:
            n = BLOCK if self.limit is None else min(BLOCK, self.limit - drawn)
            block = list(islice(stream, max(n, 0)))
            if not block:
                return
            drawn += len(block)
            yield (snap, skip), block
            snap, skip = stream.state_dict(), 0

    def _batches(self, encoded: Iterator[Tuple[Tuple[dict, int], List[Encoded]]]) -> Iterator[Dict[str, torch.Tensor]]:
        """Pack or pad encoded examples into batches, recording the resume point of each batch.

        A resume point is (stream state at a block start, examples of the block to skip, chunks of the next
        example to skip (split texts), counters as of that point), so the counters in a checkpoint cover
        exactly what came before it.
        """
        T, B, pack = self.max_seq_len, self.micro_batch_size, self.cfg.pack
        group = B if self.shares else B * self.world_size  # rows read per batch this rank yields
        rows: List[Tuple[Any, dict]] = []  # completed rows (packed dict or one Encoded) and their resume points
        cur: List[Encoded] = []  # the open (packed) row
        cur_len, cur_start = 0, {}
        resume_piece = self._resume.get("piece", 0)
        # Examples dropped since the last kept one, per source: a reader yields its examples in shuffled blocks of
        # S consecutive ones, so a run longer than (its distinct examples + 2 S) spans a whole pass, all dropped.
        run = [[0, set()] for _ in self.readers]
        for (snap, base), encs in encoded:
            for i, enc in enumerate(encs):
                first, resume_piece = resume_piece, 0
                if enc.dropped is not None:
                    self._count_example(enc)
                    source_run = run[enc.source]
                    source_run[0] += 1
                    source_run[1].add(enc.where)
                    if all(n > len(seen) + 2 * r.shuffle_buffer for (n, seen), r in zip(run, self.readers)):
                        raise VerseError(self._all_dropped_message())  # cycling would read the data forever
                    continue
                if run[enc.source][0]:
                    run = [[0, set()] for _ in self.readers]
                pieces = self._pieces(enc)
                for k in range(first, len(pieces)):
                    piece = pieces[k]
                    if pack and cur and cur_len + len(piece.ids) > T:
                        rows.append((self._packed(cur), cur_start))
                        cur, cur_len = [], 0
                    point = {"stream": snap, "skip": base + i, "piece": k, "counters": dict(self.counters)}
                    if k == 0:
                        self._count_example(enc)
                    self.counters["tokens"] += len(piece.ids)
                    self.counters["loss_tokens"] += int(piece.mask[1:].sum())
                    if not pack:
                        rows.append((piece, point))
                    else:
                        if not cur:
                            cur_start = point
                        cur.append(piece)
                        cur_len += len(piece.ids)
                        if cur_len == T:
                            rows.append((self._packed(cur), cur_start))
                            cur, cur_len = [], 0
                    while len(rows) >= group:
                        batch, rows = self._micro_batch([r for r, _ in rows[:group]]), rows[group:]
                        more = k + 1 < len(pieces)
                        after = {"stream": snap, "skip": base + i + (not more), "piece": k + 1 if more else 0,
                                 "counters": dict(self.counters)}
                        self._resume = rows[0][1] if rows else (cur_start if cur else after)
                        yield batch
        if cur:
            rows.append((self._packed(cur), cur_start))
        for start in range(0, len(rows), group):
            batch = self._micro_batch([r for r, _ in rows[start:start + group]])
            self._resume = rows[start + group][1] if start + group < len(rows) else self._end_point()
            yield batch

    def _all_dropped_message(self) -> str:
        dropped = ", ".join(f"{k.removeprefix('dropped_')}: {v}" for k, v in sorted(self.counters.items())
                            if k.startswith("dropped_"))
        return (f"data: every example of a whole pass over the sources was dropped ({dropped}) at max_seq_len "
                f"{self.max_seq_len}; raise max_seq_len, set data.truncation: truncate, or check the data with "
                "`verse data stats`")

    def _end_point(self) -> Dict[str, Any]:
        """The position after everything: resuming from it yields nothing more."""
        return {"stream": {"draws": 0, "sources": [{**r.state_dict(), "exhausted": True} for r in self.readers]},
                "skip": 0, "piece": 0, "counters": dict(self.counters)}

    def _count_example(self, enc: Encoded) -> None:
        """Count one example (its tokens are counted per piece as they go into rows)."""
        c = self.counters
        c["examples"] += 1
        if self.lengths is not None:
            self.lengths.append(enc.length)
        if enc.dropped is not None:
            c[f"dropped_{enc.dropped}"] += 1
            return
        c["records"] += 1
        c[f"records/{self.readers[enc.source].src.label}"] += 1
        if enc.truncated:
            c["truncated"] += 1
            c["truncated_tokens"] += enc.truncated
        if len(enc.ids) > self.max_seq_len:
            c["split"] += 1

    def _pieces(self, enc: Encoded) -> List[Encoded]:
        """The example, or (truncation "split", texts only) its consecutive max_seq_len chunks."""
        T = self.max_seq_len
        if len(enc.ids) <= T:
            return [enc]
        # a last chunk of one token has no target: it is left out
        return [dataclasses.replace(enc, ids=enc.ids[j:j + T], mask=enc.mask[j:j + T])
                for j in range(0, len(enc.ids) - 1, T)]

    def _packed(self, examples: List[Encoded]) -> Dict[str, np.ndarray]:
        used = sum(len(e.ids) for e in examples)
        self.counters["rows"] += 1
        self.counters["row_tokens"] += self.max_seq_len
        self.counters["pad_tokens"] += self.max_seq_len - used
        return packed_row(examples, self.max_seq_len, self.pad_id)

    def _micro_batch(self, rows: List[Any]) -> Dict[str, torch.Tensor]:
        """This rank's batch of the rows read for it: all of them (shares), else its slice of a global micro-batch.

        Every rank counts every slice's padding, so the counters (part of the position) agree on all ranks. In the
        last, incomplete global micro-batch of a pass a rank whose slice is empty gets one row without loss tokens:
        every rank yields as many batches (each step's collectives pair up) and the loss is unchanged.
        """
        if self.shares:
            return self._collate(rows)
        B = self.micro_batch_size
        slices = [rows[i:i + B] for i in range(0, len(rows), B)]  # world_size slices at most: not a hot loop
        lengths = [self._pad_length(s) for s in slices]
        if self.rank >= len(slices):
            empty = Encoded(ids=np.full(1, self.pad_id, dtype=np.int64), mask=np.zeros(1, dtype=bool), length=1,
                            source=0, where="")
            return collate([packed_row([empty], self.max_seq_len, self.pad_id) if self.cfg.pack
                            else padded_row(empty, 1, self.pad_id)])
        return self._collate(slices[self.rank], lengths[self.rank])

    def _pad_length(self, rows: List[Any]) -> int:
        """Padded mode: the length `rows` are padded to (the longest, rounded up to pad_to_multiple_of), counted."""
        if self.cfg.pack:
            return self.max_seq_len
        m = self.cfg.pad_to_multiple_of
        length = min(self.max_seq_len, -(-max(len(e.ids) for e in rows) // m) * m)
        self.counters["rows"] += len(rows)
        self.counters["row_tokens"] += length * len(rows)
        self.counters["pad_tokens"] += sum(length - len(e.ids) for e in rows)
        return length

    def _collate(self, rows: List[Any], length: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Rows (packed dicts, or examples padded to `length`: counted here unless given) as one batch."""
        if not self.cfg.pack:
            length = self._pad_length(rows) if length is None else length
            rows = [padded_row(e, length, self.pad_id) for e in rows]
        return collate(rows)


def build_loader(cfg: Union[DataConfig, Dict[str, Any]], tokenizer: Any, *, max_seq_len: Optional[int] = None,
                 micro_batch_size: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 split: str = "train") -> DataLoader:
    """The batch iterator for training (or, with `split="eval"`, the held-out data).

    Each batch is a dict: `input_ids` LongTensor [B, T]; `labels` [B, T], already shifted
    (`labels[:, t]` is the target of `logits[:, t]`, -100 = no loss); `position_ids` [B, T] only when
    packing (restarting at 0 per document: pass `attn_mask=document_mask(position_ids)` to the model).

    Args:
        cfg: the data config (or its `data:` mapping).
        tokenizer: a Verse tokenizer, or a name/path for `verse.load_tokenizer`.
        max_seq_len: tokens per row (default `cfg.max_seq_len`).
        micro_batch_size: rows per batch.
        seed: shuffle and mixing seed.
        rank: data-parallel rank of this process.
        world_size: number of data-parallel ranks: each keeps its slice of every global micro-batch of
            `world_size * micro_batch_size` rows, read in one order whatever the number of ranks (a Hub stream and
            the eval split: each rank reads a disjoint share of every source; see the module docstring).
        split: "train" (endless when `cfg.cycle`) or "eval" (one pass over the held-out data).

    Returns:
        DataLoader: iterable of batches with `state_dict()` / `load_state_dict()` for exact resume.

    Raises:
        VerseError: a missing file or an unreachable Hub dataset (at once, not mid-run), a bad config.
    """
    if isinstance(cfg, dict):
        cfg = DataConfig.from_dict(cfg)
    else:
        cfg.validate()
    if isinstance(tokenizer, str):
        from verse.tokenization import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return DataLoader(cfg, tokenizer, max_seq_len=max_seq_len or cfg.max_seq_len, micro_batch_size=micro_batch_size,
                      seed=seed, rank=rank, world_size=world_size, split=split)
