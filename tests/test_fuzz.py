"""Fuzzing the readers of user files through the real CLI: every input ends in success (exit 0) or in exit 2 with
one `verse CMD: error:` line, fast; never a traceback, never a hang (a per-example alarm), never another code.

Readers: safetensors header, GGUF header and metadata, config.json, tokenizer_config.json, JSONL records and the
training YAML. Budgets are small (`max_examples`) to keep the fast suite fast; the hang guard for a whole process
is in tests/test_hostile.py (subprocess cases).
"""

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verse.cli import main

# VERSE_FUZZ_EXAMPLES=500 for a longer, randomized hunt; the fast suite runs a fixed 25 per reader
EXAMPLES = int(os.environ.get("VERSE_FUZZ_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 25, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALARM_S = 20  # one example: a hang fails the test instead of stalling the suite

# JSON values of every shape: the kinds a hostile file holds (deep nesting is covered in test_hostile.py)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=6)


class _Hang(Exception):
    pass


@contextmanager
def _alarm(seconds: int = ALARM_S):
    def fire(*_):
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys, *argv):
    """The CLI in-process: asserts exit 0, or exit 2 with exactly one error line; never a traceback."""
    command = argv[0]
    try:
        with _alarm():
            code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith(f"verse {command}: error:")]
    assert code in (0, 2), f"exit {code}: {out.err[-2000:]}"
    if code == 2:
        assert len(errors) == 1, out.err[-2000:]
    assert "Traceback" not in out.err
    return code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verse import ModelArgs, ReasoningLLM
    from verse.tokenization import load_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    args = ModelArgs.from_preset("tiny", dtype="float32", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, inter_dim=32,
                                 vocab_size=261, max_seq_len=64)
    ReasoningLLM(args).save_pretrained(path, load_tokenizer("byte"))
    (path / "verse.json").unlink()  # config.json is what a downloaded checkpoint brings
    return path


@pytest.fixture
def scratch(tmp_path):
    return tmp_path


def _copy(checkpoint, scratch, name="ck"):
    target = scratch / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(checkpoint, target)
    return target


GEN = ("--prompt", "hi", "--max-new-tokens", "1")
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "rms_norm_eps", "max_position_embeddings", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "model_type", "sliding_window", "eos_token_id", "bos_token_id",
               "hidden_act", "attention_bias"]


@SETTINGS
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, min_size=1, max_size=3))
def test_fuzz_config_json(checkpoint, scratch, capsys, changes):
    path = _copy(checkpoint, scratch)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    run_cli(capsys, "generate", path, *GEN)


TOKENIZER_KEYS = ["chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token",
                  "added_tokens_decoder", "model_max_length", "additional_special_tokens"]


@SETTINGS
@given(st.dictionaries(st.sampled_from(TOKENIZER_KEYS), VALUES, min_size=1, max_size=3))
def test_fuzz_tokenizer_config_json(checkpoint, scratch, capsys, changes):
    path = _copy(checkpoint, scratch)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    run_cli(capsys, "generate", path, "--chat", *GEN)


@SETTINGS
@given(st.data())
def test_fuzz_safetensors_header(checkpoint, scratch, capsys, data):
    path = _copy(checkpoint, scratch)
    raw = (path / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    how = data.draw(st.sampled_from(["entry", "length", "truncate", "bytes"]))
    if how == "entry":  # one tensor's dtype / shape / offsets replaced
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        dtypes = st.sampled_from(["U8", "I64", "BOOL", "F8_E5M2", "F64", "X"])
        header[name][field] = data.draw(dtypes if field == "dtype" else st.lists(st.integers(-5, 2**40), max_size=3))
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + raw[8 + size:]
    elif how == "length":
        raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        at = data.draw(st.integers(0, 8 + size - 1))
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at + 8:]
    (path / "model.safetensors").write_bytes(raw)
    run_cli(capsys, "generate", path, *GEN)


GGUF_META = {"llama.context_length": 64, "llama.embedding_length": 32, "llama.block_count": 1,
             "llama.feed_forward_length": 32, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """Tiny F32 Llama GGUF files: `make(without)` -> (bytes, where the header ends) of the file lacking metadata
    key `without` (a fuzzed entry for that key is then the only one)."""
    from functools import lru_cache

    from verse.interop.gguf_header import read_header

    folder = tmp_path_factory.mktemp("fuzzg")

    @lru_cache(maxsize=None)
    def make(without: str = ""):
        rng = np.random.default_rng(0)
        path = folder / f"t{len(list(folder.iterdir()))}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        for key, value in GGUF_META.items():
            if key != without:
                writer.add_uint32(key, value)
        if without != "llama.attention.layer_norm_rms_epsilon":
            writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        tokenizer = {"tokenizer.ggml.model": lambda: writer.add_tokenizer_model("gpt2"),
                     "tokenizer.ggml.tokens": lambda: writer.add_token_list([chr(c) for c in range(33, 97)]),
                     "tokenizer.ggml.merges": lambda: writer.add_token_merges(["! \"", "# $"]),
                     "tokenizer.ggml.token_type": lambda: writer.add_token_types([1] * 63 + [3]),
                     "tokenizer.ggml.eos_token_id": lambda: writer.add_eos_token_id(63),
                     "tokenizer.chat_template": lambda: writer.add_chat_template("{{ messages[0].content }}")}
        for key, add in tokenizer.items():
            if key != without:
                add()
        shapes = {"token_embd.weight": (64, 32), "output.weight": (64, 32), "output_norm.weight": (32,),
                  "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32), "blk.0.attn_v.weight": (16, 32),
                  "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_gate.weight": (32, 32),
                  "blk.0.ffn_up.weight": (32, 32), "blk.0.ffn_down.weight": (32, 32),
                  "blk.0.attn_norm.weight": (32,), "blk.0.ffn_norm.weight": (32,)}
        for name, shape in shapes.items():
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes(), min(t.offset for t in read_header(path)[1])  # the header ends where data begins

    return make


GGUF_KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.attention.key_length", "llama.rope.freq_base", "llama.rope.scaling.type", "llama.vocab_size",
             "general.architecture", "general.alignment", "tokenizer.ggml.eos_token_id", "verse.model_args",
             "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.chat_template",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.scores"]


def _gguf_value(draw_value):
    """A (type, packed bytes) GGUF metadata value from a JSON-like value."""
    if draw_value is None:
        return 0, b"\x00"
    if isinstance(draw_value, bool):
        return 7, struct.pack("<?", draw_value)
    if isinstance(draw_value, int):
        return (10, struct.pack("<Q", draw_value)) if 0 <= draw_value < 2**64 else (11, struct.pack("<q", 0))
    if isinstance(draw_value, float):
        return 12, struct.pack("<d", draw_value)
    if isinstance(draw_value, str):
        data = draw_value.encode()
        return 8, struct.pack("<Q", len(data)) + data
    items = [_gguf_value(v) for v in (draw_value if isinstance(draw_value, list) else list(draw_value.values()))]
    kind = items[0][0] if items and all(k == items[0][0] for k, _ in items) else 0
    if kind == 0:
        return 9, struct.pack("<IQ", 0, len(items)) + bytes(len(items))
    return 9, struct.pack("<IQ", kind, len(items)) + b"".join(v for _, v in items)


@SETTINGS
@given(st.data())
def test_fuzz_gguf(gguf_files, scratch, capsys, data):
    how = data.draw(st.sampled_from(["metadata", "bytes", "truncate"]))
    if how == "metadata":  # a key with a value of any type (or none of the right shape)
        key = data.draw(st.sampled_from(GGUF_KEYS))
        raw, _ = gguf_files(key)
        kind, value = _gguf_value(data.draw(VALUES))
        n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
        entry = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
        raw = raw[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + entry + raw[24:]
    else:
        raw, header_end = gguf_files()
        if how == "bytes":
            at = data.draw(st.integers(0, header_end - 1))
            raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at + 8:]
        else:
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path = scratch / "f.gguf"
    path.write_bytes(raw)
    run_cli(capsys, "generate", path, "--chat", *GEN)  # the file's own tokenizer and chat template


RECORD_KEYS = ["text", "messages", "conversations", "system", "input", "output", "role", "content", "from", "value"]


@SETTINGS
@given(st.lists(st.one_of(VALUES, st.dictionaries(st.sampled_from(RECORD_KEYS), VALUES, max_size=3),
                          st.text(max_size=20)), min_size=1, max_size=6))
def test_fuzz_jsonl_records(scratch, capsys, records):
    path = scratch / "data.jsonl"
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records))
    run_cli(capsys, "data", "stats", "--source", path, "--tokenizer", "byte", "--max-seq-len", "32")


TRAIN_KEYS = ["model", "mode", "lr", "max_steps", "seed", "tokenizer", "out_dir", "data", "micro_batch_size",
              "seq_len", "parallel", "finetune", "warmup_steps", "device", "param_dtype", "optimizer"]


@SETTINGS
@given(st.one_of(st.dictionaries(st.sampled_from(TRAIN_KEYS), VALUES, max_size=4), VALUES, st.text(max_size=40)))
def test_fuzz_training_yaml(scratch, capsys, config):
    path = scratch / "train.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    run_cli(capsys, "plan", path)
