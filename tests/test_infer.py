"""Generation: KV cache vs full recompute, batched vs one by one, sampling, stop ids and stop strings."""

import math

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.errors import VerseError
from verse.infer import generate, stream
from verse.infer.sampling import SamplingParams, apply_repetition_penalty, sample, top_k_top_p_filter
from verse.infer.stopping import StopStrings

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9], [300, 301, 302, 303]]


class CharTokenizer:
    """Each id is one distinct character, so text positions are token positions (an obvious oracle)."""

    stop_ids: set = set()

    def decode(self, ids, skip_special=False):
        return "".join(chr(0x4E00 + i) for i in ids)


def tiny_model(**overrides) -> ReasoningLLM:
    torch.manual_seed(0)
    return ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", **overrides)).eval()


@torch.no_grad()
def recompute(model, prompt, n, penalty=1.0):
    """Greedy decoding by running the whole sequence through the model at every step (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].clone()
        for t in set(ids):  # CTRL repetition penalty, written out
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_kv_cache_equals_full_recompute(model):
    for prompt in PROMPTS:
        assert generate(model, None, [prompt], max_new_tokens=12) == [recompute(model, prompt, 12)]
    assert model.cache_len == 0  # the cache is freed afterwards


def test_batched_left_padded_equals_one_by_one(model):
    batched = generate(model, None, PROMPTS, max_new_tokens=12)
    assert batched == [recompute(model, p, 12) for p in PROMPTS]


def test_batched_with_sliding_window_and_repetition_penalty():
    model = tiny_model(sliding_window=4, arch="mistral")
    batched = generate(model, None, PROMPTS, max_new_tokens=10, repetition_penalty=1.5)
    assert batched == [recompute(model, p, 10, penalty=1.5) for p in PROMPTS]


def test_stream_yields_what_generate_returns(model):
    assert list(stream(model, None, PROMPTS[1], max_new_tokens=9)) == recompute(model, PROMPTS[1], 9)


def test_sampling_reproducible_with_seed(model):
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=100, top_p=0.95, seed=1234)
    first = generate(model, None, PROMPTS, **kwargs)
    assert generate(model, None, PROMPTS, **kwargs) == first
    assert list(stream(model, None, PROMPTS[0], **kwargs)) == generate(model, None, PROMPTS[:1], **kwargs)[0]
    assert generate(model, None, PROMPTS, **{**kwargs, "seed": 4321}) != first
    # top_k=1 leaves only the argmax: sampling must then equal greedy
    assert generate(model, None, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == \
        [recompute(model, p, 8) for p in PROMPTS]


def test_stop_ids_end_each_row_and_are_excluded(model):
    free = [recompute(model, p, 12) for p in PROMPTS]
    stop = free[0][4]
    expected = [f[:f.index(stop)] if stop in f else f for f in free]
    assert generate(model, None, PROMPTS, max_new_tokens=12, stop_ids={stop}) == expected
    assert list(stream(model, None, PROMPTS[0], max_new_tokens=12, stop_ids={stop})) == expected[0]


def test_stop_strings(model):
    tok = CharTokenizer()
    free = recompute(model, PROMPTS[1], 12)
    text = tok.decode(free)
    for stop in (text[3:5], text[7], text[10:12] + "x"):  # two present, one absent (never completes)
        cut = text.find(stop)
        expected = free if cut < 0 else free[:cut]
        assert generate(model, tok, [PROMPTS[1]], max_new_tokens=12, stop_strings=[stop]) == [expected]
        assert list(stream(model, tok, PROMPTS[1], max_new_tokens=12, stop_strings=["zz", stop])) == expected


def test_stop_strings_across_tokens_with_multichar_tokens():
    class Words:
        words = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!"}

        def decode(self, ids, skip_special=False):
            return "".join(self.words[i] for i in ids)

    stops = StopStrings(Words(), ["o wo"])
    assert stops.find([1, 2]) is None
    assert stops.holdback([1, 2]) == 1  # "lo" ends with "o", a prefix of the stop string
    assert stops.find([1, 2, 3]) == 1  # "Hello wor": "lo" straddles the start of "o wo", keep "Hel"
    assert StopStrings(Words(), ["xyz"]).holdback([1, 2, 3]) == 0


def test_top_k_top_p_filter_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(top_k_top_p_filter(probs.log(), top_p=0.8)) == [True, True, False, False]
    assert kept(top_k_top_p_filter(probs.log(), top_p=0.81)) == [True, True, True, False]
    assert kept(top_k_top_p_filter(probs.log(), top_p=0.1)) == [True, False, False, False]
    assert kept(top_k_top_p_filter(probs[:, [2, 0, 3, 1]].log(), top_k=2)) == [False, True, False, True]


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 3.0]]


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits.clone(), SamplingParams(temperature=2.0), generator=gen)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = torch.tensor([math.exp(x / 2.0) for x in (1.0, 0.0, -1.0, 2.0)])
    assert torch.allclose(freq, expected / expected.sum(), atol=0.015)


def test_bad_arguments_raise_verse_errors(model):
    with pytest.raises(VerseError, match="max_seq_len"):
        generate(model, None, [[1] * 250], max_new_tokens=10)
    with pytest.raises(VerseError, match="top_p"):
        generate(model, None, [[1]], top_p=0.0)
    with pytest.raises(VerseError, match="at least one token"):
        generate(model, None, [[]])


def test_bench_generate_runs_and_matches_transformers(tmp_path, capsys):
    import json

    import verse
    from verse.cli import main

    pytest.importorskip("transformers")
    tok = verse.load_tokenizer("byte")
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.head.weight.mul_(20)  # no near-ties between the two implementations
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert main(["bench", "generate", "--model", str(tmp_path), "--dtype", "float32", "--new-tokens", "6",
                 "--batch", "1", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report["results"]] == ["verse", "transformers"]
    assert report["greedy_tokens_identical"] == 6  # same greedy tokens as transformers' generate
    n_params = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()  # untied: embed not read
    assert report["weight_bytes_per_token"] == 4 * n_params
    assert report["decode_speedup_vs_transformers"] > 0 and report["verse_fraction_of_bandwidth_limit"] > 0
    # continuous batching: every sequence decodes the batch-1 greedy tokens
    assert [(b["sequences"], b["new_tokens"], b["greedy_tokens_identical"]) for b in report["batched"]] == [
        (1, 6, 6), (3, 6, 6)]
    assert all(b["tok_s"] > 0 for b in report["batched"])


@pytest.mark.slow
def test_bench_generate_static_row(tmp_path, capsys):
    """`verse bench generate --verse float32+static`: the compiled static-cache row runs beside the eager one and
    decodes transformers' greedy tokens."""
    import json

    import verse
    from verse.bench.generate import parse_row
    from verse.cli import main

    pytest.importorskip("transformers")
    assert parse_row("bfloat16+static", torch.float32) == {"weights": "dense", "dtype": torch.bfloat16,
                                                           "compile": True, "static": True}
    tok = verse.load_tokenizer("byte")
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size, n_layers=2))
    with torch.no_grad():
        model.head.weight.mul_(20)  # no near-ties between the two implementations
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert main(["bench", "generate", "--model", str(tmp_path), "--dtype", "float32", "--new-tokens", "6",
                 "--verse", "float32", "float32+static", "--rounds", "1", "--batch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r.get("row"): r for r in report["results"]}
    assert (rows["float32+static"]["compiled"], rows["float32+static"]["static"]) == (True, True)
    assert rows["float32+static"]["greedy_tokens_identical"] == rows["float32"]["greedy_tokens_identical"] == 6


def test_static_decode_equals_full_recompute():
    """Static-shape decode steps (attention over the whole cache bucket, unwritten positions masked: the shapes CUDA
    graphs replay) give the recompute oracle's greedy tokens, one prompt and a left-padded batch, sliding window too."""
    model = tiny_model(n_layers=2, sliding_window=5, arch="mistral")
    one, batch = [PROMPTS[1]], PROMPTS[:2]
    assert generate(model, None, one, max_new_tokens=10, static=True) == [recompute(model, one[0], 10)]
    assert generate(model, None, batch, max_new_tokens=8, static=True) == [recompute(model, p, 8) for p in batch]


@pytest.mark.slow
def test_compiled_static_decode_equals_full_recompute():
    """The compiled static-shape decode step (what CUDA compiles by default, there replayed as a CUDA graph), run on
    CPU: the recompute oracle's greedy tokens, and one graph serves every step (no recompile as the cache fills)."""
    import torch._dynamo.utils as dynamo_utils

    model = tiny_model(n_layers=2, sliding_window=5, arch="mistral")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    assert generate(model, None, [PROMPTS[1]], max_new_tokens=12, compile=True, static=True) == [
        recompute(model, PROMPTS[1], 12)]
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    assert generate(model, None, PROMPTS[:2], max_new_tokens=8, compile=True, static=True) == [
        recompute(model, p, 8) for p in PROMPTS[:2]]


def test_compiled_decode_equals_full_recompute():
    """The torch.compile'd decode step (whole cache bucket, dynamic attention width) gives the recompute oracle's
    greedy tokens, for one prompt and for a left-padded batch, and a second call reuses the compiled graph."""
    model = tiny_model(n_layers=2, sliding_window=5, arch="mistral")  # window: the mask is built inside the graph
    one, batch = [PROMPTS[1]], PROMPTS[:2]
    assert generate(model, None, one, max_new_tokens=10, compile=True) == [recompute(model, one[0], 10)]
    assert generate(model, None, one, max_new_tokens=6, compile=True) == [recompute(model, one[0], 6)]
    assert generate(model, None, batch, max_new_tokens=8, compile=True) == [recompute(model, p, 8) for p in batch]
