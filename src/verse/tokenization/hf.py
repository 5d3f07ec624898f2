"""Tokenizers in the Hugging Face `tokenizers` format: a model directory's tokenizer.json, and the export of
tiktoken ranks to tokenizer.json (byte-level BPE with merges derived from the ranks)."""

import gc
import json
import re
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from verse.errors import VerseError
from verse.jsonio import read_json
from verse.tokenization.base import Tokenizer
from verse.tokenization.chat import CHATML_TEMPLATE

# Special tokens that close a turn in common chat templates; those the template uses become stop ids.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
               "<｜end▁of▁sentence｜>", "</s>")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Returns:
        Dict[int, str]: one character per byte value.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def byte_level_spelling(tokens) -> Dict[bytes, str]:
    """Spell token bytes in the byte-level alphabet (GPT-2's `bytes_to_unicode`).

    Args:
        tokens: token byte strings.

    Returns:
        Dict[bytes, str]: token -> its spelling in tokenizer.json.
    """
    table = {b: char for b, char in bytes_to_unicode().items()}
    return {token: token.decode("latin-1").translate(table) for token in tokens}


def tokenizer_json(backend: HFBackend, special_tokens: Dict[str, int], vocab: Dict[str, int],
                   merges: List[Tuple[str, str]]) -> str:
    """Serialize a byte-level BPE tokenizer with special tokens at the given ids.

    The special tokens also go into the BPE vocabulary: `tokenizers` renumbers added tokens that the model does
    not know, which would close o200k's id gaps (199998, 200003-200017) and shift `<|endoftext|>`.

    Args:
        backend: pre-tokenizer, decoder and BPE options, with an empty BPE model.
        special_tokens: token string -> id.
        vocab, merges: the BPE vocabulary and merges, spliced into the model section here (building a 200k
            vocabulary inside `tokenizers` would cost a JSON round trip of the whole file).

    Returns:
        str: tokenizer.json text.
    """
    data = json.loads(backend.to_str())
    data["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for s, i in sorted(special_tokens.items(), key=lambda item: item[1])]
    data["model"]["vocab"] = {**vocab, **special_tokens}
    data["model"]["merges"] = merges  # tuples serialize as JSON arrays
    return json.dumps(data, ensure_ascii=False)


def tiktoken_to_tokenizer_json(ranks: Dict[bytes, int], pattern: str, special_tokens: Dict[str, int]) -> str:
    """Express tiktoken ranks as a `tokenizers` byte-level BPE that encodes identically.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a whole pre-token
    from the vocabulary when it is one token. The equivalent BPE has, for every token of rank r, one merge per
    way to split it into two tokens (ordered by the ranks of the halves), merges sorted by r, and
    `ignore_merges=True` (whole pre-token lookup first).

    Args:
        ranks: token bytes -> rank (= id).
        pattern: the pre-tokenization regex (tiktoken's pat_str).
        special_tokens: special token string -> id.

    Returns:
        str: tokenizer.json text.
    """
    # ~450k merge tuples would trigger repeated full garbage collections; none of them is cyclic.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _tiktoken_to_tokenizer_json(ranks, pattern, special_tokens)
    finally:
        if gc_was_enabled:
            gc.enable()


def _tiktoken_to_tokenizer_json(ranks: Dict[bytes, int], pattern: str, special_tokens: Dict[str, int]) -> str:
    spelled = byte_level_spelling(ranks)
    by_rank = {rank: spelled[token] for token, rank in ranks.items()}
    splits = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left = ranks.get(token[:i])
            if left is not None:
                right = ranks.get(token[i:])
                if right is not None:
                    splits.append((rank, left, right))
    splits.sort()
    backend = HFBackend(models.BPE({}, [], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return tokenizer_json(backend, special_tokens, {spelled[t]: r for t, r in ranks.items()},
                          [(by_rank[left], by_rank[right]) for _, left, right in splits])


@lru_cache(maxsize=64)
def _special_pattern(allowed: frozenset) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(allowed, key=len, reverse=True))))  # longest match first


def encode_split(text: str, allowed: frozenset, special_tokens: Dict[str, int], encode_plain) -> List[int]:
    """Encode text where only the `allowed` special-token strings count as special; the rest is plain text.

    Args:
        text: the text.
        allowed: special-token strings to recognise.
        special_tokens: string -> id.
        encode_plain: function encoding text with no special tokens.

    Returns:
        List[int]: token ids.
    """
    pattern = _special_pattern(allowed)
    ids: List[int] = []
    cursor = 0
    for match in pattern.finditer(text):
        ids += encode_plain(text[cursor:match.start()]) if match.start() > cursor else []
        ids.append(special_tokens[match.group()])
        cursor = match.end()
    return ids + (encode_plain(text[cursor:]) if cursor < len(text) else [])


def _drop_prefix_space(data: dict) -> None:
    """Edit tokenizer.json data in place so that no "▁" is prepended to the text (Metaspace, Prepend normalizer)."""
    for key in ("pre_tokenizer", "normalizer"):
        component = data.get(key) or {}
        parts = component.get("pretokenizers") or component.get("normalizers") or [component]
        for part in parts:
            if part.get("type") == "Metaspace":
                part["prepend_scheme"] = "never"
                part["add_prefix_space"] = False
        if component.get("type") == "Prepend":
            data[key] = None
        elif component.get("type") == "Sequence" and key == "normalizer":
            component["normalizers"] = [p for p in component["normalizers"] if p.get("type") != "Prepend"]


def _token_content(config: dict, key: str, path: Path) -> Optional[str]:
    """A special token of tokenizer_config.json: a string, {"content": string, ...} or null; else one clear error."""
    value = config.get(key)
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise VerseError(f"{path}: {key} must be a token string (or {{\"content\": string}}), got {value!r}; "
                         "fix the file")
    return content


class HFTokenizer(Tokenizer):
    """A tokenizer run by the Hugging Face `tokenizers` library (Rust, parallel `encode_batch`).

    Args:
        backend: the `tokenizers.Tokenizer`.
        name: reported name (usually the source path).
        chat_template: Jinja template; None uses Verse's ChatML.
        bos_token, eos_token, pad_token: token strings, or None.
        extra_stop_ids: more ids that end a reply (e.g. generation_config.json's eos_token_id list).
        add_bos: whether documents start with the bos token (the source's `add_bos_token`); None asks the
            tokenizer's post-processor.
    """

    def __init__(self, backend: HFBackend, name: str, chat_template: Optional[str] = None,
                 bos_token: Optional[str] = None, eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 extra_stop_ids: Iterable[int] = (), add_bos: Optional[bool] = False):
        # tokenizer.json's `truncation` / `padding` sections are defaults for transformers' callers, which its
        # tokenizer classes ignore unless asked (`max_length=`, `padding=`); applied here they would cut every
        # prompt or pad every training example. Encode without them; save the file as it came.
        self._saved_json = None
        if backend.truncation is not None or backend.padding is not None:
            self._saved_json = backend.to_str()
            backend.no_truncation()
            backend.no_padding()
        self._backend = backend
        self.name = name
        added = backend.get_added_tokens_decoder()
        self.special_tokens = {token.content: i for i, token in added.items() if token.special}
        self._all_special = frozenset(self.special_tokens)
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self.bos_id, self.eos_id, self.pad_id = (
            backend.token_to_id(t) if t else None for t in (bos_token, eos_token, pad_token))
        if add_bos is None:  # no add_bos_token setting: ask the post-processor (e.g. Llama 3's TemplateProcessing)
            add_bos = backend.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or CHATML_TEMPLATE
        ends = {self.special_tokens[t] for t in END_OF_TURN if t in self.special_tokens and t in self.chat_template}
        self.stop_ids = ({self.eos_id} if self.eos_id is not None else set()) | ends | set(extra_stop_ids)

    @cached_property
    def _plain(self) -> HFBackend:
        """A copy of the backend that reads special-token strings as text (`allowed_special="none"`)."""
        plain = HFBackend.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def _encode_plain(self, text: str) -> List[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def _encode(self, text: str, allowed: frozenset) -> List[int]:
        with self._native_errors():
            if not allowed:
                return self._encode_plain(text)
            if allowed == self._all_special:
                return self._backend.encode(text, add_special_tokens=False).ids
            return encode_split(text, allowed, self.special_tokens, self._encode_plain)

    def _native_errors(self) -> ContextManager[None]:
        return native_errors(f"{self.name}: the tokenizer failed on this text", "check its tokenizer.json (a "
                             "pre-tokenizer regex that backtracks without bound?)")

    def _encode_batch(self, texts: List[str], allowed: frozenset) -> List[List[int]]:
        if allowed and allowed != self._all_special:
            return [self._encode(text, allowed) for text in texts]
        backend = self._backend if allowed else self._plain
        with self._native_errors():
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def _continuation(self) -> Optional[HFBackend]:
        """A copy that adds no prefix space ("▁", SentencePiece) at the start of the text; None when the backend
        never adds one."""
        if "Metaspace" not in str(self._backend.pre_tokenizer) and "Prepend" not in str(self._backend.normalizer):
            return None
        data = json.loads(self._backend.to_str())
        _drop_prefix_space(data)
        return HFBackend.from_str(json.dumps(data))

    def _encode_continuation(self, text: str, allowed: frozenset) -> List[int]:
        if self._continuation is None or allowed != self._all_special:
            return self._encode(text, allowed)
        with self._native_errors():
            return self._continuation.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: List[int], skip_special: bool) -> str:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError("token id out of range")  # decode() then replaces each bad id with U+FFFD
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def _is_valid(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self._backend.id_to_token(token_id) is not None

    def to_tokenizer_json(self) -> str:
        return self._saved_json or self._backend.to_str()


@contextmanager
def native_errors(what: str, advice: str, also: Tuple[type, ...] = ()) -> Iterator[None]:
    """Turn a failure inside the `tokenizers` library into one `VerseError` line "WHAT (reason); ADVICE".

    The library reports a failure of its Rust code (e.g. a tokenizer.json regex past Oniguruma's backtracking
    limit, an inconsistent vocabulary) as a `PanicException`, which derives from BaseException: it escaped
    `except Exception` and killed data workers.

    Args:
        what (str): what failed, naming the file.
        advice (str): what to do.
        also (Tuple[type, ...]): further exception types to convert (e.g. `Exception` while building).
    """
    try:
        yield
    except VerseError:
        raise
    except BaseException as e:
        if type(e).__name__ != "PanicException" and not isinstance(e, also):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VerseError(f"{what} ({reason}); {advice}") from None


def read_chat_template(directory: Path, config: dict) -> Optional[str]:
    """The chat template of a model directory: tokenizer_config.json's `chat_template` (a string, or a list of
    named templates, "default" first), else chat_template.jinja / chat_template.json.

    Args:
        directory: the model directory.
        config: its parsed tokenizer_config.json ({} if none).

    Returns:
        Optional[str]: the template, or None.
    """
    template, source = config.get("chat_template"), directory / "tokenizer_config.json"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template:
        template, source = None, directory / "chat_template.jinja"
        if source.is_file():
            try:
                template = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise VerseError(f"{source}: cannot read the chat template ({e}); fix or remove the file") from None
        elif (directory / "chat_template.json").is_file():
            source = directory / "chat_template.json"
            template = read_json(source).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise VerseError(f"{source}: field 'chat_template' must be a string (or a list of named templates), "
                         f"got {type(template).__name__}")
    return template or None


def tokenizer_config(directory: Path) -> dict:
    """Parsed tokenizer_config.json of a directory ({} when absent).

    Args:
        directory: the model directory.

    Returns:
        dict: its content.
    """
    path = directory / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def load_hf_dir(directory: Path) -> HFTokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, generation_config.json) from a model directory.

    Args:
        directory: a directory holding tokenizer.json.

    Returns:
        HFTokenizer: the tokenizer.
    """
    path = directory / "tokenizer.json"
    try:
        backend = HFBackend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or unknown components
        raise VerseError(f"cannot load {path}: {e}; re-export it with transformers' save_pretrained") from None
    config = tokenizer_config(directory)
    extra_stop = []
    if (directory / "generation_config.json").is_file():
        eos = read_json(directory / "generation_config.json").get("eos_token_id")
        extra_stop = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    return HFTokenizer(backend, str(directory), read_chat_template(directory, config),
                       *(_token_content(config, k, directory / "tokenizer_config.json")
                         for k in ("bos_token", "eos_token", "pad_token")),
                       extra_stop_ids=extra_stop, add_bos=config.get("add_bos_token"))
