"""Continuous batching: many generations share one batched decode step, joining and leaving at step boundaries.

The KV cache has a fixed number of slots (rows), one per running sequence. New requests are prefilled into free
slots, those admitted at the same step together in one forward (prompts right-padded, each row at its own
positions, up to `PREFILL_TOKENS` padded tokens a forward), then each decodes with all the others in one forward per step,
each row at its own position (`input_pos` [B, 1]: per-row cache writes, RoPE positions and causal masks). Running
sequences always fill rows 0 .. n-1: when one finishes, the last row's cache moves into its place, so a step
attends over a contiguous view of the cache and never gathers rows. Every request has its own sampling
parameters, seed (a private `torch.Generator`, drawn from in the same order as `verse generate --seed`), token
budget and stop strings, so its output is the one `verse generate` gives for it alone.

The engine runs in one thread (`start`); any thread may `submit` and `cancel`. `step` drives it by hand. It owns
the model's KV cache (`setup_cache`) until `stop`: `generate` on the same model meanwhile would replace it.
"""

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Iterator, List, Optional, Sequence

import torch

from verse.errors import VerseError
from verse.infer.generate import Continuation
from verse.infer.sampling import SamplingParams, check_seed, sample
from verse.infer.stopping import StopStrings

log = logging.getLogger(__name__)
GREEDY = SamplingParams()
AUTO_SLOTS_MEMORY_FRACTION = 0.5  # `slots="auto"` gives the KV cache at most this part of the free memory
AUTO_SLOTS_MAX = 64  # ... and at most this many slots (wider decode steps add little throughput on a CPU)
PREFILL_TOKENS = 4096  # most (padded) prompt tokens prefilled in one forward: several short prompts share one


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory, or the host's available RAM (psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def auto_slots(model, max_len: int, free_bytes: Optional[int] = None) -> int:
    """How many slots of `max_len` positions the engine gets with `slots="auto"`: as many rows of KV cache (and
    one step's logits, `verse.model.mla.generation_bytes_per_row`) as fit in `AUTO_SLOTS_MEMORY_FRACTION` of the
    free memory, between 1 and `AUTO_SLOTS_MAX`.

    Args:
        model (ReasoningLLM): the model (its configuration and weights' device and dtype).
        max_len (int): positions per slot.
        free_bytes (Optional[int]): free memory; default `free_memory` of the model's device.

    Returns:
        int: the number of slots.

    Raises:
        VerseError: not even one slot fits.
    """
    from verse.model.mla import generation_bytes_per_row

    device = model.embed.weight.device
    free = free_memory(device) if free_bytes is None else free_bytes
    per_slot = generation_bytes_per_row(model.args, max_len, model.embed.weight.dtype)
    slots = int(free * AUTO_SLOTS_MEMORY_FRACTION) // per_slot
    if slots < 1:
        raise VerseError(f"one sequence of {max_len} tokens needs {per_slot / 2**30:.2f} GiB of KV cache and "
                         f"{free / 2**30:.2f} GiB is free on {device}; lower --max-len or pass --slots N")
    return min(slots, AUTO_SLOTS_MAX)


@dataclass(eq=False)
class Request:
    """One generation handed to an `Engine`.

    Args:
        prompt (List[int]): prompt token ids (non-empty).
        max_tokens (int): most new tokens.
        params (SamplingParams): temperature, top-k, top-p, repetition penalty.
        seed (Optional[int]): seed of the request's own random source (sampling only).
        stop_strings (Sequence[str]): texts that end the generation (cut from the output).
        on_update (Optional[Callable]): called from the engine thread as `on_update(request, new_ids)` whenever
            ids become final, and once more when the request finishes (`finish_reason` set); it must not block.

    Attributes:
        output (List[int]): the final ids so far.
        finish_reason (Optional[str]): "stop" (stop id or string), "length" (max_tokens), "cancelled" or "error".
        error (Optional[str]): what went wrong, with finish_reason "error".
        done (threading.Event): set when the request has finished.
    """

    prompt: List[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: Optional[int] = None
    stop_strings: Sequence[str] = ()
    on_update: Optional[Callable[["Request", List[int]], None]] = None
    output: List[int] = field(default_factory=list, init=False)
    finish_reason: Optional[str] = field(default=None, init=False)
    error: Optional[str] = field(default=None, init=False)
    done: threading.Event = field(default_factory=threading.Event, init=False)
    cancelled: bool = field(default=False, init=False)

    def _deliver(self, ids: List[int], finish_reason: Optional[str] = None, error: Optional[str] = None) -> None:
        self.output.extend(ids)
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
        if self.on_update is not None and (ids or finish_reason is not None):
            try:
                self.on_update(self, ids)
            except Exception:  # a consumer's failure must not stop the other requests
                log.exception("on_update of a request failed")
        if finish_reason is not None:
            self.done.set()


@dataclass(eq=False)
class _Sequence:
    """A running request: its decoding state."""

    request: Request
    continuation: Continuation
    generator: Optional[torch.Generator]
    seen: Optional[torch.Tensor]  # bool [1, V] for the repetition penalty
    length: int  # positions in the cache (the prompt and the tokens fed back so far)
    new_tokens: int = 0

    @property
    def batched(self) -> bool:
        """Whether the shared greedy pick of the batch is this row's pick."""
        params = self.request.params
        return params.greedy and params.repetition_penalty == 1.0


class Engine:
    """Continuous-batching generation over a slot-based static KV cache.

    Args:
        model (ReasoningLLM): the model (eval mode).
        tokenizer: a Verse tokenizer (stop ids, stop strings); may be None with neither.
        slots (int | str): most sequences decoded at once (rows of the KV cache); "auto" sizes them from the free
            memory (`auto_slots`).
        max_len (Optional[int]): positions per slot (prompt + new tokens); default the model's `max_seq_len`.
        stop_ids (Optional[set[int]]): ids that end a generation; default `tokenizer.stop_ids`.
    """

    def __init__(self, model, tokenizer, slots: int | str = 8, max_len: Optional[int] = None,
                 stop_ids: Optional[set] = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        if self.max_len < 2:
            raise VerseError(f"max_len must be >= 2 positions, got {self.max_len}")
        self.slots = auto_slots(model, self.max_len) if slots == "auto" else slots
        if not isinstance(self.slots, int) or self.slots < 1:
            raise VerseError(f"the engine needs at least 1 slot (or 'auto'), got {slots!r}")
        self.stop_ids = set(getattr(tokenizer, "stop_ids", ()) or ()) if stop_ids is None else set(stop_ids)
        self.device = model.embed.weight.device
        model.setup_cache(self.slots, self.max_len)
        self.last = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # each row's newest token
        self.running: List[_Sequence] = []  # row i of the cache is running[i]
        self.waiting: Deque[Request] = deque()
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.stopping = False

    @property
    def free_slots(self) -> int:
        """Slots not held by a running sequence."""
        return self.slots - len(self.running)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise `VerseError` unless a prompt of `prompt_tokens` plus `max_tokens` new tokens fits a slot."""
        if prompt_tokens < 1:
            raise VerseError("the prompt is empty: it needs at least one token")
        if max_tokens < 1:
            raise VerseError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_tokens + max_tokens > self.max_len:
            raise VerseError(f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"of {self.max_len} tokens; shorten the prompt or lower max_tokens")

    def submit(self, request: Request) -> Request:
        """Queue `request`; it joins the running batch at the next step boundary with a free slot.

        Raises:
            VerseError: the request is invalid (empty prompt, too long for the context, bad seed).
        """
        self.check(len(request.prompt), request.max_tokens)
        check_seed(request.seed)
        if request.stop_strings and self.tokenizer is None:
            raise VerseError("stop strings need a tokenizer to decode the generated text")
        with self.cond:
            self.waiting.append(request)
            self.cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` (e.g. its client went away): its slot is freed at the next step boundary."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def stream(self, request: Request) -> Iterator[List[int]]:
        """Submit `request` and yield its ids as they become final, for a thread other than the engine's (which
        must be running); closing the iterator early cancels the request.

        Raises:
            VerseError: the request is invalid, or the engine failed while decoding it.
        """
        updates: queue.Queue = queue.Queue()
        request.on_update = lambda r, ids: updates.put((list(ids), r.finish_reason))
        self.submit(request)
        try:
            while True:
                ids, finish = updates.get()
                if ids:
                    yield ids
                if finish == "error":
                    raise VerseError(request.error or "generation failed")
                if finish is not None:
                    return
        finally:
            if not request.done.is_set():
                self.cancel(request)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free slots (prefilling each), then decode one token for every running row.

        Returns:
            bool: whether requests remain (running or waiting).
        """
        with self.cond:
            admitted = []
            while self.waiting and len(self.running) + len(admitted) < self.slots:
                request = self.waiting.popleft()
                if request.cancelled:
                    request._deliver([], "cancelled")
                else:
                    admitted.append(request)
        self._drop([row for row, seq in enumerate(self.running) if seq.request.cancelled], "cancelled")
        group: List[Request] = []
        for request in admitted:  # consecutive groups, each within the token budget of one forward
            if group and (len(group) + 1) * max(len(r.prompt) for r in [*group, request]) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(request)
        if group:
            self._prefill(group)
        if self.running:
            self._decode()
        with self.cond:
            return bool(self.running or self.waiting)

    def _prefill(self, requests: List[Request]) -> None:
        """Run the prompts into the next free rows in one forward and pick each first token (as
        `generate.decode_steps` does).

        Prompts are right-padded: every row sits at positions 0.., so a prompt's tokens see only its own (causal
        mask per row); the padding's keys land in the cache past the prompt, where decoding overwrites them before
        any query reaches them."""
        first, n = len(self.running), len(requests)
        lengths = torch.tensor([len(r.prompt) for r in requests], device=self.device)
        ids = torch.zeros(n, int(lengths.max()), dtype=torch.long, device=self.device)
        for row, request in enumerate(requests):
            ids[row, :len(request.prompt)] = torch.as_tensor(request.prompt, dtype=torch.long)
        positions = torch.arange(ids.size(1), device=self.device).expand(n, -1)
        layers = self.model.layers
        caches = [layer.attn.cache for layer in layers]
        try:
            for layer, cache in zip(layers, caches):  # the prompts' keys and values go straight into their rows
                layer.attn.cache = cache.rows(first, n)
            hidden = self.model.hidden_states(ids, input_pos=positions)
        finally:
            for layer, cache in zip(layers, caches):
                layer.attn.cache = cache
        logits = self.model.head(hidden[torch.arange(n, device=self.device), lengths - 1])
        picks = []
        for row, request in enumerate(requests):
            generator = None if request.seed is None else torch.Generator(self.device).manual_seed(request.seed)
            seen = None
            if request.params.repetition_penalty != 1.0:
                seen = torch.zeros(1, self.model.args.vocab_size, dtype=torch.bool, device=self.device)
                seen[0, ids[row, :len(request.prompt)]] = True
            stops = StopStrings(self.tokenizer, request.stop_strings) if request.stop_strings else None
            self.running.append(_Sequence(request, Continuation(self.stop_ids, stops), generator, seen,
                                          len(request.prompt)))
            picks.append(sample(logits[row:row + 1], request.params, seen, generator))
        self.last[first:first + n] = torch.cat(picks)
        self._advance(picks)

    def _decode(self) -> None:
        """One forward for all running rows, each at its own position, and the next token of each."""
        n = len(self.running)
        pos = torch.tensor([seq.length for seq in self.running], device=self.device)[:, None]
        logits = self.model(self.last[:n, None], input_pos=pos)[:, -1]  # per-row RoPE positions and causal masks
        for seq in self.running:
            seq.length += 1
        tokens = sample(logits, GREEDY)  # every plain greedy row at once; the others pick with their own source
        picks = [tokens[None, row] if seq.batched else
                 sample(logits[row:row + 1], seq.request.params, seq.seen, seq.generator)
                 for row, seq in enumerate(self.running)]
        self.last[:n] = torch.cat(picks)
        self._advance(picks)

    def _advance(self, picks: List[torch.Tensor]) -> None:
        """Hand each running row's new token (the last `len(picks)` rows) to its request; retire finished rows."""
        first = len(self.running) - len(picks)
        finished = []
        for row, token in enumerate(torch.cat(picks).tolist(), start=first):
            seq = self.running[row]
            if seq.seen is not None:
                seq.seen[0, token] = True
            seq.new_tokens += 1
            new = seq.continuation.push(token)
            if seq.continuation.stopped or seq.new_tokens == seq.request.max_tokens:
                finished.append(row)
                new += seq.continuation.flush()
                seq.request._deliver(new, "stop" if seq.continuation.stopped else "length")
            elif new:
                seq.request._deliver(new)
        self._drop(finished)

    def _drop(self, rows: List[int], reason: Optional[str] = None) -> None:
        """Free the slots of `rows`; the last running row moves into each freed one. `reason` finishes them."""
        for row in sorted(rows, reverse=True):  # rows above `row` are already gone, so the last row is running
            seq = self.running[row]
            if reason is not None:
                seq.request._deliver([], reason)
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                for layer in self.model.layers:
                    layer.attn.cache.copy_row(last, row, moved.length)
                self.last[row] = self.last[last]
                self.running[row] = moved
            self.running.pop()

    def run(self) -> None:
        """Step until `stop`, sleeping while there is nothing to do; a failing step ends its requests with an
        error instead of the engine."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self.waiting or self.running)
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as e:  # the model failed (e.g. out of memory): every request in flight ends with it
                log.exception("engine step failed")
                message = str(e) if isinstance(e, VerseError) else f"generation failed: {type(e).__name__}"
                with self.cond:
                    waiting, self.waiting = list(self.waiting), deque()
                for request in [seq.request for seq in self.running] + waiting:
                    if not request.done.is_set():
                        request._deliver([], "error", message)
                self.running.clear()

    def start(self) -> "Engine":
        """Run the engine in a daemon thread."""
        self.thread = threading.Thread(target=self.run, name="verse-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the engine thread (requests in flight are left unfinished) and free the KV cache."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        self.model.clear_cache()
