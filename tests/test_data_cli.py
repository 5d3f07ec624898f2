"""`verse data preview|stats` through `verse.cli.main`: markers, JSON keys and values, exit codes."""

import io
import json

import pytest

import verse
from verse.cli import main


def ultrachat_record(i):
    return {"prompt": f"q{i}", "prompt_id": str(i),
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(ultrachat_record(i)) for i in range(10)] + ['{"messages": 5}', "not json"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stats_json(data_file, capsys):
    rc = main(["data", "stats", "--source", str(data_file), "--tokenizer", "byte", "--max-seq-len", "64", "--json",
               "--no-pack"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    tok = verse.load_tokenizer("byte")
    encs = [tok.encode_chat(ultrachat_record(i)["messages"]) for i in range(10)]
    lengths = [len(e.input_ids) for e in encs]
    kept = [min(n, 64) for n in lengths]
    assert stats["records"] == 10
    assert stats["bad_records"] == 2 and stats["bad_by_reason"] == {"bad_json": 1, "wrong_type": 1}
    assert stats["tokens"] == sum(kept)
    assert stats["truncated"] == sum(n > 64 for n in lengths)
    assert stats["truncated_tokens_lost"] == sum(n - k for n, k in zip(lengths, kept))
    # loss tokens: targets after the first token, within the kept part
    assert stats["loss_tokens"] == sum(sum(e.loss_mask[1:k]) for e, k in zip(encs, kept))
    assert abs(stats["loss_token_fraction"] - stats["loss_tokens"] / stats["tokens"]) < 1e-12
    # unpacked: 10 rows in batches of 8 and 2, each padded to its longest (64 with truncation)
    rows = [kept[:8], kept[8:]]
    width = [min(64, -(-max(r) // 64) * 64) for r in rows]
    pad = sum(w * len(r) - sum(r) for w, r in zip(width, rows))
    assert stats["padding_fraction"] == pytest.approx(pad / sum(w * len(r) for w, r in zip(width, rows)))
    assert stats["length_percentiles"]["max"] == max(lengths)


def test_preview_marks_trained_tokens(data_file, capsys):
    assert main(["data", "preview", "--source", str(data_file), "--tokenizer", "byte", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== record") == 2
    body, footer = out.rsplit("(trained tokens", 1)
    trained = [seg.split("]]")[0] for seg in body.split("[[")[1:]]
    assert len(trained) == 2 and all(t.startswith("answer ") and t.endswith("<|im_end|>") for t in trained)
    assert "question" not in "".join(trained) and "Be brief" not in "".join(trained)


def test_config_file(tmp_path, data_file, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: tiny\ndata:\n  sources:\n    - {{path: {data_file}, weight: 1}}\n  max_seq_len: 128\n")
    assert main(["data", "stats", "--config", str(cfg), "--json"]) == 0  # tokenizer from the tiny preset (byte)
    assert json.loads(capsys.readouterr().out)["records"] == 10


def test_errors_exit_2(tmp_path, capsys):
    assert main(["data", "stats", "--source", str(tmp_path / "missing.jsonl"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "preview", "--config", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [x.jsonl]\n  pak: true\n")
    assert main(["data", "stats", "--config", str(bad), "--tokenizer", "byte"]) == 2
    assert "pak" in capsys.readouterr().err
    assert main(["data", "stats", "--source", "openthoughts", "--tokenizer", "byte"]) == 2  # offline in tests


def test_shipped_fixtures_in_hub_schemas(monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])  # the config names the fixtures relative to the repo root
    assert main(["data", "stats", "--config", "tests/fixtures/data/mix.yaml", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 36 and set(stats["records_by_source"].values()) == {12}
    # one broken record of each kind was written into the fixtures
    assert stats["bad_by_reason"] == {"bad_json": 1, "missing_field": 1, "not_ending_with_assistant": 1,
                                      "wrong_type": 1}
    assert set(stats) >= {"records", "bad_records", "tokens", "loss_tokens", "truncated", "padding_fraction"}


class Tty(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


def test_preview_escapes_control_characters_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    hostile = "\x1b]0;pwned\x07\x1b[2J\rgone"
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": hostile}]}) + "\n")
    args = ["data", "preview", "--source", str(path), "--tokenizer", "byte", "-n", "1"]
    assert main(args) == 0
    assert hostile in capsys.readouterr().out  # piped: the data byte for byte
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(args) == 0
    out = tty.getvalue()
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0dgone" in out
    assert "\x07" not in out and "\r" not in out and "\x1b]" not in out and "\x1b[2J" not in out


@pytest.mark.parametrize("option", [["-n", "-1"], ["-n", "0"], ["--limit", "-5"]])
def test_counts_below_one_exit_2_with_one_line(data_file, capsys, option):
    action = "stats" if option[0] == "--limit" else "preview"
    assert main(["data", action, "--source", str(data_file), "--tokenizer", "byte", *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] in err[0] and "Traceback" not in err[0]
