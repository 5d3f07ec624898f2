"""Data pipeline: every schema through the real `datasets` streaming path, masks, packing, mixing, resume.

Fixtures are written to tmp_path in the exact Hub schemas (OpenThoughts-114k, OpenCodeReasoning split_0,
ultrachat_200k train_sft). Oracles are the hand-written expected texts, the tokenizer's own encode, and
plain per-example model forwards.
"""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import verse
from verse.data import DataConfig, build_loader
from verse.data.formats import think_from_openthoughts
from verse.errors import ConfigError, VerseError
from verse.model.masks import document_mask


@pytest.fixture(scope="module")
def tok():
    return verse.load_tokenizer("byte")


def openthoughts_record(i):
    return {"system": f"Think step by step {i}.",
            "conversations": [
                {"from": "user", "value": f"What is {i} + {i}?"},
                {"from": "assistant",
                 "value": f"<|begin_of_thought|>\n\nAdd {i} to itself.\n\n<|end_of_thought|>\n\n"
                          f"<|begin_of_solution|>\n\nThe answer is {2 * i}.\n\n<|end_of_solution|>"}]}


def openthoughts_answer(i):  # the normalised assistant content, written out by hand
    return f"<think>\nAdd {i} to itself.\n</think>\n\nThe answer is {2 * i}."


def ultrachat_record(i, turns=2):
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"question {i}.{t}"},
                     {"role": "assistant", "content": f"reply {i}.{t}"}]
    return {"prompt": f"question {i}.0", "prompt_id": f"id{i}", "messages": messages}


def ocr_record(i):
    return {"id": f"p{i}", "input": f"Print {i}.",
            "output": f"<think>\nJust print.\n</think>\n```python\nprint({i})\n```",
            "source": "codeforces", "license": "cc-by-4.0", "dataset": "code_contests", "split": "train",
            "difficulty": "1", "solution": f"print({i})"}


def write_jsonl(path, records, extra_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in extra_lines:
            f.write(line + b"\n")
    return str(path)


def cfg(sources, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 4)
    return DataConfig.from_dict({"sources": sources, **kw})


def documents(batch):
    """Split each row of a batch into (input_ids, labels) per document, using position_ids resets."""
    docs = []
    for b in range(batch["input_ids"].size(0)):
        starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist() + [batch["input_ids"].size(1)]
        for s, e in zip(starts[:-1], starts[1:]):
            docs.append((batch["input_ids"][b, s:e], batch["labels"][b, s:e]))
    return docs


def trained_text(tok, labels):
    return tok.decode([t for t in labels.tolist() if t != -100])


def all_batches(loader):
    return [dict(b) for b in loader]


def test_openthoughts_thought_markers_become_think():
    assert think_from_openthoughts(openthoughts_record(3)["conversations"][1]["value"]) == openthoughts_answer(3)
    assert think_from_openthoughts("no markers") == "no markers"


@pytest.mark.parametrize("tokenizer", ["byte", "smollm2", "o200k"])
def test_openthoughts_masks_are_exactly_the_assistant_text(tmp_path, tokenizer):
    from verse.assets import smollm2_gguf

    tok = verse.load_tokenizer(str(smollm2_gguf()) if tokenizer == "smollm2" else tokenizer)
    path = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(12)])
    loader = build_loader(cfg([{"path": path, "schema": "openthoughts"}], cycle=False), tok, max_seq_len=512,
                          micro_batch_size=2, seed=0)
    docs = [d for batch in loader for d in documents(batch)]
    expected = {openthoughts_answer(i) + "<|im_end|>" for i in range(12)}
    got = {trained_text(tok, labels) for ids, labels in docs if (labels != -100).any()}
    assert got == expected
    for ids, labels in docs:  # nothing of the system or user text carries loss
        text = trained_text(tok, labels)
        assert "Think step by step" not in text and "What is" not in text


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_ultrachat_multi_turn_train_on(tmp_path, tok, train_on):
    path = tmp_path / "uc.json"  # a JSON array file goes through datasets' json builder
    path.write_text(json.dumps([ultrachat_record(i, turns=3) for i in range(6)]))
    loader = build_loader(cfg([{"path": str(path)}], cycle=False, pack=False, train_on=train_on), tok,
                          max_seq_len=512, micro_batch_size=3, seed=1)
    got = set()
    for batch in loader:
        assert "position_ids" not in batch
        got |= {trained_text(tok, labels) for labels in batch["labels"]}
    turns = range(3) if train_on == "all_assistant" else [2]
    assert got == {"".join(f"reply {i}.{t}<|im_end|>" for t in turns) for i in range(6)}


def test_labels_are_shifted_next_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "uc.jsonl", [ultrachat_record(i, turns=1) for i in range(3)])
    batch = next(iter(build_loader(cfg([{"path": path}], cycle=False, pack=False, shuffle_buffer=1), tok,
                                   max_seq_len=128, micro_batch_size=1, seed=0)))
    enc = tok.encode_chat(ultrachat_record(0, turns=1)["messages"])
    n = len(enc.input_ids)
    assert batch["input_ids"][0, :n].tolist() == enc.input_ids
    want = [enc.input_ids[t + 1] if enc.loss_mask[t + 1] else -100 for t in range(n - 1)] + [-100]
    assert batch["labels"][0, :n].tolist() == want
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == tok.pad_id).all()


def test_opencodereasoning_parquet_and_broken_records(tmp_path, tok):
    records = [ocr_record(i) for i in range(8)]
    records += [{**ocr_record(8), "input": "-"},  # split_1 style: problem not included
                {**ocr_record(9), "output": None, "solution": None}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "ocr.parquet")
    loader = build_loader(cfg([{"path": str(tmp_path / "ocr.parquet"), "schema": "opencodereasoning"}], cycle=False),
                          tok, max_seq_len=256, micro_batch_size=4, seed=0)
    got = set(_texts(loader, tok))
    assert got == {f"<think>\nJust print.\n</think>\n```python\nprint({i})\n```<|im_end|>" for i in range(8)}
    assert loader.bad_by_reason == {"missing_field": 2}


def test_broken_records_are_skipped_and_counted(tmp_path, tok, caplog):
    good = [ultrachat_record(i, turns=1) for i in range(5)]
    broken = [
        {"prompt": "x"},  # missing_field
        {"messages": "not a list"},  # wrong_type
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},  # wrong_type
        {"messages": []},  # empty
        {"messages": [{"role": "user", "content": "q"}]},  # not_ending_with_assistant
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "q2"}]},  # not_ending_with_assistant
    ]
    extra = [b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1 byte: non_utf8
             b'{"messages": [', b"[1, 2]",  # bad_json, wrong_type
             json.dumps({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "x" * (10 << 20)}]}).encode()]  # too_large
    path = write_jsonl(tmp_path / "mixed.jsonl", good + broken, extra)
    with caplog.at_level("WARNING", logger="verse.data"):
        loader = build_loader(cfg([{"path": path, "schema": "ultrachat"}], cycle=False), tok, max_seq_len=128,
                              micro_batch_size=2, seed=0)
        texts = set(_texts(loader, tok))
    assert texts == {f"reply {i}.0<|im_end|>" for i in range(5)}
    assert loader.bad_by_reason == {"missing_field": 1, "wrong_type": 3, "empty": 1, "not_ending_with_assistant": 2,
                                    "non_utf8": 1, "bad_json": 1, "too_large": 1}
    assert f"{path}:6" in caplog.text  # the first reports name file and line (line 6 = first broken record)


def test_text_schema_trains_on_every_token(tmp_path, tok):
    (tmp_path / "corpus.txt").write_text("first document\nstill first\n\nsecond document\n\n\nthird\n")
    loader = build_loader(cfg([{"path": str(tmp_path / "corpus.txt")}], cycle=False, shuffle_buffer=1), tok,
                          max_seq_len=64, micro_batch_size=1, seed=0)
    docs = [d for batch in loader for d in documents(batch) if (d[1] != -100).any()]
    # each paragraph is text + eos (bos first only for tokenizers whose add_bos says so); every token after
    # the first is a target
    bos, eos = tok.decode([tok.bos_id]) if tok.add_bos else "", tok.decode([tok.eos_id])
    assert [tok.decode(ids.tolist()) for ids, _ in docs] == [
        f"{bos}first document\nstill first{eos}", f"{bos}second document{eos}", f"{bos}third{eos}"]
    for ids, labels in docs:
        assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == -100


def test_truncate_and_drop_are_counted(tmp_path, tok):
    records = [ultrachat_record(i, turns=1) for i in range(4)]
    records[1]["messages"][1]["content"] = "y" * 300
    path = write_jsonl(tmp_path / "long.jsonl", records)
    n_long = len(tok.encode_chat(records[1]["messages"]).input_ids)
    t = build_loader(cfg([{"path": path}], cycle=False, truncation="truncate"), tok, max_seq_len=100,
                     micro_batch_size=1, seed=0)
    rows = all_batches(t)
    assert t.counters["truncated"] == 1 and t.counters["truncated_tokens"] == n_long - 100
    assert t.counters["records"] == 4 and max(len(r["input_ids"][0]) for r in rows) == 100
    d = build_loader(cfg([{"path": path}], cycle=False, truncation="drop"), tok, max_seq_len=100,
                     micro_batch_size=1, seed=0)
    texts = set(_texts(d, tok))
    assert d.counters["dropped_too_long"] == 1 and d.counters["records"] == 3
    assert texts == {f"reply {i}.0<|im_end|>" for i in (0, 2, 3)}


def test_packed_rows_match_separate_forwards(tmp_path, tok, tiny_args):
    """Packing with document_mask gives each example exactly the logits it has alone."""
    path = write_jsonl(tmp_path / "uc.jsonl", [ultrachat_record(i, turns=1) for i in range(6)])
    batch = next(iter(build_loader(cfg([{"path": path}], cycle=False), tok, max_seq_len=128,
                                   micro_batch_size=1, seed=0)))
    pos = batch["position_ids"]
    assert pos[0, 0] == 0 and (pos == 0).sum() >= 3  # several documents (and maybe a padding tail)
    model = verse.ReasoningLLM(tiny_args).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=pos, attn_mask=document_mask(pos))
        starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.size(1)]
        for s, e in zip(starts[:-1], starts[1:]):
            alone = model(batch["input_ids"][:, s:e])
            torch.testing.assert_close(packed[:, s:e], alone, rtol=1e-4, atol=1e-4)
            assert batch["labels"][0, e - 1] == -100  # no document learns the next one's first token


def _sources(tmp_path):
    ot = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(30)])
    uc = write_jsonl(tmp_path / "uc.jsonl", [ultrachat_record(i) for i in range(20)])
    pq.write_table(pa.Table.from_pylist([ocr_record(i) for i in range(25)]), tmp_path / "ocr.parquet")
    return [{"path": ot, "weight": 50}, {"path": str(tmp_path / "ocr.parquet"), "weight": 30},
            {"path": uc, "weight": 20}]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_equals_straight_read(tmp_path, tok, pack):
    c = cfg(_sources(tmp_path), pack=pack, shuffle_buffer=7)
    kw = dict(max_seq_len=200, micro_batch_size=2, seed=3)
    straight = build_loader(c, tok, **kw)
    it = iter(straight)
    want = [next(it) for _ in range(14)]
    first = build_loader(c, tok, **kw)
    it = iter(first)
    got = [next(it) for _ in range(9)]
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON (and torch.save)
    resumed = build_loader(c, tok, **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got += [next(it) for _ in range(5)]
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    different_seed = next(iter(build_loader(c, tok, **{**kw, "seed": 4})))
    assert not torch.equal(different_seed["input_ids"], want[0]["input_ids"])


def test_resume_counters_are_exact(tmp_path, tok):
    c = cfg(_sources(tmp_path), shuffle_buffer=5)
    kw = dict(max_seq_len=200, micro_batch_size=2, seed=0)
    a = build_loader(c, tok, **kw)
    it = iter(a)
    for _ in range(6):
        next(it)
    state = a.state_dict()
    b = build_loader(c, tok, **kw)
    b.load_state_dict(state)
    assert Counter(state["counters"])["records"] > 0
    it_b = iter(b)
    for _ in range(4):
        next(it_b)
    for _ in range(4):
        next(it)
    # both loaders have yielded the same 10 batches: their counters at those points agree
    assert a.state_dict()["counters"] == b.state_dict()["counters"]


def test_workers_give_the_same_batches(tmp_path, tok):
    sources = _sources(tmp_path)
    kw = dict(max_seq_len=200, micro_batch_size=2, seed=5)
    it0 = iter(build_loader(cfg(sources, num_workers=0), tok, **kw))
    it2 = iter(build_loader(cfg(sources, num_workers=2), tok, **kw))
    for _ in range(6):
        a, b = next(it0), next(it2)
        assert all(torch.equal(a[k], b[k]) for k in a)
    it2.close()


def test_mixing_follows_weights(tmp_path, tok):
    loader = build_loader(cfg(_sources(tmp_path), shuffle_buffer=8), tok, max_seq_len=256, micro_batch_size=8, seed=0)
    it = iter(loader)
    while loader.counters["records"] < 1500:
        next(it)
    n = loader.counters["records"]
    for src, p in zip(loader.readers, (0.5, 0.3, 0.2)):
        k = loader.counters[f"records/{src.src.label}"]
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(k - n * p) < 4 * sigma, (src.src.label, k, n * p)


def _texts(loader, tok):
    return [trained_text(tok, labels) for batch in loader for _, labels in documents(batch)
            if (labels != -100).any()]


def test_ranks_and_eval_split_are_disjoint_and_complete(tmp_path, tok):
    path = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(40)])
    everything = {openthoughts_answer(i) + "<|im_end|>" for i in range(40)}
    c = cfg([{"path": path}], cycle=False, eval_fraction=0.25)
    kw = dict(max_seq_len=256, micro_batch_size=2, seed=0)
    train = [_texts(build_loader(c, tok, rank=r, world_size=2, **kw), tok) for r in (0, 1)]
    evals = _texts(build_loader(c, tok, split="eval", **kw), tok)
    parts = train + [evals]
    assert sum(map(len, parts)) == 40 and set().union(*map(set, parts)) == everything
    assert 0 < len(evals) < 20 and all(len(t) > 0 for t in train)
    with pytest.raises(ConfigError):
        build_loader(cfg([{"path": path}]), tok, split="eval", **kw)


def test_missing_file_and_unreachable_hub_fail_at_start(tmp_path, tok):
    with pytest.raises(VerseError, match="nothere.jsonl"):
        build_loader(cfg([{"path": str(tmp_path / "nothere.jsonl")}]), tok, max_seq_len=64)
    with pytest.raises(VerseError, match="OpenThoughts-114k"):  # tests run with HF_HUB_OFFLINE=1
        build_loader(cfg(["openthoughts"]), tok, max_seq_len=64)
    with pytest.raises(ConfigError, match="weight"):
        cfg([{"path": "x.jsonl", "weight": -1}])


def test_eval_iterations_restart_and_passes_repeat(tmp_path, tok):
    path = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(20)])
    kw = dict(max_seq_len=256, micro_batch_size=2, seed=0)
    ev = build_loader(cfg([{"path": path}], eval_fraction=0.5), tok, split="eval", **kw)
    first = next(iter(ev))
    again = next(iter(ev))  # every evaluation sees the same held-out batches
    assert torch.equal(first["input_ids"], again["input_ids"])
    once = build_loader(cfg([{"path": path}], cycle=False), tok, **kw)
    assert sorted(_texts(once, tok)) == sorted(_texts(once, tok))  # a finished pass starts over


@pytest.mark.parametrize("pack", [True, False])
def test_split_long_texts_resume_inside_a_document(tmp_path, tok, pack):
    docs = [f"document {i} " + "abcdefghij" * (3 + 9 * (i % 3)) for i in range(9)]  # some span 2-3 rows of 48
    write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in docs])
    c = cfg([{"path": str(tmp_path / "pre.jsonl")}], truncation="split", pack=pack, shuffle_buffer=1, cycle=False)
    kw = dict(max_seq_len=48, micro_batch_size=1, seed=0)
    straight = all_batches(build_loader(c, tok, **kw))
    # every text comes back whole: the chunks, concatenated, are text + eos of each document in file order
    # (the byte tokenizer has add_bos False: no bos)
    got = [t for b in straight for t in b["input_ids"][0].tolist() if t != tok.pad_id]
    want = []
    for d in docs:
        assert not tok.add_bos
        full = tok.encode(d) + [tok.eos_id]
        want += full[:-1] if len(full) % 48 == 1 else full  # a 1-token last chunk has no target: left out
    assert got == want and max(len(tok.encode(d)) + 1 for d in docs) > 2 * 48
    for k in range(1, len(straight)):
        first = build_loader(c, tok, **kw)
        it = iter(first)
        for _ in range(k):
            next(it)
        resumed = build_loader(c, tok, **kw)
        resumed.load_state_dict(first.state_dict())
        rest = all_batches(resumed)
        assert len(rest) == len(straight) - k
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(straight[k:], rest))


@pytest.mark.parametrize("workers", [0, 1])
def test_source_without_usable_records_stops_with_one_clear_error(tmp_path, tok, workers):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"text": 3}])
    loader = build_loader(cfg([{"path": path}], num_workers=workers), tok, max_seq_len=64)
    with pytest.raises(VerseError, match=r"no usable records \(bad records: empty: 1.*wrong_type: 1"):
        next(iter(loader))
    # on 2 ranks every rank reads the whole source (the global order): the same message, no rank's share in it
    with pytest.raises(VerseError, match=r"no usable records \(bad records: empty: 1.*wrong_type: 1"):
        next(iter(build_loader(cfg([{"path": path}], num_workers=workers), tok, max_seq_len=64, rank=1,
                               world_size=2)))


HUB_FIXTURES = Path(__file__).parent / "fixtures" / "data" / "hub"


@pytest.mark.parametrize("name, repo, answers, bad", [
    # the fixture's records, read independently with pyarrow below; bad = records skipped for each reason
    ("opencodereasoning", "nvidia/OpenCodeReasoning", "output", {"missing_field": 2}),
    ("ultrachat", "HuggingFaceH4/ultrachat_200k", "messages", {"empty": 2}),
    ("openthoughts", "open-thoughts/OpenThoughts-114k", "conversations", {"empty": 1, "not_ending_with_assistant": 1}),
])
def test_hub_short_names_read_a_local_copy_laid_out_as_the_hub(tok, name, repo, answers, bad):
    """A directory laid out as the Hub repo (README configs, real config and split names) goes through the same
    config/split selection as the Hub: a wrong default split (OpenCodeReasoning's is split_0, not train) fails."""
    directory = HUB_FIXTURES / repo
    files = {"opencodereasoning": "split_0/train-*", "ultrachat": "data/train_sft-*", "openthoughts": "data/train-*"}
    files = sorted(directory.glob(files[name]))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    end = "<|im_end|>"  # every trained reply ends with the template's end-of-turn token
    if name == "opencodereasoning":
        want = [r["output"] + end for r in rows if r["input"].strip() not in ("", "-")]
    elif name == "ultrachat":
        want = ["".join(m["content"] + end for m in r["messages"] if m["role"] == "assistant") for r in rows
                if all(m["content"].strip() for m in r["messages"])]
    else:
        want = ["".join(think_from_openthoughts(t["value"]) + end for t in r["conversations"]
                        if t["from"] == "assistant") for r in rows if r["conversations"][-1]["from"] == "assistant"
                and all(t["value"].strip() for t in r["conversations"])]
    for source in ({"name": name, "path": str(directory)}, {"path": str(directory)}):  # by name or by repo path
        loader = build_loader(cfg([source], cycle=False), tok, max_seq_len=512, micro_batch_size=2, seed=0)
        got = _texts(loader, tok)
        assert sorted(got) == sorted(want) and len(want) >= 10
        assert loader.bad_by_reason == bad
    with pytest.raises(VerseError, match="local copy of a Hub dataset.*split nope"):
        build_loader(cfg([{"name": name, "path": str(directory), "split": "nope"}]), tok, max_seq_len=64)


def test_hub_stream_is_split_over_ranks_by_datasets(tmp_path, tok):
    """#14: each rank of a Hub source reads its own share, the one `datasets.distributed.split_dataset_by_node` gives
    (the oracle: datasets itself on the same local copy, here in two files: one whole file per rank, not every
    other row of both); the shares are disjoint and make up the whole; the held-out rows are the same whatever
    the number of ranks."""
    import shutil

    import datasets
    import pyarrow.parquet as pq
    from datasets.distributed import split_dataset_by_node

    directory = tmp_path / "HuggingFaceH4" / "ultrachat_200k"
    shutil.copytree(HUB_FIXTURES / "HuggingFaceH4" / "ultrachat_200k", directory)
    train = directory / "data" / "train_sft-00000-of-00001.parquet"
    table = pq.read_table(train)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), directory / "data" / "train_sft-00000-of-00002.parquet")
    pq.write_table(table.slice(half), directory / "data" / "train_sft-00001-of-00002.parquet")
    train.unlink()
    end = "<|im_end|>"

    def answers(rows):
        return sorted("".join(m["content"] + end for m in r["messages"] if m["role"] == "assistant") for r in rows
                      if all(m["content"].strip() for m in r["messages"]))

    whole = datasets.load_dataset(str(directory), split="train_sft", streaming=True)
    kw = dict(max_seq_len=512, micro_batch_size=2, seed=0)
    source = [{"name": "ultrachat", "path": str(directory)}]
    shares = []
    for rank in (0, 1):
        got = sorted(_texts(build_loader(cfg(source, cycle=False), tok, rank=rank, world_size=2, **kw), tok))
        assert got == answers(split_dataset_by_node(whole, rank=rank, world_size=2))
        shares.append(got)
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == answers(whole)
    assert all(len(share) >= 3 for share in shares)
    # with a held-out fraction: the same eval rows on 1 and on 2 ranks; train + eval is everything once
    held = cfg(source, cycle=False, eval_fraction=0.3)
    one = sorted(_texts(build_loader(held, tok, split="eval", **kw), tok))
    two = sorted(t for r in (0, 1) for t in _texts(build_loader(held, tok, split="eval", rank=r, world_size=2, **kw),
                                                    tok))
    train = [t for r in (0, 1) for t in _texts(build_loader(held, tok, rank=r, world_size=2, **kw), tok)]
    assert one == two and 0 < len(one) and sorted(train + two) == answers(whole)


def test_opencodereasoning_hub_defaults_are_the_hubs():
    from verse.data.config import HUB_SOURCES

    assert HUB_SOURCES["opencodereasoning"][:3] == ("nvidia/OpenCodeReasoning", "split_0", "split_0")
    assert HUB_SOURCES["ultrachat"][2] == "train_sft" and HUB_SOURCES["openthoughts"][2] == "train"


def test_one_ignore_index_for_data_and_loss():
    """The label "no loss here" is defined once (data/packing.py) and is torch's cross_entropy default."""
    import inspect
    import re

    import torch.nn.functional as F

    from verse.data import packing
    from verse.eval import loss as eval_loss
    from verse.train import loss

    torch_default = inspect.signature(F.cross_entropy).parameters["ignore_index"].default
    assert eval_loss.IGNORE_INDEX == loss.IGNORE_INDEX == packing.IGNORE_INDEX == torch_default
    src = Path(__file__).parents[1] / "src" / "verse"
    definitions = [f"{p.relative_to(src)}:{line}" for p in src.rglob("*.py")
                   for line in p.read_text().splitlines() if re.match(r"\s*[A-Z_]+\s*=\s*-100\b", line)]
    assert len(definitions) == 1, definitions


@pytest.mark.timeout(120)
def test_a_whole_pass_of_dropped_examples_is_an_error_not_a_hang(tmp_path, tok):
    """Records whose replies all fall past max_seq_len: a cycling loader used to re-read the file forever."""
    long_prompt = [{"messages": [{"role": "user", "content": "x" * 200 + str(i)},
                                 {"role": "assistant", "content": "y"}]} for i in range(6)]
    path = write_jsonl(tmp_path / "long.jsonl", long_prompt)
    loader = build_loader(cfg([{"path": path}], shuffle_buffer=4), tok, max_seq_len=64, micro_batch_size=2, seed=0)
    with pytest.raises(VerseError, match="every example of a whole pass.*no_loss_tokens.*max_seq_len 64"):
        next(iter(loader))
    fits = write_jsonl(tmp_path / "mixed.jsonl", long_prompt + [ultrachat_record(0, turns=1)])  # one usable
    loader = build_loader(cfg([{"path": fits}], shuffle_buffer=4), tok, max_seq_len=64, micro_batch_size=2, seed=0)
    batches = [b for _, b in zip(range(3), loader)]
    assert all(trained_text(tok, labels) == "reply 0.0<|im_end|>" for b in batches for _, labels in documents(b)
               if (labels != -100).any())


def test_hostile_json_lines_are_skipped_and_counted(tmp_path, tok):
    """A line nested 1000 deep (RecursionError in json) and an integer of 5000 digits (ValueError past Python's
    4300-digit limit) are bad records like any other, not a crash."""
    deep = b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    huge = b'{"messages": [], "n": ' + b"7" * 5000 + b"}"
    path = write_jsonl(tmp_path / "hostile.jsonl", [ultrachat_record(i, turns=1) for i in range(3)], [deep, huge])
    loader = build_loader(cfg([{"path": path}], cycle=False), tok, max_seq_len=128, micro_batch_size=2, seed=0)
    assert set(_texts(loader, tok)) == {f"reply {i}.0<|im_end|>" for i in range(3)}
    assert loader.bad_by_reason == {"bad_json": 2}


@pytest.mark.parametrize("weight", [1e400, "1e400", float("nan"), 0, -1])
def test_source_weight_must_be_finite_and_positive(weight):
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight.*(finite|> 0)"):
        cfg([{"path": "x.jsonl", "weight": weight}])


def _global_batches(loaders, n):
    """The next `n` global micro-batches of data-parallel `loaders` (one per rank): their batches' rows, in rank
    order, as (input_ids, labels) pairs with the padding cut off (a padded batch is padded to its own longest row)."""
    its = [iter(lo) for lo in loaders]
    out = []
    for _ in range(n):
        rows = []
        for it in its:
            batch = next(it)
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                keep = labels != -100
                rows.append((ids[:int(keep.nonzero().max()) + 2 if keep.any() else 0].tolist(), labels[keep].tolist()))
        out.append(rows)
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_ranks_read_slices_of_one_global_order_and_resume_on_any_number(tmp_path, tok, pack):
    """#14: N data-parallel ranks keep contiguous slices of the global micro-batches one process reads with N times
    the micro-batch (the oracle), and a position saved by 2 ranks continues on 1 and on 4 ranks with exactly the
    rows the uninterrupted read would give next (global batch of 4 rows kept): none twice, none skipped."""
    c = cfg(_sources(tmp_path), pack=pack, shuffle_buffer=7)
    kw = dict(max_seq_len=120, seed=3)
    straight = _global_batches([build_loader(c, tok, micro_batch_size=4, **kw)], 9)
    two = [build_loader(c, tok, micro_batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    assert _global_batches(two, 5) == straight[:5]
    states = [json.loads(json.dumps(lo.state_dict())) for lo in two]
    assert states[0] == states[1] and states[0]["order"] == "global"  # one position, whatever the rank
    for world, micro in ((1, 4), (4, 1), (2, 2)):
        resumed = [build_loader(c, tok, micro_batch_size=micro, rank=r, world_size=world, **kw) for r in range(world)]
        for lo in resumed:
            lo.load_state_dict(states[0])
        assert _global_batches(resumed, 4) == straight[5:], world


def test_last_incomplete_global_batch_is_split_and_no_rank_is_left_without_a_batch(tmp_path, tok):
    """A non-cycling pass whose rows do not fill the last global micro-batch: its rows go to the first ranks, every
    other rank gets a row without loss tokens, so every rank yields as many batches; all examples are read once."""
    path = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(11)])
    c = cfg([{"path": path}], cycle=False)
    kw = dict(max_seq_len=256, micro_batch_size=1, seed=0)
    rows = sum(len(b["input_ids"]) for b in build_loader(c, tok, **kw))  # one process's rows
    assert rows % 4 == 2
    ranks = [all_batches(build_loader(c, tok, rank=r, world_size=4, **kw)) for r in range(4)]
    assert [len(b) for b in ranks] == [rows // 4 + 1] * 4
    assert [bool((b[-1]["labels"] != -100).any()) for b in ranks] == [True, True, False, False]
    texts = [t for r in range(4) for t in _texts(build_loader(c, tok, rank=r, world_size=4, **kw), tok)]
    assert sorted(texts) == sorted(openthoughts_answer(i) + "<|im_end|>" for i in range(11))


def test_per_rank_positions_resume_on_their_own_number_of_ranks_only(tmp_path, tok):
    """A position saved before the global order (state version 1: rank r of 2 read rows r, r+2, ... of a file)
    continues on 2 ranks where it stopped (the oracle: the file's rows, by hand); on 4 ranks it is one line. A Hub
    stream is read in per-rank shares (split_dataset_by_node): a whole-stream position cannot continue on 2 ranks."""
    import shutil

    path = write_jsonl(tmp_path / "ot.jsonl", [openthoughts_record(i) for i in range(20)])
    c = cfg([{"path": path}], cycle=False, shuffle_buffer=1)
    kw = dict(max_seq_len=256, micro_batch_size=1, seed=0)
    old = {"version": 1, "stream": None, "skip": 3, "piece": 0, "counters": {}, "world_size": 2}  # as _loader_state
    for rank in (0, 1):
        lo = build_loader(c, tok, rank=rank, world_size=2, **kw)
        lo.load_state_dict(old)
        assert _texts(lo, tok) == [openthoughts_answer(i) + "<|im_end|>" for i in range(rank + 6, 20, 2)]
    with pytest.raises(ConfigError, match=r"^the saved data position is 2 data-parallel ranks' shares of the sources, "
                                          r"which continue only on 2 ranks \(now 4\); resume with 2 data-parallel"):
        build_loader(c, tok, rank=0, world_size=4, **kw).load_state_dict(old)
    directory = tmp_path / "HuggingFaceH4" / "ultrachat_200k"
    shutil.copytree(HUB_FIXTURES / "HuggingFaceH4" / "ultrachat_200k", directory)
    hub = cfg([{"name": "ultrachat", "path": str(directory)}])
    whole = build_loader(hub, tok, **kw)
    next(iter(whole))
    assert not build_loader(hub, tok, **kw).shares and build_loader(hub, tok, world_size=2, **kw).shares
    with pytest.raises(ConfigError, match=r"^data source 'ultrachat' is a Hub stream, which each of the 2 "
                                          r"data-parallel ranks reads in its own share \(split_dataset_by_node\).*; "
                                          r"resume with 1 "):
        build_loader(hub, tok, world_size=2, **kw).load_state_dict(whole.state_dict())
