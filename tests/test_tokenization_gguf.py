"""The SmolLM2 GGUF tokenizer and Hugging Face tokenizer.json directories, against transformers' GGUF loader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) and transformers' tokenizer.json loader."""

import json

import pytest

import verse
from verse.assets import smollm2_gguf
from verse.errors import VerseError
from verse.tokenization.hf import HFTokenizer, bytes_to_unicode

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'll say it's DON'T, you're WE'VE they'd",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "日本語のテキストと中文文本，還有한국어 문장。",
    "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨🔥",
    "مرحبا بالعالم، كيف حالك؟",
    "   leading and trailing   \t\t\n\n\n   \r\n  ",
    "1234567890123456789012345678901234567890 3.14159265358979 -42 1e-10 0x1F 1,000,000",
    "naïve café résumé Ωmega",
    "<think>Let me reason: 2+2=4.</think>The answer is 4.",
]
SPECIAL_TEXT = "a<|im_start|>b<|im_end|>c<|endoftext|>"
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
    {"role": "user", "content": "And 3*3?"},
    {"role": "assistant", "content": "9"},
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smol():
    return verse.load_tokenizer(smollm2_gguf())


def test_gguf_matches_transformers(smol, reference):
    assert isinstance(smol, HFTokenizer)
    assert [smol.encode(t) for t in CORPUS] == [reference.encode(t, add_special_tokens=False) for t in CORPUS]
    assert smol.encode_batch(CORPUS) == [reference.encode(t, add_special_tokens=False) for t in CORPUS]
    assert all(smol.decode(smol.encode(t)) == t for t in CORPUS)
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert smol.vocab_size == len(reference) == 49152
    assert smol.chat_template == reference.chat_template
    assert smol.encode(SPECIAL_TEXT, allowed_special="all") == reference.encode(SPECIAL_TEXT, add_special_tokens=False)
    assert smol.encode(SPECIAL_TEXT) == reference.encode(SPECIAL_TEXT, add_special_tokens=False,
                                                         split_special_tokens=True)
    assert reference.convert_ids_to_tokens(sorted(smol.stop_ids)) == ["<|im_end|>"]
    assert smol.add_bos is False  # tokenizer.ggml.add_bos_token; transformers adds no BOS either
    assert reference.encode("hi") == reference.encode("hi", add_special_tokens=False)


def test_gguf_isolates_every_number_like_llama_cpp(smol, reference):
    # tokenizer.ggml.pre = "smollm": llama.cpp splits each \p{N} code point off before the GPT-2 regex.
    # transformers' GGUF loader ignores the pre-tokenizer type, so build the expected ids from its vocabulary.
    spell = bytes_to_unicode()
    pieces = ["Ġx", "".join(spell[b] for b in "²".encode()), "".join(spell[b] for b in "³".encode()), "Ġ",
              "2", "0", "2", "4"]
    assert smol.encode(" x²³ 2024") == reference.convert_tokens_to_ids(pieces)


def test_gguf_chat_matches_transformers(smol, reference):
    for add_generation_prompt in (False, True):
        text = smol.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert text == reference.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt,
                                                     tokenize=False)
        ids = reference.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True)["input_ids"]
        assert smol.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt) == list(ids)
    enc = smol.encode_chat(CONVERSATION)
    trained = reference.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    untrained = reference.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert "You are a helpful AI assistant named SmolLM" in untrained  # the template's default system turn

    # SmolLM2's template knows nothing of drop_history_think: Verse strips history <think> from the messages.
    dropped = smol.encode_chat(CONVERSATION, drop_history_think=True)
    assert reference.decode([i for i, m in zip(dropped.input_ids, dropped.loss_mask) if m]) == (
        "The answer is 4.<|im_end|>9<|im_end|>")


def test_hf_directory_round_trip(smol, reference, tmp_path):
    from transformers import AutoTokenizer

    smol.save_pretrained(tmp_path)
    loaded = verse.load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.chat_template == smol.chat_template
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (smol.bos_id, smol.eos_id, smol.pad_id)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert loaded.encode(text) == hf.encode(text, add_special_tokens=False) == smol.encode(text)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == loaded.apply_chat_template(CONVERSATION,
                                                                                            tokenize=False)
    assert verse.load_tokenizer(tmp_path / "tokenizer.json").encode(CORPUS[0]) == smol.encode(CORPUS[0])


def test_hf_directory_config_variants(smol, tmp_path):
    smol.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.pop("chat_template")
    config["eos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}  # older schema
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = verse.load_tokenizer(tmp_path)
    assert tok.chat_template == template
    assert tok.eos_id == 0 and tok.stop_ids == {0, 2}

    (tmp_path / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    config_path.write_text(json.dumps(config))
    assert verse.load_tokenizer(tmp_path).chat_template == template

    # No add_bos_token in the config: the post-processor decides, as in Llama 3's tokenizer.json.
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    config.pop("add_bos_token", None)
    config.update(bos_token="<|im_start|>", eos_token="<|endoftext|>")
    config_path.write_text(json.dumps(config))
    tok = verse.load_tokenizer(tmp_path)
    assert tok.add_bos and AutoTokenizer.from_pretrained(tmp_path).encode("hi")[:1] == [tok.bos_id] == [1]
    assert tok.encode("hi") == smol.encode("hi")  # encode itself never adds BOS

    config_path.write_text("{broken")
    with pytest.raises(VerseError, match="tokenizer_config.json"):
        verse.load_tokenizer(tmp_path)


def test_gguf_decode_never_raises(smol, reference):
    assert smol.decode([81, -3, 10**12, 82, 49152]) == "a\ufffd\ufffdb\ufffd"
    lead_byte = reference.convert_tokens_to_ids(bytes_to_unicode()[0xC3])  # first byte of a 2-byte character
    assert smol.decode([81, lead_byte]) == "a\ufffd"


# ---- SentencePiece GGUF (tokenizer.ggml.model = "llama": Llama 2, Mistral) ------------------------------------
SPM_PIECES = ["▁", "t", "h", "e", "a", "c", "s", "i", "o", "n", "d", "g", "r", "▁t", "he", "▁the", "at", "▁c",
              "▁cat", "▁a", "▁is", "is", "on", "▁on", "▁d", "og", "▁dog", "in", "ing", "▁s", "▁sing", "er", "▁▁",
              "▁▁▁▁"]
SPM_TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A tiny Llama GGUF with a SentencePiece vocabulary: control, byte (<0xNN>) and scored pieces, no merges."""
    import gguf

    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(SPM_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    tok = verse.load_tokenizer(spm_gguf)
    texts = ["the cat is on the dog singing", "  leading", "trailing  ", "a\nb", " ", "théâtre 日本 😀", ""]
    assert [tok.encode(t) for t in texts] == [reference.encode(t, add_special_tokens=False) for t in texts]
    # Metaspace adds no "▁" to text that starts with a space, and decoding strips one: as transformers does.
    assert [tok.decode(tok.encode(t)) for t in texts] == [reference.decode(tok.encode(t)) for t in texts]
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert tok.encode("<s>x</s>", allowed_special="all") == reference.encode("<s>x</s>", add_special_tokens=False)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (reference.bos_token_id, reference.eos_token_id, True)
    assert reference.encode("the") == [tok.bos_id] + tok.encode("the")  # llama.cpp/transformers add BOS
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "is on the dog"},
                {"role": "user", "content": "sing"}, {"role": "assistant", "content": " a dog"}]
    enc = tok.encode_chat(messages)
    assert enc.input_ids == list(reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "is on the dog</s> a dog</s>"
