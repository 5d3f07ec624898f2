"""o200k and byte tokenizers against independent oracles: tiktoken's own o200k_base (official pattern, specials and
sha256 check), the `tokenizers` library and transformers loading our exported tokenizer.json."""

import gzip
import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import verse
from verse.errors import VerseError
from verse.tokenization import o200k as o200k_module
from verse.tokenization.byte import ByteTokenizer
from verse.tokenization.o200k import O200kTokenizer

# English, code, CJK, emoji (ZWJ, skin tones), Arabic, Hindi, Cyrillic, whitespace runs, long numbers, contractions.
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'll say it's DON'T, you're WE'VE they'd",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n\t// done",
    "日本語のテキストと中文文本，還有한국어 문장。",
    "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨🔥",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया", "Привет, мир! Ёжик.",
    "   leading and trailing   \t\t\n\n\n   \r\n  ",
    "1234567890123456789012345678901234567890 3.14159265358979 -42 1e-10 0x1F 1,000,000",
    "naïve café résumé Ωmega ﬁ ｆｕｌｌｗｉｄｔｈ e\u0301",
    "https://example.com/path?q=1&x=y#frag user@mail.org",
    "<think>Let me reason: 2+2=4.</think>The answer is 4.",
    "",
]
SPECIAL_TEXT = "a<|endoftext|>b<|endofprompt|>c<|im_start|>d<|im_end|>e"
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's own o200k_base: its pattern, its specials, its sha256 check; the file from its cache dir."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    data = gzip.decompress(o200k_module.o200k_ranks_path().read_bytes())
    (cache / hashlib.sha1(TIKTOKEN_URL.encode()).hexdigest()).write_bytes(data)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("o200k_base")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def o200k():
    return verse.load_tokenizer("o200k")


@pytest.fixture(scope="module")
def o200k_dir(o200k, tmp_path_factory):
    path = tmp_path_factory.mktemp("o200k")
    o200k.save_pretrained(path)
    return path


def test_o200k_matches_tiktoken_on_corpus(o200k, reference):
    assert [o200k.encode(t) for t in CORPUS] == [reference.encode_ordinary(t) for t in CORPUS]
    assert o200k.encode_batch(CORPUS) == reference.encode_ordinary_batch(CORPUS)
    assert all(o200k.decode(o200k.encode(t)) == t for t in CORPUS)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=64))
def test_o200k_matches_tiktoken_on_any_text(o200k, reference, text):
    assert o200k.encode(text) == reference.encode_ordinary(text)


def test_o200k_special_tokens(o200k, reference):
    assert o200k.vocab_size == 200019
    for name in ("<|endoftext|>", "<|endofprompt|>"):
        assert o200k.encode(name, allowed_special="all") == reference.encode(name, allowed_special="all")
        assert o200k.encode(name, allowed_special={name}) == reference.encode(name, allowed_special={name})
    assert o200k.encode(SPECIAL_TEXT) == reference.encode_ordinary(SPECIAL_TEXT)  # "none": plain text
    ids = o200k.encode(SPECIAL_TEXT, allowed_special="all")
    assert [i for i in ids if i >= 199998] == [199999, 200018, 200000, 200001]
    only_eot = o200k.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"})
    assert only_eot == reference.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"}, disallowed_special=())
    for token_id in (200000, 200001, 200002):  # Verse's chat markers sit on ids o200k_base leaves unused
        with pytest.raises(KeyError):
            reference.decode_single_token_bytes(token_id)
    assert {o200k.bos_id, o200k.eos_id, o200k.pad_id} == {199999, 200002}
    assert o200k.stop_ids == {199999, 200001}
    assert o200k.decode(ids) == SPECIAL_TEXT
    assert o200k.decode(ids, skip_special=True) == "abcde"
    with pytest.raises(VerseError):
        o200k.encode("x", allowed_special={"<|nope|>"})


def test_o200k_decode_never_raises(o200k):
    good = o200k.encode("héllo")
    assert o200k.decode(good + [199998, -1, 10**30, 200010] + good) == "héllo" + "\ufffd" * 4 + "héllo"
    split_char = o200k.encode("😀")  # one emoji is several byte tokens: a partial one decodes to U+FFFD
    assert "\ufffd" in o200k.decode(split_char[:1]) or len(split_char) == 1


def test_xenova_alias_is_o200k(reference):
    tok = verse.load_tokenizer("Xenova/gpt-4o")
    assert isinstance(tok, O200kTokenizer) and tok.name == "Xenova/gpt-4o"
    assert tok.encode(CORPUS[4]) == reference.encode_ordinary(CORPUS[4])


def test_o200k_ranks_sha256_is_checked(tmp_path, monkeypatch):
    data = gzip.decompress(o200k_module.o200k_ranks_path().read_bytes())
    corrupt = tmp_path / "o200k_base.tiktoken.gz"
    corrupt.write_bytes(gzip.compress(data.replace(b"IQ== 0", b"Ig== 0", 1)))
    with pytest.raises(VerseError, match="sha256"):
        o200k_module.load_ranks(corrupt)
    monkeypatch.setattr(o200k_module, "o200k_ranks_path", lambda: corrupt)
    o200k_module.o200k_ranks.cache_clear()
    o200k_module.o200k_encoding.cache_clear()
    try:
        with pytest.raises(VerseError, match="sha256"):
            verse.load_tokenizer("o200k")
    finally:
        monkeypatch.undo()
        o200k_module.o200k_ranks.cache_clear()
        o200k_module.o200k_encoding.cache_clear()


@pytest.fixture(scope="module")
def exported(o200k_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(o200k_dir / "tokenizer.json"))


def test_o200k_export_encodes_identically_in_tokenizers(o200k, exported, reference):
    for text in CORPUS:
        ids = exported.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode_ordinary(text)
        assert exported.decode(ids) == text
    ids = exported.encode(SPECIAL_TEXT, add_special_tokens=False).ids
    assert ids == o200k.encode(SPECIAL_TEXT, allowed_special="all")
    assert exported.decode(ids, skip_special_tokens=False) == SPECIAL_TEXT


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=48))
def test_o200k_export_matches_tiktoken_on_any_text(exported, reference, text):
    exported.encode_special_tokens = True  # arbitrary text may spell a special token; compare as plain text
    assert exported.encode(text, add_special_tokens=False).ids == reference.encode_ordinary(text)


def test_o200k_export_loads_in_transformers(o200k, o200k_dir, reference):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(o200k_dir)
    assert [hf.encode(t, add_special_tokens=False) for t in CORPUS] == [reference.encode_ordinary(t) for t in CORPUS]
    assert hf.encode(SPECIAL_TEXT, add_special_tokens=False) == o200k.encode(SPECIAL_TEXT, allowed_special="all")
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (o200k.eos_id, o200k.bos_id, o200k.pad_id)
    assert max(hf.get_vocab().values()) + 1 == o200k.vocab_size
    config = json.loads((o200k_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == o200k.chat_template


def test_saved_o200k_reloads_with_tiktoken(o200k_dir, reference):
    tok = verse.load_tokenizer(o200k_dir)
    assert isinstance(tok, O200kTokenizer)
    assert tok.encode(CORPUS[2]) == reference.encode_ordinary(CORPUS[2])


# ---- byte ------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), junk=st.lists(st.integers(min_value=-2**70, max_value=2**70), max_size=8))
def test_byte_decode_never_raises(data, junk):
    tok = ByteTokenizer()
    assert tok.decode(list(data)) == data.decode("utf-8", errors="replace")
    assert isinstance(tok.decode(list(data) + junk), str)


def test_byte_special_tokens_and_export(tmp_path):
    from transformers import AutoTokenizer

    tok = verse.load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (261, 256, 257, 258)
    assert tok.stop_ids == {257, 260}
    assert tok.encode("<|im_end|>") == list(b"<|im_end|>")
    assert tok.encode("x<|im_end|>", allowed_special="all") == [ord("x"), 260]
    assert tok.decode([104, 105, 260, 0xFF]) == "hi<|im_end|>\ufffd"
    assert tok.decode([104, 260], skip_special=True) == "h"
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
        assert hf.decode(list(text.encode("utf-8"))) == text
    assert hf.encode("x<|im_end|>", add_special_tokens=False) == [ord("x"), 260]
    assert isinstance(verse.load_tokenizer(tmp_path), ByteTokenizer)


# ---- loading errors --------------------------------------------------------------------------------------------
def test_load_tokenizer_errors_are_one_line(tmp_path):
    for bad in (tmp_path / "missing", tmp_path, "not-a-tokenizer", "nobody/no-such-tokenizer"):  # Hub is offline
        with pytest.raises(VerseError) as info:
            verse.load_tokenizer(bad)
        assert "\n" not in str(info.value)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(VerseError, match="GGUF"):
        verse.load_tokenizer(broken)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(VerseError, match="tokenizer.json"):
        verse.load_tokenizer(tmp_path)


def test_hub_repo_id_loads_downloaded_files(tmp_path, monkeypatch):
    import huggingface_hub

    from verse.tokenization.hf import HFTokenizer

    ByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["verse_tokenizer"]  # a plain Hub repo: tokenizer.json + tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    tok = verse.load_tokenizer("some-org/some-model")
    assert calls[0][0] == "some-org/some-model" and "tokenizer.json" in calls[0][1]
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("héllo") == list("héllo".encode("utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (256, 257, 258, {257, 260})


def test_bench_tokenize_cli(capsys):
    from verse.cli import main
    from verse.bench.tokenizer import bench_corpus

    assert main(["bench", "tokenize", "--tokenizer", "byte", "--mb", "0.05", "--repeat", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_ids"] and [r["impl"] for r in report["results"]] == ["verse", "tokenizers"]
    corpus = bench_corpus(0.05)
    assert report["results"][0]["tokens"] == sum(len(d.encode("utf-8")) for d in corpus)  # one id per byte


def test_tokenizer_json_truncation_and_padding_sections_are_not_applied(tmp_path):
    """transformers' PreTrainedTokenizerFast ignores tokenizer.json's truncation/padding unless a call asks for
    them; Verse's encode, encode_batch, encode_chat and the data pipeline must too (and keep them when saving)."""
    from transformers import PreTrainedTokenizerFast

    from verse.data import DataConfig, build_loader
    from verse.tokenization.hf import HFTokenizer

    ByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["verse_tokenizer"]  # a plain tokenizer.json directory, run by `tokenizers`
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 258,
                       "pad_type_id": 0, "pad_token": "<|pad|>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = verse.load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    prompt = "Hello world!"
    want = hf.encode(prompt, add_special_tokens=False)
    assert len(want) == 12 and tok.encode(prompt) == want
    assert tok.encode_batch([prompt, "ab"]) == [want, hf.encode("ab", add_special_tokens=False)]
    assert tok.encode(prompt + "<|im_end|>", allowed_special="all") == hf.encode(prompt + "<|im_end|>",
                                                                                 add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.encode_chat(messages).input_ids == hf.encode(text, add_special_tokens=False)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text(json.dumps({"messages": messages}) + "\n")
    loader = build_loader(DataConfig.from_dict({"sources": [str(corpus)], "num_workers": 0, "pack": False,
                                                "pad_to_multiple_of": 1, "cycle": False}), tok, max_seq_len=256)
    batch = next(iter(loader))
    assert batch["input_ids"][0].tolist() == tok.encode_chat(messages).input_ids  # no pad ids appended
    tok.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["truncation"] == data["truncation"] and saved["padding"] == data["padding"]


def test_byte_tokenizer_narrows_to_a_256_id_model():
    tok = ByteTokenizer().fit_vocab(256)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.special_tokens) == (
        256, None, None, None, set(), {})
    assert tok.encode("<|im_end|>", allowed_special="all") == list(b"<|im_end|>")  # no special ids: plain bytes
    enc = tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert enc.input_ids == list(b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
    assert max(enc.input_ids) < 256
    assert ByteTokenizer().fit_vocab(258).special_tokens == {"<|bos|>": 256, "<|eos|>": 257}
    with pytest.raises(VerseError, match="261 ids.*vocabulary of 200"):
        ByteTokenizer().fit_vocab(200)
    with pytest.raises(VerseError, match="o200k.*vocabulary of 49152"):
        verse.load_tokenizer("o200k").fit_vocab(49152)


@pytest.mark.parametrize("value", [7, ["<s>"], {"content": 7}])
def test_non_string_special_token_in_tokenizer_config_is_one_line(tmp_path, value):
    ByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["verse_tokenizer"]
    config["bos_token"] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(VerseError, match="tokenizer_config.json: bos_token must be a token string") as info:
        verse.load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
