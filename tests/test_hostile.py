"""Hostile files and arguments: each ends in one `verse CMD: error:` line with exit 2, fast; never a hang,
a huge allocation or a traceback (issue #20 items 9, 10, 13)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import verse
from verse.cli import main

SRC = str(Path(verse.__file__).resolve().parents[1])  # the sources under test, for subprocesses


def one_error(capsys, *argv, command="generate"):
    """Run the CLI in-process; return (exit code, the error lines, all of stderr)."""
    code = main([command, *map(str, argv)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith(f"verse {command}: error:")], err


def assert_one_line(capsys, *argv, expect=(), command="generate"):
    code, errors, err = one_error(capsys, *argv, command=command)
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err, err
    for text in expect:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint directory (HF files + byte tokenizer), config.json only (no verse.json)."""
    from verse import ModelArgs, ReasoningLLM
    from verse.tokenization import load_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(path, load_tokenizer("byte"))
    (path / "verse.json").unlink()
    return path


def edited(checkpoint, tmp_path, **changes):
    """A copy of the checkpoint whose config.json has `changes`."""
    path = tmp_path / "edited"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


GEN = ("--prompt", "hi", "--max-new-tokens", "2")


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": True}, "'hidden_size'"),  # bool is not an int
    ({"head_dim": -16}, "head_dim"),
    ({"model_type": ["llama"]}, "'model_type'"),
    ({"num_attention_heads": "4"}, "'num_attention_heads'"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps'"),
    ({"num_hidden_layers": 1e6}, "'num_hidden_layers'"),  # a float, not an int
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings'"),  # a string bool(...) took as true
])
def test_config_json_type_and_range_errors_name_the_field(checkpoint, tmp_path, capsys, changes, field):
    path = edited(checkpoint, tmp_path, **changes)
    assert_one_line(capsys, path, *GEN, expect=("config.json", field))


def test_config_claiming_a_million_layers_is_refused_before_building(checkpoint, tmp_path, capsys):
    """num_hidden_layers 10^6 with 2 layers of weights: refused from the safetensors header, in well under a
    second (building a million layers, even on `meta`, took minutes)."""
    import time

    path = edited(checkpoint, tmp_path, num_hidden_layers=10**6)
    start = time.perf_counter()
    assert_one_line(capsys, path, *GEN, expect=("model.safetensors", "1000000 layers", "hold 2"))
    assert time.perf_counter() - start < 20  # building the layers took minutes


def test_config_vocab_that_disagrees_with_the_embedding(checkpoint, tmp_path, capsys):
    path = edited(checkpoint, tmp_path, vocab_size=10**9)
    assert_one_line(capsys, path, *GEN, expect=("token embedding", "vocab_size 1000000000"))


def test_uint8_tensor_in_safetensors(checkpoint, tmp_path, capsys):
    path = edited(checkpoint, tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = torch.zeros(64, dtype=torch.uint8)
    save_file(state, path / "model.safetensors")
    assert_one_line(capsys, path, *GEN, expect=("model.safetensors", "model.norm.weight", "U8"))


@pytest.mark.parametrize("text, why", [
    ("{" * 100000, "not valid JSON"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"vocab_size": ' + "1" * 5000 + "}", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_config_json_is_one_line(checkpoint, tmp_path, capsys, text, why):
    path = edited(checkpoint, tmp_path)
    (path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line(capsys, path, *GEN, expect=("config.json", why))


# ---- GGUF ----

def gguf_bytes(fields=(), n_tensors=0):
    """A GGUF v3 header by hand: `fields` are (key, type, packed value bytes)."""
    def string(text):
        return struct.pack("<Q", len(text.encode())) + text.encode()
    body = b"".join(string(key) + struct.pack("<I", kind) + value for key, kind, value in fields)
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(fields)) + body


def test_gguf_array_claiming_2_pow_62_items_fails_fast_in_a_subprocess(tmp_path):
    """The 56-byte file of issue #20: gguf's reader looped over the claimed count forever."""
    path = tmp_path / "bomb.gguf"
    path.write_bytes(gguf_bytes([("gen.arch", 9, struct.pack("<IQ", 0, 2**62))]))
    assert len(path.read_bytes()) == 56
    out = subprocess.run([sys.executable, "-m", "verse.cli", "generate", str(path), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "bomb.gguf" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fields, n_tensors, why", [
    ([("k", 8, struct.pack("<Q", 2**63))], 0, "a string needs"),  # string length
    ([], 2**60, "tensor infos"),  # tensor count
    ([("k", 9, struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 0, 0))], 0, "nested"),
    ([("k", 99, b"")], 0, "unknown metadata value type 99"),
])
def test_malformed_gguf_headers(tmp_path, capsys, fields, n_tensors, why):
    path = tmp_path / "bad.gguf"
    path.write_bytes(gguf_bytes(fields, n_tensors) + bytes(32))
    assert_one_line(capsys, path, *GEN, expect=("bad.gguf", why))


def tiny_gguf(path, **meta):
    """A one-layer F32 Llama GGUF (dim 64, 4 heads); `meta` replaces metadata (`llama.` keys), typed by value."""
    rng = np.random.default_rng(0)
    values = {"context_length": 64, "embedding_length": 64, "block_count": 1, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 4, "attention.layer_norm_rms_epsilon": 1e-5,
              **meta}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(f"llama.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    shapes = {"token_embd.weight": (32, 64), "output.weight": (32, 64), "output_norm.weight": (64,)}
    for name, shape in {"attn_q": (64, 64), "attn_k": (64, 64), "attn_v": (64, 64), "attn_output": (64, 64),
                        "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128), "attn_norm": (64,),
                        "ffn_norm": (64,)}.items():
        shapes[f"blk.0.{name}.weight"] = shape
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_loads(tmp_path):
    """The builder below is sound: unchanged, the file loads."""
    from verse import load

    assert load(tiny_gguf(tmp_path / "ok.gguf")).args.n_layers == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("meta, expect", [
    ({"block_count": 10**7}, ("10000000 layers", "hold 1")),
    ({"attention.head_count": 3, "attention.head_count_kv": 3, "attention.key_length": 16}, ("blk.0.attn_q.weight",)),
    ({"attention.head_count": 3, "attention.head_count_kv": 3}, ("divisible by n_heads (3)",)),
    ({"attention.head_count": "four"}, ("'llama.attention.head_count'", "must be an integer")),
    ({"embedding_length": 65}, ("'llama.embedding_length'", "divisible")),
    ({"embedding_length": 128}, ("token embedding",)),
])
def test_gguf_metadata_that_disagrees_with_its_tensors(tmp_path, capsys, meta, expect):
    path = tiny_gguf(tmp_path / "bad.gguf", **meta)
    assert_one_line(capsys, path, *GEN, "--tokenizer", "byte", expect=("bad.gguf", *expect))


def test_gguf_tensor_past_the_end_of_the_file(tmp_path, capsys):
    data = tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-100])
    assert_one_line(capsys, path, *GEN, "--tokenizer", "byte", expect=("cut.gguf", "past the end of the file"))


# ---- generate / chat arguments ----

@pytest.mark.parametrize("argv, expect", [
    (("--temperature", "nan"), "temperature"),
    (("--temperature", "inf"), "temperature"),
    (("--top-p", "nan"), "top_p"),
    (("--repetition-penalty", "nan"), "repetition_penalty"),
    (("--seed", "1e23"), "--seed"),
    (("--seed", str(10**23)), "seed"),
    (("--seed", "-1"), "seed"),
    (("--device", "foo:1"), "--device='foo:1'"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_generation_arguments_fail_before_loading(tmp_path, capsys, argv, expect, command):
    """Checked before the model loads: the checkpoint does not even exist."""
    extra = ("--prompt", "hi") if command == "generate" else ()
    code = None
    try:
        code, errors, err = one_error(capsys, tmp_path / "missing", *extra, *argv, command=command)
    except SystemExit as e:  # argparse's own errors
        code, err = e.code, capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith(f"verse {command}: error:")]
    assert code == 2 and len(errors) == 1 and err.count("\n") == 1, err
    assert expect in errors[0] and "missing" not in errors[0]


def test_device_cuda_without_cuda(checkpoint, capsys, monkeypatch):
    """Was a pin_memory error from safetensors after the weights started loading."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line(capsys, checkpoint, *GEN, "--device", "cuda", expect=("CUDA is not available",))


def test_prompt_with_bytes_that_are_not_utf8(checkpoint, capsys):
    """Python keeps undecodable argv bytes as lone surrogates: the prompt behaves as U+FFFD in their place."""
    outputs = []
    for prompt in ("\udcff\udcfe", "\ufffd\ufffd"):
        assert main(["generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "3", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == {**outputs[1], "tokens_per_s": outputs[0]["tokens_per_s"],
                          "time_to_first_token_s": outputs[0]["time_to_first_token_s"]}


def test_chat_survives_stdin_bytes_that_are_not_utf8(checkpoint, tmp_path):
    """A bad line used to end the session (UnicodeDecodeError) and lose its history."""
    saved = tmp_path / "chat.json"
    out = subprocess.run([sys.executable, "-m", "verse.cli", "chat", str(checkpoint), "--max-new-tokens", "2"],
                         input=b"hi\n\xff\xfe ok\nthird\n/save " + str(saved).encode() + b"\n",
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["hi", "\ufffd\ufffd ok", "third"]


# ---- the Gradio chat UI ----

def test_ui_clamps_nan_sampling_values_to_their_defaults():
    """NaN passed min/max clamps (max(nan, 0) is nan) and reached the sampler; the UI now answers greedily."""
    from verse import ModelArgs, ReasoningLLM, load_tokenizer
    from verse.infer.ui import ChatBackend

    torch.manual_seed(0)
    tok = load_tokenizer("byte")
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size)).eval()
    backend = ChatBackend(model, tok, {"stop_ids": set()})
    nan = float("nan")
    reply = "".join(backend.reply("hi", [], "", temperature=nan, top_p=nan, max_new_tokens=nan))
    greedy = "".join(backend.reply("hi", [], "", temperature=0.0, top_p=1.0, max_new_tokens=backend.max_new_tokens))
    assert reply == greedy


def test_ui_client_errors_hide_internal_detail(caplog):
    from verse.errors import VerseError
    from verse.infer.ui import INTERNAL_ERROR, client_error

    assert client_error(VerseError("the message is too long")) == "the message is too long"
    with caplog.at_level("ERROR", logger="verse.infer.ui"):
        assert client_error(RuntimeError("/home/me/secret.txt")) == INTERNAL_ERROR
    assert "/home/me/secret.txt" in caplog.text  # kept for the server's operator


def test_ui_upload_route_is_closed():
    import asyncio

    from verse.infer.ui import NoUploads

    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    middleware = NoUploads(app)
    for path in ("/gradio_api/upload", "/upload/", "/gradio_api/upload_progress", "/gradio_api/call/chat"):
        asyncio.run(middleware({"type": "http", "path": path}, None, send))
    assert sent[0]["status"] == 403 and sent[2]["status"] == 403 and len(sent) == 4
    assert reached == ["/gradio_api/upload_progress", "/gradio_api/call/chat"]


@pytest.mark.slow
def test_ui_server_refuses_uploads_and_hides_exception_text():
    """The real server (`serve`): POST /gradio_api/upload -> 403, nothing stored; a failing request -> the generic
    line, never the exception's text."""
    import socket
    import urllib.error
    import urllib.request

    from verse import ModelArgs, ReasoningLLM, load_tokenizer
    from verse.infer.ui import INTERNAL_ERROR, serve

    tok = load_tokenizer("byte")
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size)).eval()

    class Failing:
        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, *args, **kwargs):
            raise RuntimeError("SECRET /etc/shadow")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(model, Failing(), port=port, generation={"max_new_tokens": 2}, block=False)
    try:
        base = f"http://127.0.0.1:{port}/gradio_api"
        body = (b'--X\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n' + b"A" * 1000
                + b"\r\n--X--\r\n")
        request = urllib.request.Request(base + "/upload", data=body,
                                         headers={"Content-Type": "multipart/form-data; boundary=X"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 403
        request = urllib.request.Request(base + "/call/chat", data=json.dumps({"data": ["hi", "", 0, 1, 2]}).encode(),
                                         headers={"Content-Type": "application/json"})
        event = json.loads(urllib.request.urlopen(request).read())["event_id"]
        answer = urllib.request.urlopen(f"{base}/call/chat/{event}").read().decode()
        assert INTERNAL_ERROR in answer and "SECRET" not in answer
    finally:
        demo.close()


# ---- chat templates ----

def with_template(checkpoint, tmp_path, template):
    path = edited(checkpoint, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("template, expect", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% include 'other.jinja' %}", "chat template failed"),
    ("{% include %}", "does not parse"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{{ 'x' * 10 ** 10 }}", "10000000000 items"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "items"),
    ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}", "items"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "output passed"),
    (5, "'chat_template' must be a string"),
    ({"a": 1}, "'chat_template' must be a string"),
])
def test_hostile_chat_templates_end_in_one_line(checkpoint, tmp_path, capsys, monkeypatch, template, expect):
    """Each was a traceback, a hang or a multi-GB string; bounded by time (0.5 s for the loops), output and value
    sizes."""
    import time

    from verse.tokenization import chat

    if "longer than" in expect:  # the size limits must win on their own, however loaded the machine
        monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.5)
    path = with_template(checkpoint, tmp_path, template)
    start = time.perf_counter()
    assert_one_line(capsys, path, "--chat", *GEN, expect=(expect,))
    assert time.perf_counter() - start < 20


def test_template_time_limit_leaves_the_thread_usable(monkeypatch):
    """The interrupt is delivered only inside the render: later code in the same thread runs undisturbed."""
    import time

    from verse.errors import VerseError
    from verse.tokenization import chat

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.2)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(VerseError, match="longer than"):
        chat.render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", messages)
    assert chat.render("{{ messages[0].content }}", messages) == "hi"
    time.sleep(0.4)  # past a second deadline, had a timer survived
    assert sum(range(10**6)) == 499999500000


# ---- tokenizer crashes in data workers ----

def regex_tokenizer(path):
    """A tokenizer.json whose pre-tokenizer regex backtracks without bound on long runs of "a"."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    path.mkdir()
    tok = Tokenizer(models.BPE({chr(c): i for i, c in enumerate(range(32, 127))}, [], unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "~"}))
    return path


@pytest.mark.timeout(120)
def test_catastrophic_regex_is_a_counted_bad_record_not_a_dead_worker(tmp_path, capsys):
    """Oniguruma's backtracking limit surfaces as a Rust panic (a BaseException) that killed the tokenizer
    worker; `verse data stats` then waited forever for the lost task. Now it is one bad record."""
    tokenizer = regex_tokenizer(tmp_path / "tok")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "hello " + "a" * (20 if i % 2 else 100000) + "!"}) + "\n"
                            for i in range(10)))
    code = main(["data", "stats", "--source", str(data), "--tokenizer", str(tokenizer), "--max-seq-len", "64",
                 "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 0 and stats["records"] == 5 and stats["bad_by_reason"] == {"tokenizer_error": 5}


class _DyingTokenizer:
    """Every use ends the (forked worker) process, as a segfault or the OOM killer would."""

    def __getattr__(self, name):
        os._exit(3)


@pytest.mark.timeout(60)
def test_a_dead_worker_ends_the_run_with_one_line():
    """multiprocessing.Pool lost the dead worker's task and `get()` waited forever."""
    from verse.data.encode import Encoder
    from verse.errors import VerseError

    encoder = Encoder(_DyingTokenizer(), 1, max_seq_len=16, train_on="all_assistant", truncation="truncate")
    try:
        with pytest.raises(VerseError, match="worker process died"):
            list(encoder.map(iter([("tag", [(0, "some text", "data.jsonl:1")])])))
    finally:
        encoder.close()
