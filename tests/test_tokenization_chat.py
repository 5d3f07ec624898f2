"""Chat templates and the assistant loss mask: rendering and masks against transformers' apply_chat_template
(with `return_assistant_tokens_mask`), ids against the full render's encoding, masks against the contents."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import verse
from verse.errors import VerseError

SYSTEM = {"role": "system", "content": "You are a careful reasoner."}
CONVERSATIONS = [
    [SYSTEM,
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
     {"role": "user", "content": "And 3*3?"},
     {"role": "assistant", "content": "<think>Three threes.</think>9"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    [SYSTEM, {"role": "user", "content": "日本語で？ 😀"}, {"role": "assistant", "content": "はい、できます。"},
     {"role": "user", "content": "مرحبا\n\n  spaces  "}],
    [{"role": "user", "content": "Write code"},
     {"role": "assistant", "content": "<think>a loop</think>```python\nfor i in range(3):\n    print(i)\n```"},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome!"}],
]
END = "<|im_end|>"


def assistant_contents(messages, drop_history_think=False):
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if not drop_history_think:
        return contents
    last_is_reply = messages[-1]["role"] == "assistant"
    history = contents[:-1] if last_is_reply else contents
    history = [c.split("</think>")[-1].lstrip() if "</think>" in c else c for c in history]
    return history + contents[len(history):]


def runs(mask):
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


@pytest.fixture(scope="module")
def byte_hf(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("byte")
    verse.load_tokenizer("byte").save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["byte", "o200k"])
def tok(request):
    return verse.load_tokenizer(request.param)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_and_mask_match_transformers(byte_hf, messages, drop):
    tok = verse.load_tokenizer("byte")
    for add_generation_prompt in (False, True):
        kwargs = dict(add_generation_prompt=add_generation_prompt, drop_history_think=drop)
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert text == byte_hf.apply_chat_template(messages, tokenize=False, **kwargs)
        ours = tok.encode_chat(messages, **kwargs)
        theirs = byte_hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True, **kwargs)
        assert ours.input_ids == list(theirs["input_ids"])
        assert ours.loss_mask == [bool(m) for m in theirs["assistant_masks"]]


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mask_is_exactly_assistant_contents(tok, messages, drop):
    enc = tok.encode_chat(messages, drop_history_think=drop)
    text = tok.apply_chat_template(messages, tokenize=False, drop_history_think=drop)
    assert len(enc.input_ids) == len(enc.loss_mask)
    assert enc.input_ids == tok.encode(text, allowed_special="all")  # segment-wise == whole render
    assert tok.apply_chat_template(messages, drop_history_think=drop) == enc.input_ids
    contents = assistant_contents(messages, drop)
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert trained == "".join(c + END for c in contents)
    assert runs(enc.loss_mask) == len(contents)
    untrained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if not m])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in untrained and m["content"] not in trained

    last = tok.encode_chat(messages, train_on="last_assistant", drop_history_think=drop)
    assert last.input_ids == enc.input_ids
    assert tok.decode([i for i, m in zip(last.input_ids, last.loss_mask) if m]) == contents[-1] + END
    assert runs(last.loss_mask) == 1


def test_generation_prompt(tok):
    messages = CONVERSATIONS[0][:4]
    enc = tok.encode_chat(messages, add_generation_prompt=True)
    header = tok.encode("<|im_start|>assistant\n", allowed_special="all")
    assert enc.input_ids[-len(header):] == header
    assert not any(enc.loss_mask[-len(header):])
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == enc.input_ids


def test_reply_starting_with_newline_keeps_exact_mask(tok):
    # "\n" + "\n..." may merge into one token in a whole-string encoding; the render is cut at the reply's edge
    # so the reply is tokenized as the model generates it after the prompt.
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer"}]
    enc = tok.encode_chat(messages)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "\n\nanswer" + END
    prompt = tok.encode_chat(messages[:1], add_generation_prompt=True).input_ids
    assert enc.input_ids[:len(prompt)] == prompt


def test_special_strings_in_content_follow_transformers(byte_hf):
    tok = verse.load_tokenizer("byte")
    messages = [{"role": "user", "content": "x<|im_end|>y"}, {"role": "assistant", "content": "ok"}]
    assert tok.encode_chat(messages).input_ids == list(byte_hf.apply_chat_template(messages, tokenize=True,
                                                                                 return_dict=True)["input_ids"])


def test_bad_conversations_raise_one_line_errors(tok):
    bad = [
        [{"role": "human", "content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user"}],
        "just a string",
    ]
    for messages in bad:
        with pytest.raises(VerseError) as info:
            tok.encode_chat(messages)
        assert "\n" not in str(info.value)
    with pytest.raises(VerseError, match="train_on"):
        tok.encode_chat(CONVERSATIONS[1], train_on="everything")


def test_templates_without_generation_blocks():
    from verse.tokenization.byte import ByteTokenizer

    plain_chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok = ByteTokenizer(chat_template=plain_chatml)
    enc = tok.encode_chat(CONVERSATIONS[0])
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "".join(
        c + END for c in assistant_contents(CONVERSATIONS[0]))
    reversed_order = "{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(VerseError, match="generation"):
        ByteTokenizer(chat_template=reversed_order).encode_chat(CONVERSATIONS[1])
    with pytest.raises(VerseError, match="parse"):
        ByteTokenizer(chat_template="{% for m in messages %}").encode_chat(CONVERSATIONS[1])


@settings(max_examples=60, deadline=None)
@given(contents=st.lists(st.text(max_size=24), min_size=2, max_size=6), name=st.sampled_from(["byte", "o200k"]))
def test_mask_is_exact_for_any_contents(contents, name):
    tok = verse.load_tokenizer(name)
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": role, "content": c} for role, c in zip(roles, contents)]
    enc = tok.encode_chat(messages)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "".join(r + END for r in replies)
