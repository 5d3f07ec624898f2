"""verse eval: answer extraction, held-out loss vs a hand-computed cross-entropy, exact match on a fake generator."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import verse
from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse.errors import VerseError
from verse.eval import DEFAULT_PATTERN, exact_match, extract_answer, heldout_loss


@pytest.mark.parametrize("text, pattern, expected", [
    ("<think>\n2 + 3 = 5\n</think>\nAnswer: 5", DEFAULT_PATTERN, "5"),
    ("Answer: 3 ... no wait. Answer: -12", DEFAULT_PATTERN, "-12"),
    ("Answer: 1,234.", DEFAULT_PATTERN, "1234"),
    ("Answer: 2.50", DEFAULT_PATTERN, "2.50"),
    ("the result is 7", DEFAULT_PATTERN, None),
    ("so #### 42", r"####\s*(\d+)", "42"),
    ("final: yes", r"yes|no", "yes"),
])
def test_extract_answer(text, pattern, expected):
    assert extract_answer(text, pattern) == expected


def test_bad_pattern_is_a_user_error():
    with pytest.raises(VerseError, match="not a valid regular expression"):
        extract_answer("Answer: 1", "Answer: (")


def _tiny_model(seed: int = 0) -> ReasoningLLM:
    torch.manual_seed(seed)
    return ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=261)).eval()


def test_heldout_loss_matches_hand_computed_cross_entropy():
    model = _tiny_model()
    ids = torch.randint(0, 261, (3, 20))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :7] = -100
    labels[2, :15] = -100
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).double(), dim=-1)
    keep = labels != -100
    nll = -logp[keep].gather(1, labels[keep][:, None]).squeeze(1)
    result = heldout_loss(model, batches)
    assert result.tokens == int(keep.sum()) == 19 * 3 - 7 - 15
    assert result.sequences == 3
    assert result.loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result.perplexity == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-5)
    limited = heldout_loss(model, batches, limit=1)
    assert limited.sequences == 1 and limited.loss == pytest.approx(nll[:19 - 7].mean().item(), rel=1e-5)


def test_heldout_loss_is_the_trainers_eval_loss_on_packed_batches():
    """`verse eval` and training's eval_every compute one held-out loss (verse.train.loss.batch_loss): equal on
    packed rows (document mask from position_ids), and equal to the two documents scored apart by hand."""
    import contextlib

    from verse.train.loop import evaluate

    model = _tiny_model()
    ids = torch.randint(0, 261, (1, 16))
    labels = ids.roll(-1, dims=1)
    labels[0, [7, 15]] = -100  # each document's last position has no next token
    position_ids = torch.cat([torch.arange(8), torch.arange(8)])[None]
    batches = [{"input_ids": ids, "labels": labels, "position_ids": position_ids}]
    ours = heldout_loss(model, batches)
    trainers = evaluate(model, batches, 1, torch.device("cpu"), contextlib.nullcontext(), 4)
    with torch.no_grad():  # the two documents as separate sequences: packing must not leak attention
        nll = torch.cat([torch.nn.functional.cross_entropy(model(ids[:, a:b])[0, :-1].double(), ids[0, a + 1:b],
                                                           reduction="none") for a, b in ((0, 8), (8, 16))])
    assert ours.tokens == 14 and ours.loss == pytest.approx(trainers, rel=1e-6)
    assert ours.loss == pytest.approx(nll.mean().item(), rel=1e-5)
    source = Path(__file__).resolve().parents[1] / "src" / "verse"
    assert "batch_loss(" in (source / "eval" / "loss.py").read_text()
    assert "batch_loss(" in (source / "train" / "loop.py").read_text()
    assert "cross_entropy" not in (source / "eval" / "loss.py").read_text()


class FakeGenerator:
    """Stands in for `verse.infer.generate.generate`: replies chosen by question, records the batches."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.batches = tokenizer, replies, []

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, temperature):
        assert temperature == 0.0
        self.batches.append(len(prompts))
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            question = next(q for q in self.replies if q in text)
            out.append(tokenizer.encode(self.replies[question]))
        return out


def test_exact_match_on_a_fake_generator():
    tok = verse.load_tokenizer("byte")
    questions = ["q-one?", "a much longer question two?", "q3?", "question four??", "q5"]
    replies = {"q-one?": "<think>1+1=2</think>\nAnswer: 2", "a much longer question two?": "Answer: 7",
               "q3?": "I do not know", "question four??": "Answer: 1,000", "q5": "Answer: 4\nAnswer: 5"}
    references = ["2", "8", "3", "1000", "5"]
    fake = FakeGenerator(tok, replies)
    prompts = [[{"role": "user", "content": q}] for q in questions]
    result = exact_match(None, tok, prompts, references, batch_size=2, generate_fn=fake)
    assert fake.batches == [2, 2, 1]
    assert [s["correct"] for s in result.samples] == [True, False, False, True, True]
    assert [s["prediction"] for s in result.samples] == ["2", "7", None, "1000", "5"]
    assert result.correct == 3 and result.total == 5 and result.accuracy == pytest.approx(0.6)
    assert result.unanswered == 1
    assert result.samples[1]["reply"] == "Answer: 7"


def _write_data(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_cli_loss_matches_hand_computed(tmp_path, capsys):
    tok = verse.load_tokenizer("byte")
    model = _tiny_model(1)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    records = [{"system": "Be brief.", "conversations": [{"from": "user", "value": "2+2?"},
                                                         {"from": "assistant", "value": "Answer: 4"}]},
               {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}]
    data = _write_data(tmp_path / "d.jsonl", records)
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data), "--task", "loss", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    total, count = 0.0, 0
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "Answer: 4"}], records[1]["messages"]):
        enc = tok.encode_chat(messages)
        ids = torch.tensor(enc.input_ids)
        with torch.no_grad():
            logits = model(ids[None])[0, :-1].double()
        target, mask = ids[1:], torch.tensor(enc.loss_mask[1:])
        total += F.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        count += int(mask.sum())
    assert out["tokens"] == count and out["sequences"] == 2
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    tok = verse.load_tokenizer("byte")
    _tiny_model().save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    data = _write_data(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "no number"}]}])
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data)]) == 2
    assert "matches --answer-pattern" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data), "--answer-pattern", "(("]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_eval_cli_exact_match_runs_the_real_generator(tmp_path, capsys):
    tok = verse.load_tokenizer("byte")
    _tiny_model().save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    data = _write_data(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"{i}+1?"},
                                                            {"role": "assistant", "content": f"Answer: {i + 1}"}]}
                                              for i in range(5)])
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data), "--limit", "3", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 3 and out["skipped_no_reference"] == 0
    assert 0 <= out["correct"] <= 3 and out["new_tokens"] <= 12


def test_eval_loss_clamps_max_seq_len_to_the_models(tmp_path, capsys):
    """tiny's max_seq_len is 256: a longer record used to run past the RoPE table (the default was 2048)."""
    tok = verse.load_tokenizer("byte")
    model = _tiny_model(2)
    assert model.args.max_seq_len == 256
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    messages = [{"role": "user", "content": "long " * 20}, {"role": "assistant", "content": "x" * 400}]
    data = _write_data(tmp_path / "d.jsonl", [{"messages": messages}])
    enc = tok.encode_chat(messages)
    ids, mask = torch.tensor(enc.input_ids[:256]), torch.tensor(enc.loss_mask[1:256])
    with torch.no_grad():
        logits = model(ids[None])[0, :-1].double()
    want = F.cross_entropy(logits[mask], ids[1:][mask]).item()  # the first 256 tokens, as truncation keeps
    for extra, note in (([], False), (["--max-seq-len", "4096"], True)):
        assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data), "--task", "loss", "--json", *extra]) == 0
        captured = capsys.readouterr()
        out = json.loads(captured.out)
        assert out["tokens"] == int(mask.sum()) and out["loss"] == pytest.approx(want, rel=1e-5)
        assert ("exceeds the model's max_seq_len 256; using 256" in captured.err) == note
