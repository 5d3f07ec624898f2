"""Byte-level tokenizer (ByteGPT): ids 0-255 are the UTF-8 bytes, named special tokens sit above them.

    256 <|bos|>   257 <|eos|>   258 <|pad|>   259 <|im_start|>   260 <|im_end|>      (vocab_size 261)

ByteGPT's own design has 256 ids, bytes only: for a model with a smaller vocabulary (256-260) the tokenizer keeps
the special tokens that fit. Without `<|im_start|>`/`<|im_end|>` the chat template is rendered as plain bytes, and
without an EOS or end-of-turn id generation stops at `max_new_tokens` or a stop string.
"""

from typing import List, Optional

from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers

from verse.errors import VerseError
from verse.tokenization.base import Tokenizer
from verse.tokenization.chat import CHATML_TEMPLATE
from verse.tokenization.hf import bytes_to_unicode, encode_split, tokenizer_json

BYTE_SPECIAL_TOKENS = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258, "<|im_start|>": 259, "<|im_end|>": 260}
BYTES, FULL_VOCAB_SIZE = 256, 261


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, with the ChatML template.

    Args:
        chat_template: Jinja template; None uses Verse's ChatML.
        vocab_size: 261 (every special token), or 256-260 for a model with fewer ids: the special tokens whose
            ids fit are kept.
    """

    verse_kind = "byte"

    def __init__(self, chat_template: Optional[str] = None, vocab_size: int = FULL_VOCAB_SIZE):
        if not BYTES <= vocab_size <= FULL_VOCAB_SIZE:
            raise VerseError(f"the byte tokenizer has {BYTES} to {FULL_VOCAB_SIZE} ids, not {vocab_size}")
        self.name = "byte"
        self.special_tokens = {s: i for s, i in BYTE_SPECIAL_TOKENS.items() if i < vocab_size}
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id = (self.special_tokens.get(s) for s in ("<|bos|>", "<|eos|>", "<|pad|>"))
        self.stop_ids = {self.special_tokens[s] for s in ("<|eos|>", "<|im_end|>") if s in self.special_tokens}
        self.chat_template = chat_template or CHATML_TEMPLATE

    def fit_vocab(self, vocab_size: int, model: str = "the model") -> "ByteTokenizer":
        if BYTES <= vocab_size < self.vocab_size:
            return ByteTokenizer(self.chat_template, vocab_size)
        return super().fit_vocab(vocab_size, model)

    def tokenizer_config(self) -> dict:
        return {**super().tokenizer_config(), "verse_vocab_size": self.vocab_size}

    def _encode(self, text: str, allowed: frozenset) -> List[int]:
        if not allowed:
            return list(text.encode("utf-8"))
        return encode_split(text, allowed, self.special_tokens, lambda piece: list(piece.encode("utf-8")))

    def _encode_batch(self, texts: List[str], allowed: frozenset) -> List[List[int]]:
        # Bytes need no parallelism: list(bytes) runs at memory speed.
        return [self._encode(text, allowed) for text in texts]

    def _decode(self, ids: List[int], skip_special: bool) -> str:
        if all(0 <= i < 256 for i in ids):
            return bytes(ids).decode("utf-8", errors="replace")
        if skip_special:
            ids = [i for i in ids if i not in self._id_to_special]
        return b"".join(bytes((i,)) if 0 <= i < 256 else self._id_to_special[i] for i in ids).decode(
            "utf-8", errors="replace")

    def _is_valid(self, token_id: int) -> bool:
        return 0 <= token_id < 256 or token_id in self._id_to_special

    def to_tokenizer_json(self) -> str:
        # One BPE symbol per byte (GPT-2's byte spelling) and no merges: byte b is id b.
        backend = HFBackend(models.BPE({}, []))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return tokenizer_json(backend, self.special_tokens, {char: b for b, char in bytes_to_unicode().items()}, [])
