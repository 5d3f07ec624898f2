"""Examples to token ids + loss mask with the model's tokenizer, the length policy, and worker processes.

A chat example is rendered by the tokenizer's chat template (`encode_chat`): the mask is True exactly
on the assistant content and the end token of each trained assistant turn. A text example is
`text + eos` (bos first when the tokenizer's `add_bos` says so) with every token trained. The mask marks *targets*: the loader turns it into labels
shifted by one (`labels[t] = ids[t + 1]` where `mask[t + 1]`).
"""

import logging
import multiprocessing
import pickle
import queue
import threading
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from verse.data.formats import Example
from verse.errors import VerseError

log = logging.getLogger("verse.data")


@dataclass
class Encoded:
    """One tokenized example (or the reason it was dropped).

    Args:
        ids: token ids, int64 [n] (n <= max_seq_len).
        mask: bool [n], True on tokens that are training targets.
        length: tokens before truncation.
        source: index of its source in the mix.
        where: file:line (or Hub row) it came from.
        dropped: "too_long", "no_loss_tokens" or "tokenizer_error" when the example is not used.
    """

    ids: np.ndarray
    mask: np.ndarray
    length: int
    source: int
    where: str
    dropped: Optional[str] = None

    @property
    def truncated(self) -> int:
        """Tokens cut off by truncation."""
        return self.length - len(self.ids) if self.dropped is None else 0


def encode_example(tokenizer: Any, example: Example, *, max_seq_len: int, train_on: str, truncation: str,
                   source: int = 0, where: str = "", enable_thinking: Optional[bool] = None) -> Encoded:
    """Tokenize one example and apply the length policy.

    Args:
        tokenizer: a Verse tokenizer (`encode_chat`, `encode`, `bos_id`, `eos_id`).
        example: a conversation (list of messages) or a text.
        max_seq_len: longest sequence kept.
        train_on: "all_assistant" or "last_assistant".
        truncation: "truncate" (keep the first max_seq_len tokens), "drop", or "split" (texts stay whole: the
            loader cuts them into max_seq_len chunks; conversations are truncated).
        source: index of the source (carried along for stats).
        where: location of the record (carried along for reports).
        enable_thinking: the chat template's reasoning switch (Qwen3); None = the template's default.

    Returns:
        Encoded: ids and mask, or `dropped` set.
    """
    try:
        if isinstance(example, str):
            ids = tokenizer.encode(example)
            ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + ids
            ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            mask = np.ones(len(ids), dtype=bool)
        else:
            switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
            enc = tokenizer.encode_chat(example, train_on=train_on, **switch)
            ids, mask = enc.input_ids, np.asarray(enc.loss_mask, dtype=bool)
    except Exception as e:  # a record the template rejects is a bad record, not the end of the run
        log.warning("skipped record at %s: the tokenizer failed (%s: %s)", where, type(e).__name__, e)
        return Encoded(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), 0, source, where, "tokenizer_error")
    ids = np.asarray(ids, dtype=np.int64)
    length = len(ids)
    dropped = None
    if length > max_seq_len and not (truncation == "split" and isinstance(example, str)):
        if truncation == "drop":
            dropped = "too_long"
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if dropped is None and not mask[1:].any():  # token 0 is never a target: nothing precedes it
        dropped = "no_loss_tokens"
    return Encoded(ids, mask, length, source, where, dropped)


CHUNK = 16  # examples per task sent to a worker
WORKER_TIMEOUT = 600.0  # seconds a block may take before the workers count as stuck
_WORKER: dict = {}


def _init_worker(tokenizer: Any, options: dict) -> None:
    _WORKER.update(tokenizer=tokenizer, options=options)


def _encode_chunk(items: Sequence[Tuple[int, Example, str]]) -> List[Encoded]:
    tok, opts = _WORKER["tokenizer"], _WORKER["options"]
    return [encode_example(tok, ex, source=i, where=w, **opts) for i, ex, w in items]


def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced by a background thread up to `depth` ahead (reading and network waits overlap training).

    Args:
        items: any iterator; only the background thread touches it.
        depth: items buffered ahead.

    Returns:
        Iterator[Any]: the same items in order; an exception of the producer is raised here.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    threading.Thread(target=produce, name="verse-data-reader", daemon=True).start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Encoder:
    """Tokenizes blocks of examples inline (num_workers=0) or in a pool of worker processes.

    With a pool, `map` sends block k+1 to the workers before it hands out block k, so tokenizing overlaps
    the training step; results come back in input order, so batches (and a resume) do not depend on the
    number of workers. Records are read and parsed by a background thread of the calling process, two
    blocks ahead. The pool is a `ProcessPoolExecutor`: a worker that dies (a crash in the tokenizer's native
    code, the OOM killer) fails the run with one line instead of leaving it waiting forever for a lost task,
    as `multiprocessing.Pool` did.

    Args:
        tokenizer: the tokenizer (inherited by forked workers; pickled where only spawn exists).
        num_workers: processes; 0 tokenizes in this process.
        **options: keyword arguments of `encode_example` (max_seq_len, train_on, truncation, enable_thinking).
    """

    def __init__(self, tokenizer: Any, num_workers: int, **options: Any) -> None:
        self.tokenizer, self.options = tokenizer, options
        self.pool = None
        if num_workers > 0:
            # fork (like torch's DataLoader) where there is one: no `if __name__ == "__main__"` guard needed in
            # user scripts and no pickling of the tokenizer; workers only run the tokenizer.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            if ctx.get_start_method() != "fork":
                try:
                    pickle.dumps(tokenizer)
                except Exception:  # an unpicklable tokenizer still works, in this process
                    num_workers = 0
            if num_workers > 0:
                self.pool = ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(tokenizer, options))
                # an abandoned iterator still stops its workers, at the latest when the interpreter exits
                self._finalizer = weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)
        self.num_workers = num_workers

    def map(self, blocks: Iterator[Tuple[Any, List[Tuple[int, Example, str]]]]) -> Iterator[Tuple[Any, List[Encoded]]]:
        """Encode (tag, block) pairs in order, one block ahead when a pool is used.

        Args:
            blocks: (tag, [(source, example, where), ...]) pairs; the tag is passed through.

        Returns:
            Iterator[Tuple[Any, List[Encoded]]]: (tag, encodings) in the input order.
        """
        if self.pool is None:
            for tag, block in blocks:
                yield tag, [encode_example(self.tokenizer, ex, source=i, where=w, **self.options)
                            for i, ex, w in block]
            return
        pending = None
        for tag, block in _prefetched(blocks):
            job = [self.pool.submit(_encode_chunk, block[i:i + CHUNK]) for i in range(0, len(block), CHUNK)]
            if pending is not None:
                yield pending[0], self._results(pending[1])
            pending = (tag, job)
        if pending is not None:
            yield pending[0], self._results(pending[1])

    def _results(self, job: List[Future]) -> List[Encoded]:
        """The encodings of one block, in order; one `VerseError` line when a worker died or got stuck."""
        try:
            return [e for future in job for e in future.result(timeout=WORKER_TIMEOUT)]
        except BrokenProcessPool:
            raise VerseError("a tokenizer worker process died (the tokenizer crashed on this data, or the "
                             "system ran out of memory); run with data.num_workers=0 to see the error") from None
        except TimeoutError:
            self._terminate()
            raise VerseError(f"the tokenizer workers returned nothing for {WORKER_TIMEOUT:g} s (a tokenizer regex "
                             "that never ends on this data?); run with data.num_workers=0 to see where") from None

    def _terminate(self) -> None:
        """Kill the workers (a stuck one would never finish its task, and `shutdown` would wait for it)."""
        if hasattr(self.pool, "terminate_workers"):  # Python 3.14+
            self.pool.terminate_workers()
            return
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            process.terminate()

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None and self._finalizer.alive:  # not already stopped at interpreter exit
            self._finalizer.detach()
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None
