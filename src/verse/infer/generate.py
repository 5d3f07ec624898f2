"""Autoregressive generation with the model's static KV cache: one-pass prefill, then one token per step.

Prompts of different lengths are left-padded into one batch: each row's positions restart at 0 after its
padding (`position_ids`) and a boolean mask hides the padding keys, so every row gets exactly the tokens
it would get alone.
"""

import contextlib
import functools
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import torch

from verse.errors import VerseError
from verse.infer.sampling import SamplingParams, check_seed, sample
from verse.infer.stopping import StopStrings
from verse.model.masks import causal_mask


def _padded_batch(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad `prompts` into ids [B, P] (pad id 0) and return the pad length of each row [B]."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in prompts])
    return ids.to(device), pad.to(device)


CACHE_BUCKET = 256  # compiled decoding allocates the cache in multiples of this, so a new length rarely recompiles


@functools.cache
def compiled_forward(cuda_graphs: bool = False) -> Callable:
    """`ReasoningLLM.forward` through `torch.compile`: one graph per model, batch size and cache bucket, in which
    inductor fuses each layer's norms, RoPE, attention and residuals around the GEMMs.

    Args:
        cuda_graphs (bool): replay each compiled step as a CUDA graph (`mode="reduce-overhead"`: one launch per
            token instead of hundreds); the step's shapes must then be static (`decode_steps(static=True)`).
    """
    from verse.model import ReasoningLLM

    return torch.compile(ReasoningLLM.forward, options={"size_asserts": False, "triton.cudagraphs": cuda_graphs})


@torch.inference_mode()
def decode_steps(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams,
                 generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                 compile: bool = False, static: Optional[bool] = None) -> Iterator[torch.Tensor]:
    """Run the model: prefill all prompts in one pass, then decode; yield the next token of every row.

    The caller decides when to stop (closing the iterator frees the KV cache).

    Args:
        model (ReasoningLLM): the model (its `setup_cache` / `input_pos` interface).
        prompts (Sequence[Sequence[int]]): token ids of each prompt (non-empty).
        max_new_tokens (int): most steps.
        params (SamplingParams): how tokens are picked.
        generator (Union[torch.Generator, Sequence[torch.Generator], None]): random source for sampling (one per
            equal block of rows: see `verse.infer.sampling.sample`).
        compile (bool): run the decode step through `torch.compile` (`compiled_forward`): the first call for a
            model, batch size and cache bucket compiles (about a minute on 2 CPU cores, seconds once inductor's
            cache holds it); every later step skips the per-operator overhead of eager PyTorch. The number of
            cached positions attended is the graph's one dynamic size, unless `static`.
        static (Optional[bool]): every decode step attends over the whole KV cache (its bucket), the positions not
            written yet masked out, so the step has the same shapes at every token: one graph, never recompiled,
            which a compiled step on CUDA replays as a CUDA graph. None = on when compiling on CUDA. Greedy tokens
            are those of the default (the masked keys weigh 0).

    Yields:
        torch.Tensor: token ids [B], one per step.
    """
    device = model.embed.weight.device
    ids, pad = _padded_batch(prompts, device)
    B, P = ids.shape
    total = P + max_new_tokens
    if total > model.args.max_seq_len:
        raise VerseError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len ({model.args.max_seq_len}); shorten the prompt or lower max_new_tokens")
    if static is None:
        static = compile and device.type == "cuda"
    if compile or static:
        total = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, model.args.max_seq_len)
    cuda_graphs = compile and static and device.type == "cuda"
    forward = functools.partial(compiled_forward(cuda_graphs), model) if compile else model
    padded = bool(pad.any())
    positions = torch.arange(total, device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        real = (positions[:P] >= pad[:, None]).int()  # padding ids are not "seen"
        seen = torch.zeros(B, model.args.vocab_size, dtype=torch.int, device=device).scatter_add_(1, ids, real) > 0
    # prefill: left-padded rows attend only to their own tokens; a padding query attends to itself
    # (an all-False row would make SDPA return NaN, which would then leak through the cache)
    position_ids, mask, key_valid = None, None, None
    if padded:
        position_ids = (positions[:P] - pad[:, None]).clamp_(min=0)
        key_valid = positions >= pad[:, None]
        mask = causal_mask(positions[:P], P, model.args.sliding_window) & key_valid[:, None, :P]
        mask = (mask | torch.eye(P, dtype=torch.bool, device=device)).unsqueeze(1)
    model.setup_cache(B, total)
    try:
        hidden = model.hidden_states(ids, position_ids, mask, input_pos=positions[:P])
        token = sample(model.head(hidden[:, -1]), params, seen, generator)
        for step in range(max_new_tokens):
            yield token
            if step == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            cur = P + step
            width = total if static else cur + 1  # the whole cache, or its filled positions
            mask = causal_mask(positions[cur:cur + 1], width, model.args.sliding_window)
            if padded:
                position_ids = (cur - pad)[:, None]
                mask = (mask & key_valid[:, None, :width]).unsqueeze(1)
            if compile and not static:  # one graph for every number of cached positions
                torch._dynamo.maybe_mark_dynamic(mask, mask.dim() - 1)
            # the first steps compile what they need (a graph, then `input_pos` offsets made dynamic); later steps
            # change nothing their guards check (shapes, dtypes, the model), so evaluating them is skipped
            skip_guards = compile and step > 2
            if cuda_graphs:  # the last step's outputs (logits) are read already: the graph may overwrite them
                torch.compiler.cudagraph_mark_step_begin()
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guards else contextlib.nullcontext():
                logits = forward(token[:, None], position_ids, mask, input_pos=positions[cur:cur + 1])
            token = sample(logits[:, -1], params, seen, generator)
    finally:
        model.clear_cache()


def _prepare(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, repetition_penalty: float, stop_ids: Optional[Iterable[int]],
             stop_strings: Optional[Sequence[str]], seed: Optional[int]
             ) -> tuple[SamplingParams, set, Optional[StopStrings], Optional[torch.Generator]]:
    """Validate the arguments of `generate` / `stream` and build what the decoding loop needs."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise VerseError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise VerseError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    if stop_ids is None:
        stop_ids = set(getattr(tokenizer, "stop_ids", ()) or ())
    stops = StopStrings(tokenizer, stop_strings) if stop_strings else None
    check_seed(seed)
    generator = None
    if seed is not None:
        generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    return params, set(stop_ids), stops, generator


class Continuation:
    """The new tokens of one generation as they arrive: ends it at a stop id or stop string, and tells which tokens
    are final (a stream must hold back the tokens that could begin a stop string).

    Args:
        stop_ids (set[int]): ids that end the generation (not part of it).
        stops (Optional[StopStrings]): stop strings (cut from the output).
    """

    def __init__(self, stop_ids: set, stops: Optional[StopStrings]):
        self.stop_ids, self.stops = stop_ids, stops
        self.ids: List[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> List[int]:
        """Add the next generated token.

        Args:
            token (int): the token id.

        Returns:
            List[int]: the ids that became final (possibly none); after a stop, the rest of the output.
        """
        if token in self.stop_ids:
            self.stopped = True
            return self.flush()
        self.ids.append(token)
        ready = len(self.ids)
        if self.stops is not None:
            keep = self.stops.find(self.ids)
            if keep is not None:
                del self.ids[keep:]
                self.stopped = True
                return self.flush()
            ready -= self.stops.holdback(self.ids)
        new = self.ids[self.emitted:ready]
        self.emitted = max(self.emitted, ready)
        return new

    def flush(self) -> List[int]:
        """The ids not handed out yet (the generation ends here)."""
        new = self.ids[self.emitted:]
        self.emitted = len(self.ids)
        return new


def generate(model, tokenizer, prompts: List[List[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop_ids: Optional[Iterable[int]] = None, stop_strings: Optional[Sequence[str]] = None,
             seed: Optional[int] = None, compile: bool = False, static: Optional[bool] = None) -> List[List[int]]:
    """Generate continuations of a batch of prompts.

    Args:
        model (ReasoningLLM): the model.
        tokenizer: a Verse tokenizer (for `stop_ids` and stop strings); may be None with neither.
        prompts (List[List[int]]): token ids of each prompt; lengths may differ.
        max_new_tokens (int): most tokens generated per prompt.
        temperature (float): 0 = greedy.
        top_k (int): 0 = off.
        top_p (float): 1 = off.
        repetition_penalty (float): 1 = off.
        stop_ids (Optional[set[int]]): ids that end a row; None = `tokenizer.stop_ids`; empty = never stop.
        stop_strings (Optional[Sequence[str]]): texts that end a row (not included in the output).
        seed (Optional[int]): seed of a private `torch.Generator` for reproducible sampling.
        compile (bool): compile the decode step (see `decode_steps`).
        static (Optional[bool]): decode steps of static shapes over the whole cache (see `decode_steps`).

    Returns:
        List[List[int]]: the new tokens of each prompt, without the stop token.
    """
    params, stop_ids, stops, generator = _prepare(model, tokenizer, prompts, max_new_tokens, temperature, top_k,
                                                  top_p, repetition_penalty, stop_ids, stop_strings, seed)
    outputs: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = decode_steps(model, prompts, max_new_tokens, params, generator, compile, static)
    try:
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token in stop_ids:
                    done[row] = True
                    continue
                outputs[row].append(token)
                if stops is not None and (keep := stops.find(outputs[row])) is not None:
                    del outputs[row][keep:]
                    done[row] = True
            if all(done):
                break
    finally:
        steps.close()
    return outputs


def stream(model, tokenizer, prompt: List[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           stop_ids: Optional[Iterable[int]] = None,
           stop_strings: Optional[Sequence[str]] = None, seed: Optional[int] = None,
           compile: bool = False) -> Iterator[int]:
    """Generate from one prompt, yielding each new token id as soon as it is final.

    Takes the arguments of `generate` for a single prompt and yields exactly the tokens `generate` returns.
    With stop strings, tokens that could begin one are held back until it is clear they do not.

    Yields:
        int: the next token id.
    """
    params, stop_ids, stops, generator = _prepare(model, tokenizer, [prompt], max_new_tokens, temperature, top_k,
                                                  top_p, repetition_penalty, stop_ids, stop_strings, seed)
    continuation = Continuation(stop_ids, stops)
    steps = decode_steps(model, [prompt], max_new_tokens, params, generator, compile)
    try:
        for tokens in steps:
            yield from continuation.push(int(tokens[0]))
            if continuation.stopped:
                break
    finally:
        steps.close()
    yield from continuation.flush()
