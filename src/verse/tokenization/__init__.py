"""Tokenizers: o200k (tiktoken, offline), byte-level, Hugging Face tokenizer.json and GGUF-embedded vocabularies,
all behind one interface (`Tokenizer`) with chat templates and the assistant loss mask (`encode_chat`)."""

import os
from pathlib import Path
from typing import Optional, Tuple, Union

from verse.errors import VerseError
from verse.tokenization.base import Tokenizer
from verse.tokenization.chat import CHATML_TEMPLATE, ChatEncoding

HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def _from_dir(directory: Path) -> Tokenizer:
    from verse.interop.load import checkpoint_dir
    from verse.tokenization.hf import load_hf_dir, read_chat_template, tokenizer_config

    directory = checkpoint_dir(directory)  # a training run directory: its latest checkpoint, as for verse.load
    if not (directory / "tokenizer.json").is_file():
        raise VerseError(f"no tokenizer.json in {directory}; pass a directory saved with save_pretrained, "
                         "a .gguf file, 'o200k' or 'byte'")
    config = tokenizer_config(directory)
    kind = config.get("verse_tokenizer")  # written by Verse's own o200k / byte tokenizers: reload the fast backend
    if kind in ("o200k", "byte"):
        vocab_size = config.get("verse_vocab_size")  # a byte tokenizer narrowed to its model's 256-260 ids
        if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
            raise VerseError(f"{directory / 'tokenizer_config.json'}: verse_vocab_size must be an integer, got "
                             f"{vocab_size!r}; fix or remove it")
        return _named(kind, read_chat_template(directory, config), vocab_size)
    return load_hf_dir(directory)


def _named(name: str, chat_template: str = None, vocab_size: int = None) -> Tokenizer:
    if name == "byte":
        from verse.tokenization.byte import FULL_VOCAB_SIZE, ByteTokenizer

        return ByteTokenizer(chat_template, vocab_size or FULL_VOCAB_SIZE)
    from verse.tokenization.o200k import O200kTokenizer

    return O200kTokenizer("Xenova/gpt-4o" if name.lower() == "xenova/gpt-4o" else "o200k", chat_template)


def _from_hub(repo_id: str) -> Tokenizer:
    try:
        from huggingface_hub import snapshot_download

        directory = snapshot_download(repo_id, allow_patterns=HUB_FILES, etag_timeout=5)
    except Exception as e:  # offline, unknown repo, gated: all mean "cannot get it from the Hub"
        raise VerseError(f"{repo_id!r} is not a file, a directory or a known tokenizer name ('o200k', 'byte'), "
                         f"and the Hugging Face Hub download failed ({type(e).__name__})") from None
    return _from_dir(Path(directory))


def load_tokenizer(path_or_name: Union[str, os.PathLike, Tokenizer]) -> Tokenizer:
    """Load a tokenizer by name or path.

    Args:
        path_or_name: "o200k" (also "o200k_base", "Xenova/gpt-4o", "gpt-4o": o200k_base offline, identical ids),
            "byte", a directory with tokenizer.json (+ tokenizer_config.json; a Verse or Hugging Face model
            directory), a tokenizer.json file, a .gguf file, or a Hub repo id ("org/name", needs internet).

    Returns:
        Tokenizer: the tokenizer.

    Raises:
        VerseError: when nothing can be loaded from `path_or_name`.
    """
    from verse.tokenization.o200k import ALIASES

    if isinstance(path_or_name, Tokenizer):
        return path_or_name
    name = os.fspath(path_or_name)
    if name.lower() in ALIASES or name == "byte":
        return _named(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        from verse.tokenization.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if path.is_file() and path.name == "tokenizer.json":
        return _from_dir(path.parent)
    if path.exists():
        raise VerseError(f"{path} is not a tokenizer: pass a directory with tokenizer.json, a .gguf file, "
                         "'o200k' or 'byte'")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _from_hub(name)
    raise VerseError(f"tokenizer {name!r} not found: pass 'o200k', 'byte', a directory with tokenizer.json "
                     "or a .gguf file")


def tokenizer_vocab(path_or_name: Union[str, os.PathLike, Tokenizer]) -> Tuple[int, Optional[int], Optional[int]]:
    """`vocab_size`, `bos_id` and `eos_id` of a tokenizer, or of what `load_tokenizer(path_or_name)` loads
    (o200k is answered without reading its 200k merges).

    Args:
        path_or_name: a tokenizer, or anything `load_tokenizer` accepts.

    Returns:
        Tuple[int, Optional[int], Optional[int]]: vocabulary size, bos id, eos id.
    """
    from verse.tokenization.o200k import ALIASES, ENDOFTEXT, O200K_SPECIAL_TOKENS, O200K_VOCAB_SIZE

    if not isinstance(path_or_name, Tokenizer) and os.fspath(path_or_name).lower() in ALIASES:
        return O200K_VOCAB_SIZE, O200K_SPECIAL_TOKENS[ENDOFTEXT], O200K_SPECIAL_TOKENS[ENDOFTEXT]
    tokenizer = load_tokenizer(path_or_name)
    return tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id


__all__ = ["CHATML_TEMPLATE", "ChatEncoding", "Tokenizer", "load_tokenizer", "tokenizer_vocab"]
