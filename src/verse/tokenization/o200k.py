"""o200k_base (GPT-4o, `Xenova/gpt-4o`) offline: ranks from the `bpe-openai` wheel, encoding by `tiktoken`.

Ids of ordinary tokens and of `<|endoftext|>` (199999) / `<|endofprompt|>` (200018) are those of tiktoken's
o200k_base and of Xenova/gpt-4o. Verse's chat markers live in o200k's unused id range 200000-200017, so the
vocabulary stays 200019 rows:

    200000 <|im_start|>    200001 <|im_end|>    200002 <|pad|>
"""

import base64
import gzip
import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

import tiktoken

from verse.errors import VerseError
from verse.tokenization.base import Tokenizer
from verse.tokenization.chat import CHATML_TEMPLATE
from verse.tokenization.hf import tiktoken_to_tokenizer_json

O200K_FILE = "o200k_base.tiktoken.gz"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # of the gunzipped file
# tiktoken_ext/openai_public.py, o200k_base.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
ENDOFTEXT, ENDOFPROMPT, IM_START, IM_END, PAD = (
    "<|endoftext|>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
O200K_SPECIAL_TOKENS = {ENDOFTEXT: 199999, IM_START: 200000, IM_END: 200001, PAD: 200002, ENDOFPROMPT: 200018}
O200K_VOCAB_SIZE = max(O200K_SPECIAL_TOKENS.values()) + 1  # tiktoken's n_vocab: the specials come after the ranks
ALIASES = ("o200k", "o200k_base", "xenova/gpt-4o", "gpt-4o")


def o200k_ranks_path() -> Path:
    """Path of `o200k_base.tiktoken.gz` inside the installed `bpe-openai` wheel.

    Returns:
        Path: the gzipped ranks file.
    """
    spec = importlib.util.find_spec("bpe_openai")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / O200K_FILE
        if path.is_file():
            return path
    raise VerseError(f"{O200K_FILE} not found: install the `bpe-openai` wheel (pip install bpe-openai)")


def load_ranks(path: Path, sha256: str = O200K_SHA256) -> Dict[bytes, int]:
    """Read a gzipped tiktoken ranks file after checking the sha256 of its gunzipped bytes.

    Args:
        path: the .tiktoken.gz file.
        sha256: expected hex digest of the gunzipped content.

    Returns:
        Dict[bytes, int]: token bytes -> rank (= token id).

    Raises:
        VerseError: when the file is unreadable or its hash differs.
    """
    try:
        data = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise VerseError(f"cannot read tokenizer ranks {path}: {e}; reinstall bpe-openai") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise VerseError(f"tokenizer ranks {path} have sha256 {digest[:16]}..., expected {sha256[:16]}...: "
                         "the file is corrupt or a different vocabulary; reinstall bpe-openai")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@lru_cache(maxsize=1)
def o200k_ranks() -> Dict[bytes, int]:
    """The verified o200k_base ranks (read once per process)."""
    return load_ranks(o200k_ranks_path())


@lru_cache(maxsize=1)
def o200k_encoding() -> tiktoken.Encoding:
    """The tiktoken Encoding of o200k_base plus Verse's chat markers (built once per process).

    Returns:
        tiktoken.Encoding: the encoding.
    """
    return tiktoken.Encoding("o200k_base_verse", pat_str=O200K_PATTERN, mergeable_ranks=o200k_ranks(),
                             special_tokens=O200K_SPECIAL_TOKENS)


@lru_cache(maxsize=1)
def o200k_tokenizer_json() -> str:
    """tokenizer.json text of o200k with Verse's specials (built once per process: it takes seconds)."""
    return tiktoken_to_tokenizer_json(o200k_ranks(), O200K_PATTERN, O200K_SPECIAL_TOKENS)


class O200kTokenizer(Tokenizer):
    """o200k_base through tiktoken, with the ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`).

    Args:
        name: reported name ("o200k" or "Xenova/gpt-4o").
        chat_template: Jinja template; None uses Verse's ChatML.
    """

    verse_kind = "o200k"

    def __init__(self, name: str = "o200k", chat_template: str = None):
        self.enc = o200k_encoding()
        self.name = name
        self.special_tokens = dict(O200K_SPECIAL_TOKENS)
        self._special_ids = frozenset(self.special_tokens.values())
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.eos_id = O200K_SPECIAL_TOKENS[ENDOFTEXT]  # as Xenova/gpt-4o's tokenizer_config.json
        self.pad_id = O200K_SPECIAL_TOKENS[PAD]
        self.stop_ids = {self.eos_id, O200K_SPECIAL_TOKENS[IM_END]}
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._threads = os.cpu_count() or 1

    def _encode(self, text: str, allowed: frozenset) -> List[int]:
        if not allowed:
            return self.enc.encode_ordinary(text)
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def _encode_batch(self, texts: List[str], allowed: frozenset) -> List[List[int]]:
        if not allowed:
            return self.enc.encode_ordinary_batch(texts, num_threads=self._threads)
        return self.enc.encode_batch(texts, num_threads=self._threads, allowed_special=allowed,
                                     disallowed_special=())

    def _decode(self, ids: List[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self.enc.decode(ids, errors="replace")

    def _is_valid(self, token_id: int) -> bool:
        return token_id in self._special_ids or 0 <= token_id < len(o200k_ranks())  # ranks are 0..n-1

    def to_tokenizer_json(self) -> str:
        return o200k_tokenizer_json()
