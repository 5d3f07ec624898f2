"""The tokenizer interface every backend (tiktoken o200k, bytes, Hugging Face `tokenizers`) implements.

Backends provide `_encode`, `_encode_batch`, `_decode`, `_is_valid` and `to_tokenizer_json`; this base class adds
the parts that must behave the same everywhere: special-token policy, never-raising decode, chat rendering with
the assistant loss mask, and `save_pretrained`.
"""

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

from verse.errors import VerseError
from verse.tokenization.chat import ChatEncoding, render, render_with_spans

AllowedSpecial = Union[str, Iterable[str]]
TRAIN_ON = ("all_assistant", "last_assistant")
REPLACEMENT = "\ufffd"


class Tokenizer:
    """Base class: text <-> token ids, chat templates and the assistant loss mask.

    Attributes:
        name: what was loaded ("o200k", "byte", a path).
        vocab_size: embedding rows the model needs (largest id + 1, special tokens included).
        bos_id, eos_id, pad_id: ids of those tokens, or None.
        add_bos: whether documents start with bos_id (the source's `add_bos_token`; False for o200k and byte,
            which use bos_id only as a document separator if at all).
        stop_ids: ids that end an assistant reply (eos and the template's end-of-turn token).
        chat_template: the Jinja chat template.
        special_tokens: special token string -> id.
        chat_options: template variables every render gets unless the call passes its own (`set_thinking`).
    """

    name: str
    vocab_size: int
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: bool = False
    stop_ids: Set[int]
    chat_template: str
    special_tokens: Dict[str, int]
    verse_kind: Optional[str] = None  # "o200k" / "byte": saved in tokenizer_config.json to reload the fast backend
    chat_options: Mapping[str, Any] = MappingProxyType({})  # replaced, never mutated: instances share the default

    # ---- backend hooks -------------------------------------------------------------------------------------
    def _encode(self, text: str, allowed: frozenset) -> List[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: List[str], allowed: frozenset) -> List[List[int]]:
        raise NotImplementedError

    def _decode(self, ids: List[int], skip_special: bool) -> str:
        raise NotImplementedError

    def _is_valid(self, token_id: int) -> bool:
        raise NotImplementedError

    def _encode_continuation(self, text: str, allowed: frozenset) -> List[int]:
        """Encode text that continues earlier text: SentencePiece backends add no "▁" prefix here."""
        return self._encode(text, allowed)

    def to_tokenizer_json(self) -> str:
        """The Hugging Face `tokenizers` serialization (tokenizer.json) of this tokenizer.

        Returns:
            str: JSON text that `tokenizers.Tokenizer.from_str` loads and that encodes identically.
        """
        raise NotImplementedError

    # ---- shared behaviour ----------------------------------------------------------------------------------
    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset:
        if allowed_special == "none" or allowed_special is None:
            return frozenset()
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            raise VerseError(f"allowed_special must be 'none', 'all' or a set of token strings, got "
                             f"{allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise VerseError(f"allowed_special names tokens that are not special in {self.name}: "
                             f"{sorted(unknown)}")
        return allowed

    def fit_vocab(self, vocab_size: int, model: str = "the model") -> "Tokenizer":
        """This tokenizer for a model with `vocab_size` embedding rows (the one check of ids against a model).

        Args:
            vocab_size: the model's vocabulary size.
            model: how to name the model in the error.

        Returns:
            Tokenizer: self when every id fits (subclasses may return a narrower variant, as the byte tokenizer).

        Raises:
            VerseError: ids of this tokenizer would index past the model's embedding.
        """
        if self.vocab_size <= vocab_size:
            return self
        raise VerseError(f"tokenizer {self.name} has {self.vocab_size} ids (up to {self.vocab_size - 1}) but {model} "
                         f"has a vocabulary of {vocab_size}: its ids would index past the embedding; use the model's "
                         "own tokenizer (leave out --tokenizer / tokenizer=) or one of at most that size")

    def token_string(self, token_id: Optional[int]) -> Optional[str]:
        """The special-token string of an id (e.g. eos_id -> "<|endoftext|>"), or None."""
        return next((s for s, i in self.special_tokens.items() if i == token_id), None)

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> List[int]:
        """Encode text to token ids, without adding BOS/EOS.

        Args:
            text: the text.
            allowed_special: "none" (special-token strings in the text are encoded as plain text, tiktoken's
                meaning), "all", or a set of special-token strings to recognise.

        Returns:
            List[int]: token ids.
        """
        return self._encode(text, self._allowed(allowed_special))

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "none") -> List[List[int]]:
        """Encode many texts using all CPU cores.

        Args:
            texts: the texts.
            allowed_special: as in `encode`.

        Returns:
            List[List[int]]: one id list per text.
        """
        return self._encode_batch(list(texts), self._allowed(allowed_special))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode token ids to text. Never raises: invalid UTF-8 and unknown ids become U+FFFD.

        Args:
            ids: token ids (a list, or a tensor/array with `.tolist()`).
            skip_special: leave special tokens out of the text.

        Returns:
            str: the text.
        """
        try:
            ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        except TypeError:
            ids = [ids]
        try:
            return self._decode([int(i) for i in ids], skip_special)
        except Exception:
            return self._decode_slow(ids, skip_special)

    def _decode_slow(self, ids: List, skip_special: bool) -> str:
        """Decode runs of valid ids and put U+FFFD for each id that is not a token."""
        parts: List[str] = []
        run: List[int] = []
        for token_id in ids:
            try:
                valid = self._is_valid(int(token_id))
            except (TypeError, ValueError, OverflowError):
                valid = False
            if valid:
                run.append(int(token_id))
                continue
            parts.append(self._decode(run, skip_special) if run else "")
            parts.append(REPLACEMENT)
            run = []
        parts.append(self._decode(run, skip_special) if run else "")
        return "".join(parts)

    def _tokens_context(self) -> Dict[str, str]:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {key: self.token_string(i) for key, i in names.items() if self.token_string(i) is not None}

    def _template_context(self, template_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        return {**self._tokens_context(), **self.chat_options, **template_kwargs}

    def set_thinking(self, enabled: Optional[bool]) -> None:
        """Switch the chat template's reasoning on or off for every later render (Qwen3's `enable_thinking`: off
        makes the generation prompt close an empty `<think>` block, so the model answers without reasoning).

        Args:
            enabled: True (reason first), False (answer directly), or None (the template's default).

        Raises:
            VerseError: the chat template has no `enable_thinking` switch.
        """
        options = {k: v for k, v in self.chat_options.items() if k != "enable_thinking"}
        if enabled is not None:
            if "enable_thinking" not in self.chat_template:
                raise VerseError(f"the chat template of {self.name} has no enable_thinking switch (Qwen3's); "
                                 "leave out --thinking for this model")
            options["enable_thinking"] = bool(enabled)
        self.chat_options = options  # a plain dict: tokenizers travel to data workers by pickle

    def apply_chat_template(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **template_kwargs) -> Union[List[int], str]:
        """Render a conversation with the chat template (same string as transformers' apply_chat_template).

        Token ids come from `encode_chat`, so training, generation and the UI tokenize a conversation the same way.

        Args:
            messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
            add_generation_prompt: end with the header that opens the assistant's reply.
            tokenize: return token ids (True) or the text (False).
            **template_kwargs: extra template variables, e.g. `drop_history_think=True`, `enable_thinking=False`.

        Returns:
            Union[List[int], str]: token ids, or the rendered text.
        """
        if not tokenize:
            return render(self.chat_template, messages, add_generation_prompt,
                          **self._template_context(template_kwargs))
        return self.encode_chat(messages, add_generation_prompt, **template_kwargs).input_ids

    def encode_chat(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = False,
                    train_on: str = "all_assistant", **template_kwargs) -> ChatEncoding:
        """Tokenize a conversation and mark the tokens to train on.

        The render is cut at the edges of each assistant reply and every piece is tokenized on its own, so no
        token straddles a reply's edge: the mask is exact, and the reply's tokens are the ones the model
        produces when generating after the prompt. For the usual templates (ChatML, and any whose reply follows
        a newline or a special token) the ids equal the tokenization of the whole render; a reply that starts
        with whitespace merging into the header may tokenize differently at that edge. Special-token strings in
        the render are recognised, as in transformers.

        Args:
            messages: the conversation.
            add_generation_prompt: end with the header that opens the assistant's reply.
            train_on: "all_assistant" (every reply) or "last_assistant" (only the final one).
            **template_kwargs: extra template variables, e.g. `drop_history_think=True`.

        Returns:
            ChatEncoding: input_ids and loss_mask (True on reply content and the end token closing it).
        """
        if train_on not in TRAIN_ON:
            raise VerseError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        ends = [self.token_string(i) for i in sorted(self.stop_ids)]
        text, spans = render_with_spans(self.chat_template, messages, add_generation_prompt,
                                        [s for s in ends if s], **self._template_context(template_kwargs))
        if train_on == "last_assistant":
            spans = spans[-1:]
        everything = frozenset(self.special_tokens)
        input_ids: List[int] = []
        loss_mask: List[bool] = []
        cursor = 0
        for start, end in spans + [(len(text), len(text))]:
            for offset, piece, trained in ((cursor, text[cursor:start], False), (start, text[start:end], True)):
                if piece:
                    encode = self._encode if offset == 0 else self._encode_continuation
                    ids = encode(piece, everything)
                    input_ids += ids
                    loss_mask += [trained] * len(ids)
            cursor = end
        return ChatEncoding(input_ids=input_ids, loss_mask=loss_mask)

    def gguf_pre(self) -> str:
        """llama.cpp's pre-tokenizer name for this tokenizer (`tokenizer.ggml.pre` in a GGUF file).

        Returns:
            str: the name whose regex the tokenizer.json splits text with ("qwen2", "llama-bpe", ...), else "default".
        """
        from verse.tokenization.gguf import pre_tokenizer_name

        return pre_tokenizer_name(json.loads(self.to_tokenizer_json()))

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json that goes next to tokenizer.json (transformers reads it).

        Returns:
            dict: tokenizer class, special tokens and chat_template.
        """
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": self.add_bos, "add_eos_token": False, **self._tokens_context(),
                  "chat_template": self.chat_template}
        if self.verse_kind:
            config["verse_tokenizer"] = self.verse_kind
        return config

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write tokenizer.json and tokenizer_config.json (with chat_template), loadable by transformers.

        Args:
            directory: where to write; created if missing.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(self.to_tokenizer_json(), encoding="utf-8")
        (path / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
