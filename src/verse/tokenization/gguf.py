"""The tokenizer embedded in a GGUF file (llama.cpp's `tokenizer.ggml.*` keys), as a `tokenizers` BPE.

Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE with merges: SmolLM2, Llama 3, Qwen 2; the
pre-tokenizer follows `tokenizer.ggml.pre`, as llama.cpp does) and `"llama"` (SentencePiece BPE with byte
fallback: Llama 2, Mistral; merges from the token scores when the file lists none).
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from verse.errors import VerseError
from verse.interop.gguf_header import read_gguf_metadata
from verse.tokenization.hf import HFTokenizer, bytes_to_unicode, native_errors
from verse.tokenization.o200k import O200K_PATTERN

# llama.cpp token types (llama_token_type): 3 control (special), 4 user-defined (always matched, not special).
CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's word-boundary mark
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# the first name of each regex is the one llama.cpp's convert_hf_to_gguf.py writes (`pre_tokenizer_name`)
SPLIT_PATTERNS = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
                  "smaug-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN,
                  "gpt-4o": O200K_PATTERN}


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) for a tokenizer.json: the first name in
    `SPLIT_PATTERNS` whose regex its Split pre-tokenizer uses (Qwen2/2.5/3 "qwen2", Llama 3 "llama-bpe"), else "default".

    Args:
        spec (dict): the parsed tokenizer.json.

    Returns:
        str: the name.
    """
    parts = spec.get("pre_tokenizer") or {}
    parts = parts.get("pretokenizers") or [parts]
    patterns = {(part.get("pattern") or {}).get("Regex") for part in parts if part.get("type") == "Split"}
    return next((name for name, pattern in SPLIT_PATTERNS.items() if pattern in patterns), "default")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenization for `tokenizer.ggml.pre`; GPT-2's regex when the type is not listed."""
    if pre in SPLIT_PATTERNS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: "\p{N}" (each digit alone), then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_level_backend(fields: Dict[str, object], tokens: List[str]) -> HFBackend:
    """gpt2-style byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges listed in the file."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some files store a token with raw characters (e.g. real spaces); spell it in the byte alphabet.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    backend = HFBackend(models.BPE(vocab, merges))
    backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _score_merges(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first
    (ties: shorter left piece, then shorter right piece, then vocabulary order), as transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in splits]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_backend(fields: Dict[str, object], tokens: List[str]) -> HFBackend:
    """SentencePiece BPE (Llama 2, Mistral): "▁" for spaces, <0xNN> byte fallback, merges from token scores."""
    merges = ([tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in fields
              else _score_merges(tokens, fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    unknown = fields.get("tokenizer.ggml.unknown_token_id")
    backend = HFBackend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unknown] if isinstance(unknown, int) else None))
    prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend


BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}
# the type each tokenizer key must have: a list of (item type), or a scalar type (bool is not int)
FIELD_TYPES = {"tokenizer.ggml.tokens": (list, str), "tokenizer.ggml.merges": (list, str),
               "tokenizer.ggml.token_type": (list, int), "tokenizer.ggml.scores": (list, (int, float)),
               "tokenizer.ggml.pre": (str, None), "tokenizer.chat_template": (str, None),
               "tokenizer.ggml.add_bos_token": (bool, None), "tokenizer.ggml.add_space_prefix": (bool, None)}


def _check_fields(fields: Dict[str, object], path: Path) -> None:
    """One line naming the key whose value has the wrong type (a hostile file must not reach the builders)."""
    for key, (kind, item) in FIELD_TYPES.items():
        value = fields.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and item is not None:
            ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        if not ok:
            what = f"a list of {getattr(item, '__name__', 'numbers')}" if item is not None else kind.__name__
            raise VerseError(f"{path}: metadata key {key!r} must be {what}")


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """Build the tokenizer a GGUF file describes.

    Args:
        path: the .gguf file.

    Returns:
        HFTokenizer: with the file's chat template, bos/eos/pad ids and special tokens.

    Raises:
        VerseError: when the file has no tokenizer or one of an unsupported kind.
    """
    fields = read_gguf_metadata(path)
    kind = fields.get("tokenizer.ggml.model")
    if not isinstance(kind, str) or kind not in BUILDERS or "tokenizer.ggml.tokens" not in fields:
        raise VerseError(f"{path}: tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE) and 'llama' "
                         "(SentencePiece BPE); load the model's tokenizer.json directory instead")
    _check_fields(fields, path)
    tokens: List[str] = fields["tokenizer.ggml.tokens"]
    with native_errors(f"{path}: its tokenizer cannot be built", "fix the file or pass --tokenizer", also=(Exception,)):
        backend = BUILDERS[kind](fields, tokens)
    vocab = backend.get_vocab()
    types = fields.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL and t in vocab])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])

    def token(key: str) -> Optional[str]:
        index = fields.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return HFTokenizer(backend, str(path), fields.get("tokenizer.chat_template"),
                       token("bos_token_id"), token("eos_token_id"), token("padding_token_id"), add_bos=add_bos)
