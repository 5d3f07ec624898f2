"""Qwen2.5 / Qwen3 / Llama 3.x tokenizers and their published chat templates (tests/fixtures/chat_templates) against
transformers' AutoTokenizer loaded from the same directory: ids, renders, the assistant loss mask, Qwen3's
`enable_thinking` and its dropping of earlier turns' reasoning, and `--thinking` on the command line and the server.
"""

import json
import re
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import verse
from verse.errors import VerseError

TEMPLATES = ("qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "llama-3.2-instruct")
SYSTEM = {"role": "system", "content": "You are a careful reasoner."}
CONVERSATIONS = [
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    [SYSTEM,
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>\ntwo plus two\n</think>\n\nThe answer is 4."},
     {"role": "user", "content": "And 3*3?"},
     {"role": "assistant", "content": "<think>Three threes.</think>9"}],
    [{"role": "user", "content": "Write code"},
     {"role": "assistant", "content": "<think>a loop</think>\n```python\nfor i in range(3):\n    print(i)\n```"},
     {"role": "user", "content": "日本語で？ 😀"},
     {"role": "assistant", "content": "はい、できます。"}],
    [SYSTEM, {"role": "user", "content": "Hello <think> and <|im_end|> typed by a user"},
     {"role": "assistant", "content": "<think>\n\n</think>\n\nfine"}, {"role": "user", "content": "bye"}],
]
# What opens and closes a reply in each family: the oracle's view of the rendered text.
HEADER = {"qwen": "<|im_start|>assistant\n", "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
END = {"qwen": "<|im_end|>", "llama": "<|eot_id|>"}


def family(name):
    return "llama" if name.startswith("llama") else "qwen"


def thinking_cases(name):
    return [None, True, False] if name == "qwen3" else [None]


@pytest.fixture(scope="module")
def pair(published_tokenizers):
    """name -> (Verse tokenizer, transformers tokenizer) of the same directory."""
    from transformers import AutoTokenizer

    return {name: (verse.load_tokenizer(path), AutoTokenizer.from_pretrained(path))
            for name, path in published_tokenizers.items()}


def kwargs_of(thinking):
    return {} if thinking is None else {"enable_thinking": thinking}


def oracle_mask(hf, text, n_replies, fam, thinking):
    """Assistant-token mask from transformers' render alone: each reply runs from the end of its header (and of an
    empty `<think>` block a prompt with enable_thinking=False closes) through its end token."""
    header = re.escape(HEADER[fam]) + ("(<think>\n\n</think>\n\n)?" if thinking is False else "")
    spans = []
    for match in list(re.finditer(header, text))[:n_replies]:
        end = text.index(END[fam], match.end()) + len(END[fam])
        spans.append((match.end(), end))
    offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [any(s <= start < e for s, e in spans) for start, _ in offsets]


@pytest.mark.parametrize("name", TEMPLATES)
def test_encode_and_decode_match_transformers(pair, name):
    tok, hf = pair[name]
    texts = ["Hello, how are you today?", "  two  spaces\n\n\nand newlines\t", "日本語で？ 😀", "x" * 50,
             "<think>\nreasoning\n</think>\n\nanswer", "<|im_start|>user\n<|eot_id|><|begin_of_text|>"]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, allowed_special="all") == ids
        assert tok.decode(ids) == hf.decode(ids)
    assert tok.vocab_size == len(hf)
    assert tok.eos_id == hf.eos_token_id and tok.bos_id == hf.bos_token_id
    assert tok.add_bos == (hf("x")["input_ids"][0] == hf.bos_token_id)  # Llama 3 starts documents with BOS


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_render_ids_and_mask_match_transformers(pair, name, index):
    tok, hf = pair[name]
    messages = CONVERSATIONS[index]
    replies = sum(m["role"] == "assistant" for m in messages)
    for thinking in thinking_cases(name):
        for prompt in (False, True):
            kwargs = dict(add_generation_prompt=prompt, **kwargs_of(thinking))
            text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
            assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == text
            ours = tok.encode_chat(messages, **kwargs)
            assert ours.input_ids == list(hf.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"])
            assert ours.loss_mask == oracle_mask(hf, text, replies, family(name), thinking)


PIECES = st.sampled_from(["a", "b c", " ", "\n", "<think>", "</think>", "x\n\n", "日本"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(st.lists(PIECES, max_size=6).map("".join), min_size=2, max_size=6),
       name=st.sampled_from(["qwen3", "qwen2.5-instruct", "llama-3.1-instruct"]),
       thinking=st.sampled_from([None, False]))
def test_mask_matches_transformers_for_any_contents(pair, contents, name, thinking):
    """Replies made of whitespace, stray or unclosed <think> tags and text: ids and mask as the oracle says."""
    tok, hf = pair[name]
    thinking = thinking if name == "qwen3" else None
    messages = [{"role": role, "content": c} for role, c in zip(["user", "assistant"] * 3, contents)]
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs_of(thinking))
    enc = tok.encode_chat(messages, **kwargs_of(thinking))
    assert enc.input_ids == list(hf.apply_chat_template(messages, return_dict=True, **kwargs_of(thinking))["input_ids"])
    replies = sum(m["role"] == "assistant" for m in messages)
    assert enc.loss_mask == oracle_mask(hf, text, replies, family(name), thinking)


def test_qwen3_drops_earlier_reasoning_and_trains_the_last(pair):
    tok, hf = pair["qwen3"]
    messages = CONVERSATIONS[1]
    enc = tok.encode_chat(messages)
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
    # the first reply's reasoning is gone from the render (Qwen3's template), the last one's is rewritten canonically
    assert trained == "The answer is 4.<|im_end|><think>\nThree threes.\n</think>\n\n9<|im_end|>"
    assert "two plus two" not in hf.apply_chat_template(messages, tokenize=False)
    last = tok.encode_chat(messages, train_on="last_assistant")
    assert tok.decode([i for i, m in zip(last.input_ids, last.loss_mask) if m]) == trained.split("<|im_end|>")[1] + \
        "<|im_end|>"
    # a reply without reasoning: the template writes an empty <think> block, part of what the model generates
    plain = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    enc = tok.encode_chat(plain)
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "<think>\n\n</think>\n\nhi<|im_end|>"
    # with enable_thinking=False that empty block belongs to the prompt, and the reply is the answer alone
    enc = tok.encode_chat(plain, enable_thinking=False)
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "hi<|im_end|>"


def test_qwen3_enable_thinking_switch(pair):
    from verse.infer.chat import chat_prompt, opens_in_think

    tok, hf = pair["qwen3"]
    messages = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    on = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    off = hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                 return_dict=True)["input_ids"]
    assert hf.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and on != off
    assert chat_prompt(tok, messages) == list(on)
    assert chat_prompt(tok, messages, enable_thinking=False) == list(off)
    tok.set_thinking(False)
    try:
        assert chat_prompt(tok, messages) == list(off)  # every later render, as `--thinking off`
        assert chat_prompt(tok, messages, enable_thinking=True) == list(on)  # a call's own setting wins
        assert not opens_in_think(tok, messages)
        assert "enable_thinking" not in tok.tokenizer_config()  # a setting of this session, never saved
    finally:
        tok.set_thinking(None)
    assert chat_prompt(tok, messages) == list(on)


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.1-instruct"])
def test_thinking_switch_needs_a_template_that_has_it(pair, name):
    tok, _ = pair[name]
    with pytest.raises(VerseError, match="no enable_thinking switch") as info:
        tok.set_thinking(False)
    assert "\n" not in str(info.value)
    tok.set_thinking(None)  # the default is always fine


def test_llama_32_today_date_as_transformers(pair):
    tok, hf = pair["llama-3.2-instruct"]
    messages = CONVERSATIONS[0]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert f"Today Date: {datetime.now():%d %b %Y}\n" in text  # strftime_now, as transformers offers it
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert "Today Date: 26 Jul 2024" in tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")


def test_generation_blocks_mask_matches_transformers(published_tokenizers, tmp_path):
    """Qwen2.5's template with each reply in `{% generation %}`: the mask equals transformers'
    `return_assistant_tokens_mask`."""
    from transformers import AutoTokenizer

    from conftest import published_template, write_bpe_tokenizer

    source = published_template("qwen2.5-instruct")
    branch = '{%- if (message.role == "user")'
    assert branch in source
    source = source.replace(branch, (
        '{%- if message.role == "assistant" and not message.tool_calls %}'
        "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}"
        "{{- '\\n' }}" + branch.replace("if", "elif", 1)))
    path = write_bpe_tokenizer(tmp_path, "qwen", source)
    tok, hf = verse.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            theirs = hf.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True,
                                            return_assistant_tokens_mask=True)
            ours = tok.encode_chat(messages, add_generation_prompt=prompt)
            assert ours.input_ids == list(theirs["input_ids"])
            assert ours.loss_mask == [bool(m) for m in theirs["assistant_masks"]]
            assert any(ours.loss_mask)


def test_stop_ids_end_each_family(pair):
    for name in TEMPLATES:
        tok, hf = pair[name]
        assert hf.convert_tokens_to_ids(END[family(name)]) in tok.stop_ids


@pytest.fixture(scope="module")
def qwen3_checkpoint(published_tokenizers, tmp_path_factory):
    """A random tiny model saved with the Qwen3 tokenizer and template."""
    import torch

    from verse import ModelArgs, ReasoningLLM

    tok = verse.load_tokenizer(published_tokenizers["qwen3"])
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("qwen3_ckpt")
    model.save_pretrained(path, tokenizer=tok)
    return path


def test_cli_thinking_flag(pair, qwen3_checkpoint, tiny_byte_checkpoint, capsys):
    from verse.cli import main

    _, hf = pair["qwen3"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    for flag, kwargs in (("on", {}), ("off", {"enable_thinking": False})):
        assert main(["generate", str(qwen3_checkpoint), "--prompt", "What is 2+2?", "--chat", "--thinking", flag,
                     "--max-new-tokens", "2", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, **kwargs)
        assert out["prompt_tokens"] == len(expected["input_ids"])
    assert main(["generate", str(tiny_byte_checkpoint), "--prompt", "x", "--chat", "--thinking", "off"]) == 2
    err = capsys.readouterr().err
    assert "no enable_thinking switch" in err and err.count("\n") == 1


def test_server_chat_template_kwargs(pair, qwen3_checkpoint):
    from verse.infer.engine import Engine
    from verse.infer.runtime import load_for_inference
    from verse.infer.serve import BadRequest, Server

    _, hf = pair["qwen3"]
    model, tok = load_for_inference(str(qwen3_checkpoint))
    server = Server(Engine(model.eval(), tok, 1, 64), tok, "qwen3")
    messages = [{"role": "user", "content": "Hi"}]
    for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        request = server.parse({"messages": messages, "max_tokens": 4, "chat_template_kwargs": kwargs}, chat=True)[0]
        assert request.prompt == list(hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                             **kwargs)["input_ids"])
    for bad in ("on", {"enable_thinking": "no"}, {"tools": []}):
        with pytest.raises(BadRequest, match="chat_template_kwargs"):
            server.parse({"messages": messages, "max_tokens": 4, "chat_template_kwargs": bad}, chat=True)


def test_data_enable_thinking(pair, published_tokenizers, tmp_path):
    """`data.enable_thinking: false` trains each reply without the empty <think> block the prompt then holds;
    the loader (workers included) and `verse data preview` tokenize alike; a template without the switch is refused."""
    from verse.data.config import DataConfig
    from verse.data.loader import DataLoader
    from verse.data.preview import preview_examples
    from verse.errors import ConfigError

    tok, hf = pair["qwen3"]
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    for thinking, trained in ((None, "<think>\n\n</think>\n\nhi<|im_end|>"), (False, "hi<|im_end|>")):
        cfg = DataConfig.from_dict({"sources": [str(path)], "enable_thinking": thinking, "num_workers": 1,
                                    "pack": False, "cycle": False})
        enc = preview_examples(cfg, tok, n=1)[0]
        assert tok.decode(enc.ids[enc.mask]) == trained
        batch = next(iter(DataLoader(cfg, tok, max_seq_len=64, micro_batch_size=1, seed=0)))
        ids = batch["input_ids"][0][: len(enc.ids)].tolist()
        assert ids == enc.ids.tolist() == list(hf.apply_chat_template(messages, return_dict=True)["input_ids"])
    cfg = DataConfig.from_dict({"sources": [str(path)], "enable_thinking": False})
    with pytest.raises(ConfigError, match="enable_thinking"):
        DataLoader(cfg, verse.load_tokenizer("byte"), max_seq_len=64, micro_batch_size=1, seed=0)
