"""Continuous batching (`verse.infer.engine`): every request gets exactly what one-at-a-time generation gives it."""

import pytest
import torch

import verse
from verse import ModelArgs, ReasoningLLM
from verse.errors import VerseError
from verse.infer.engine import Engine, Request
from verse.infer.generate import stream
from verse.infer.sampling import SamplingParams

PROMPTS = ["Hello", "The quick brown fox jumps over", "a", "Once upon a time there was a", "xyz 123", "Why?"]


@pytest.fixture(scope="module")
def tok():
    return verse.load_tokenizer("byte")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size)).eval()


def alone(model, tok, prompt, max_tokens, seed=None, stop_strings=None, **params):
    """What `verse generate` decodes for this request by itself (`generate.stream`, batch 1)."""
    return list(stream(model, tok, tok.encode(prompt), max_new_tokens=max_tokens, seed=seed,
                       stop_strings=stop_strings, **params))


def test_requests_joining_at_different_steps_match_one_at_a_time(model, tok):
    """Six prompts of different lengths (greedy and seeded sampling, different budgets) arrive at different steps
    into three slots: each output equals its batch-1 generation token for token."""
    specs = [dict(max_tokens=12), dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=3), dict(max_tokens=1),
             dict(max_tokens=14, temperature=1.2, top_k=20, seed=7), dict(max_tokens=8, repetition_penalty=1.3),
             dict(max_tokens=10, temperature=0.7, seed=11, repetition_penalty=1.2)]
    expected = [alone(model, tok, p, **s) for p, s in zip(PROMPTS, specs)]
    engine = Engine(model, tok, slots=3, max_len=64)
    requests = []
    for prompt, spec in zip(PROMPTS, specs):
        spec = dict(spec)
        max_tokens, seed = spec.pop("max_tokens"), spec.pop("seed", None)
        requests.append(Request(tok.encode(prompt), max_tokens, SamplingParams(**spec), seed))
    arrivals = {0: [0], 2: [1], 3: [2, 3], 5: [4, 5]}  # step -> requests submitted before it
    for step in range(200):
        for i in arrivals.get(step, []):
            engine.submit(requests[i])
        busy = engine.step()
        assert len(engine.running) <= 3
        if not busy and step >= max(arrivals):
            break
    for request, want in zip(requests, expected):
        assert request.output == want
        assert request.finish_reason == ("length" if len(want) == request.max_tokens else "stop")
    assert engine.free_slots == 3


@pytest.mark.parametrize("budget", [4096, 40])
def test_requests_admitted_together_are_prefilled_together(model, tok, monkeypatch, budget):
    """Six prompts of different lengths (greedy, seeded, repetition penalty) submitted at once are prefilled in one
    right-padded forward (in groups of at most `budget` padded tokens), and each decodes exactly its batch-1
    tokens."""
    import verse.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", budget)
    specs = [dict(max_tokens=9), dict(max_tokens=8, temperature=0.9, top_p=0.9, seed=3), dict(max_tokens=1),
             dict(max_tokens=9, temperature=1.2, top_k=20, seed=7), dict(max_tokens=8, repetition_penalty=1.3),
             dict(max_tokens=7, temperature=0.7, seed=11, repetition_penalty=1.2)]
    expected = [alone(model, tok, p, **s) for p, s in zip(PROMPTS, specs)]
    groups = []
    prefill = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, group: groups.append([len(r.prompt) for r in group]) or
                        prefill(self, group))
    engine = Engine(model, tok, slots=6, max_len=64)
    requests = []
    for prompt, spec in zip(PROMPTS, specs):
        spec = dict(spec)
        max_tokens, seed = spec.pop("max_tokens"), spec.pop("seed", None)
        requests.append(engine.submit(Request(tok.encode(prompt), max_tokens, SamplingParams(**spec), seed)))
    engine.step()
    lengths = [len(tok.encode(p)) for p in PROMPTS]
    assert [n for group in groups for n in group] == lengths  # all admitted at the first step, in order
    if budget >= len(PROMPTS) * max(lengths):
        assert len(groups) == 1
    else:  # several groups, each within the budget unless it is a single prompt
        assert len(groups) > 1 and all(len(g) == 1 or len(g) * max(g) <= budget for g in groups)
    while engine.step():
        pass
    assert [r.output for r in requests] == expected
    assert engine.free_slots == 6


def test_stop_strings_and_updates(model, tok):
    """A stop string taken from the greedy continuation ends it there, as in `generate.stream`; `on_update`
    hands out exactly the final ids, in order."""
    full = tok.decode(alone(model, tok, PROMPTS[1], 30))
    stop = full[8:10]
    want = alone(model, tok, PROMPTS[1], 30, stop_strings=[stop])
    assert len(want) < 30 and tok.decode(want) == full[:full.index(stop)]
    engine = Engine(model, tok, slots=2, max_len=64)
    seen = []
    other = engine.submit(Request(tok.encode(PROMPTS[0]), 25))
    request = engine.submit(Request(tok.encode(PROMPTS[1]), 30, stop_strings=[stop],
                                    on_update=lambda r, ids: seen.append((list(ids), r.finish_reason))))
    while engine.step():
        pass
    assert request.output == want and request.finish_reason == "stop" and request.done.is_set()
    assert [i for ids, _ in seen for i in ids] == want and seen[-1][1] == "stop"
    assert other.output == alone(model, tok, PROMPTS[0], 25)


def test_cancel_frees_the_slot_and_the_others_go_on(model, tok):
    engine = Engine(model, tok, slots=2, max_len=64)
    keep = engine.submit(Request(tok.encode(PROMPTS[3]), 20))
    gone = engine.submit(Request(tok.encode(PROMPTS[1]), 20))
    engine.step()
    engine.step()
    engine.cancel(gone)
    late = engine.submit(Request(tok.encode(PROMPTS[5]), 10))  # takes the freed slot
    while engine.step():
        assert len(engine.running) <= 2
    assert gone.finish_reason == "cancelled" and len(gone.output) < 20
    assert keep.output == alone(model, tok, PROMPTS[3], 20)
    assert late.output == alone(model, tok, PROMPTS[5], 10)
    assert engine.free_slots == 2


def test_a_request_past_the_context_is_refused(model, tok):
    engine = Engine(model, tok, slots=1, max_len=16)
    with pytest.raises(VerseError, match="exceeds the context of 16 tokens"):
        engine.submit(Request(tok.encode("x" * 10), 7))
    with pytest.raises(VerseError, match="empty"):
        engine.submit(Request([], 4))
    with pytest.raises(VerseError, match="seed"):
        engine.submit(Request([1], 4, seed=-1))
    assert not engine.waiting


def test_engine_thread_answers_concurrent_submits(model, tok):
    engine = Engine(model, tok, slots=4, max_len=64).start()
    try:
        requests = [engine.submit(Request(tok.encode(p), 8)) for p in PROMPTS]
        for request in requests:
            assert request.done.wait(60)
    finally:
        engine.stop()
    assert [r.output for r in requests] == [alone(model, tok, p, 8) for p in PROMPTS]


def test_auto_slots_fill_half_the_free_memory_with_kv_cache(model, monkeypatch):
    """`slots="auto"`: rows of KV cache (keys and values of every layer, float32 here) plus one step's float32
    logits and probabilities, counted by hand, into half the free memory; the cache allocated is that size."""
    import verse.infer.engine as engine_module

    args, max_len = model.args, 48
    cache_row = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4 * max_len  # k and v, float32
    per_slot = cache_row + 2 * 4 * args.vocab_size
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 2 * 5 * per_slot + 7)
    engine = Engine(model, None, slots="auto", max_len=max_len)
    assert engine.slots == engine_module.auto_slots(model, max_len, 2 * 5 * per_slot + 7) == 5
    caches = [layer.attn.cache for layer in model.layers]
    assert sum(c.k.nbytes + c.v.nbytes for c in caches) == 5 * cache_row
    assert engine_module.auto_slots(model, max_len, 10**15) == engine_module.AUTO_SLOTS_MAX
    with pytest.raises(VerseError, match="lower --max-len"):
        engine_module.auto_slots(model, max_len, per_slot)  # half of it is not one slot
    with pytest.raises(VerseError, match="at least 1 slot"):
        Engine(model, None, slots=0, max_len=max_len)
    model.clear_cache()
