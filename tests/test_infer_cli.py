"""`verse generate` and `verse chat` (terminal) on a tiny checkpoint with the byte tokenizer."""

import io
import json

import pytest
import torch

import verse
from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse.infer import generate
from verse.infer.chat import ChatSession, ThinkRenderer, render_think, split_reasoning, terminal_chat


def reader(lines):
    """A terminal that types `lines`, then Ctrl-D."""
    lines = iter(lines)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    return read


@pytest.fixture(scope="module")
def checkpoint(tiny_byte_checkpoint):
    return tiny_byte_checkpoint


def test_generate_json_is_the_continuation(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok = verse.load(checkpoint), verse.load_tokenizer(checkpoint)
    prompt = tok.encode("Hello")
    prompt = [tok.bos_id] + prompt if tok.add_bos else prompt
    expected = generate(model, tok, [prompt], max_new_tokens=12)[0]
    assert out["text"] == tok.decode(expected)
    assert out["prompt_tokens"] == len(prompt) and out["new_tokens"] == len(expected)
    assert out["time_to_first_token_s"] > 0
    assert set(out) == {"text", "prompt_tokens", "new_tokens", "tokens_per_s", "time_to_first_token_s"}


def test_generate_chat_uses_the_template(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Hi", "--chat", "--system", "Be brief.",
                 "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50", "--seed", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = verse.load_tokenizer(checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert out["prompt_tokens"] == len(tok.apply_chat_template(messages, add_generation_prompt=True))


def test_generate_bad_input_exits_2(checkpoint, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert main(["generate", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert main(["generate", str(checkpoint), "--prompt", "x", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("verse generate: error:") for line in err)


def test_tokenizer_with_ids_past_the_model_vocabulary_exits_2(checkpoint, tmp_path, capsys):
    """o200k ids (up to 200018) would index past a 261-row embedding: one line, for generate and eval."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    assert main(["generate", str(checkpoint), "--prompt", "x", "--tokenizer", "o200k"]) == 2
    assert main(["eval", str(checkpoint), "--data", str(data), "--task", "loss", "--tokenizer", "o200k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("o200k" in line and "vocabulary of 261" in line for line in err)


def test_terminal_chat_history_commands_and_save(checkpoint, tmp_path):
    model, tok = verse.load(checkpoint), verse.load_tokenizer(checkpoint)
    session = ChatSession(model, tok, generation={"max_new_tokens": 6})
    save = tmp_path / "chat.json"
    lines = ["hello", "/system Be brief.", "again", f"/save {save}", "/reset", "/bogus", "/quit", "never"]
    out = io.StringIO()
    terminal_chat(session, think="show", read=reader(lines), out=out)
    saved = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == "Be brief." and saved[3]["content"] == "again"
    # the second answer was generated from the whole history, system prompt first
    prompt = tok.apply_chat_template(saved[:4], add_generation_prompt=True)
    assert saved[4]["content"] == tok.decode(generate(model, tok, [prompt], max_new_tokens=6)[0])
    assert session.history == [] and "unknown command /bogus" in out.getvalue()


def test_ctrl_c_stops_the_answer_but_not_the_chat(checkpoint):
    model, tok = verse.load(checkpoint), verse.load_tokenizer(checkpoint)
    session = ChatSession(model, tok, generation={"max_new_tokens": 50, "stop_ids": set()})

    class Interrupting(io.StringIO):
        writes = 0

        def write(self, s):
            Interrupting.writes += 1
            if Interrupting.writes == 3:  # the user presses Ctrl-C while the first answer streams
                raise KeyboardInterrupt
            return super().write(s)

    out = Interrupting()
    terminal_chat(session, think="show", read=reader(["first", "second"]), out=out)
    assert "(stopped)" in out.getvalue()
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert len(session.history[1]["content"]) < len(session.history[3]["content"])  # cut short; second is whole
    assert model.cache_len == 0


def test_think_rendering_by_hand():
    text = "<think>plan</think>Answer"
    assert split_reasoning(text) == ("plan", "Answer")
    assert split_reasoning("plan</think>Answer", opened=True) == ("plan", "Answer")
    assert split_reasoning("no tags") == ("", "no tags")
    assert render_think(text, "hide") == "Answer"
    assert render_think(text, "dim") == "\033[2m<think>plan</think>\033[0mAnswer"
    renderer = ThinkRenderer("hide")
    pieces = [renderer.feed(c) for c in text] + [renderer.flush()]  # tags split across pieces
    assert "".join(pieces) == "Answer"


def test_generate_mla_absorb_matches_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = verse.load_tokenizer("byte")
    args = ModelArgs(arch="deepseek_v2", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, inter_dim=48,
                     attention="mla", kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                     max_seq_len=128, dtype="float32")
    torch.manual_seed(0)
    model = ReasoningLLM(args)
    with torch.no_grad():
        model.head.weight.mul_(20)
        model.head.weight[256:] = 0  # no special (stop) token wins: exactly 10 new tokens
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert main(["generate", str(tmp_path), "--prompt", "abc", "--attn-impl", "absorb", "--max-new-tokens", "10",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = tok.encode("abc")
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out["text"] == tok.decode(ids[0, len(prompt):].tolist())


@pytest.mark.slow
def test_generate_smollm2_on_its_gguf_blocks_compiled(capsys):
    """`verse generate` on the shipped SmolLM2 GGUF with --gemm-impl gguf, compiled and eager: both answer, and the
    compiled decode step starts the same greedy answer as the eager one (the same function, fused)."""
    from verse.assets import smollm2_gguf

    path = str(smollm2_gguf())
    argv = ["generate", path, "--prompt", "Name three colours.", "--chat", "--max-new-tokens", "24",
            "--gemm-impl", "gguf", "--json"]
    assert main(argv + ["--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)
    print(f"compiled: {compiled['text']!r}\neager:    {eager['text']!r}")
    assert compiled["new_tokens"] > 4 and eager["new_tokens"] > 4
    # int8-rounded activations can flip a near-tie later on; the first words must agree
    assert compiled["text"].split()[:3] == eager["text"].split()[:3]


class Tty(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\rok"


def fake_stream(model, tokenizer, prompt, **kwargs):
    yield from tokenizer.encode(HOSTILE)


def test_generated_control_characters_escaped_only_on_a_terminal(checkpoint, capsys, monkeypatch):
    import sys

    import importlib

    monkeypatch.setattr(importlib.import_module("verse.infer.generate"), "stream", fake_stream)
    monkeypatch.setattr("verse.infer.chat.stream", fake_stream)
    args = ["generate", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "4"]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == HOSTILE
    assert main(args) == 0
    assert capsys.readouterr().out == HOSTILE + "\n"  # piped: raw
    escaped = "\\x1b]0;pwned\\x07\\x1b[2J\\x0dok"
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(args) == 0
    assert tty.getvalue() == escaped + "\n"
    session = ChatSession(verse.load(checkpoint), verse.load_tokenizer(checkpoint), generation={"max_new_tokens": 4})
    out = Tty()
    terminal_chat(session, think="show", read=reader(["Hi"]), out=out)
    assert escaped in out.getvalue() and "\x1b" not in out.getvalue()
    piped = io.StringIO()
    terminal_chat(session, think="show", read=reader(["Hi"]), out=piped)
    assert HOSTILE in piped.getvalue()
