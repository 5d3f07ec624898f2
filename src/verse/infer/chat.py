"""Chat on top of `generate.stream`: prompts from messages, streamed text, `<think>` display, terminal chat."""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TextIO

import torch

from verse.errors import VerseError
from verse.infer.generate import stream
from verse.terminal import for_stream

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_MODES = ("show", "hide", "dim")
DIM, RESET = "\033[2m", "\033[0m"


def valid_text(text: str) -> str:
    """`text` with the bytes that were not UTF-8 replaced by U+FFFD.

    Python keeps undecodable bytes of argv (and of streams read with `surrogateescape`) as lone surrogates, which
    no tokenizer can encode; the replacement character stands in for each, as in `tokenizer.decode`.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def chat_prompt(tokenizer, messages: List[Dict[str, str]], **template_kwargs) -> List[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ending with the assistant prompt.

    Args:
        tokenizer: a Verse tokenizer.
        messages (List[Dict[str, str]]): `[{"role": "system" | "user" | "assistant", "content": str}]`.
        **template_kwargs: template variables for this render (e.g. `enable_thinking=False`).

    Returns:
        List[int]: the prompt ids.
    """
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_kwargs)


def text_prompt(tokenizer, text: str) -> List[int]:
    """Token ids of a plain (non-chat) prompt: `text` as is, after the BOS token when the tokenizer adds one.

    Args:
        tokenizer: a Verse tokenizer.
        text (str): the prompt.

    Returns:
        List[int]: the prompt ids (empty for an empty text and a tokenizer without BOS).
    """
    prompt = tokenizer.encode(text)
    if getattr(tokenizer, "add_bos", False) and (not prompt or prompt[0] != tokenizer.bos_id):
        prompt = [tokenizer.bos_id] + prompt
    return prompt


def opens_in_think(tokenizer, messages: List[Dict[str, str]], **template_kwargs) -> bool:
    """Whether the template's generation prompt already opens a `<think>` block (DeepSeek-R1 style).

    Args:
        tokenizer: a Verse tokenizer.
        messages (List[Dict[str, str]]): the conversation.
        **template_kwargs: template variables for this render (e.g. `enable_thinking=False`).

    Returns:
        bool: True when the reply starts inside `<think>`.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
    return text.rstrip().endswith(THINK_OPEN)


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """Split a reply into its `<think>` reasoning and the answer.

    Args:
        text (str): the generated reply.
        opened (bool): the prompt already opened `<think>` (the reply starts inside it).

    Returns:
        tuple[str, str]: (reasoning, answer); reasoning is "" when there is none. An unclosed block is
        all reasoning so far.
    """
    if opened:
        text = THINK_OPEN + text
    start = text.find(THINK_OPEN)
    if start < 0:
        return "", text
    end = text.find(THINK_CLOSE, start)
    if end < 0:
        return text[start + len(THINK_OPEN):].strip(), text[:start]
    reasoning = text[start + len(THINK_OPEN):end].strip()
    return reasoning, (text[:start] + text[end + len(THINK_CLOSE):]).lstrip()


def render_think(text: str, mode: str, opened: bool = False) -> str:
    """Text to display for a reply: `<think>` blocks shown as-is, hidden, or dimmed (ANSI).

    Rendering is prefix-monotone: the rendering of a longer reply extends that of a shorter one, as long as
    the shorter does not end inside a tag (see `ThinkRenderer`).

    Args:
        text (str): the reply so far.
        mode (str): "show", "hide" or "dim".
        opened (bool): the reply starts inside `<think>` (the prompt opened it).

    Returns:
        str: the text to display.
    """
    if mode == "show":
        return text
    if opened:
        text = THINK_OPEN + text
    out, pos = [], 0
    while (start := text.find(THINK_OPEN, pos)) >= 0:
        out.append(text[pos:start])
        end = text.find(THINK_CLOSE, start)
        block = text[start:] if end < 0 else text[start:end + len(THINK_CLOSE)]
        if mode == "dim":
            out.append(DIM + block + (RESET if end >= 0 else ""))
        pos = len(text) if end < 0 else end + len(THINK_CLOSE)
    out.append(text[pos:])
    return "".join(out)


def without_partial_tag(text: str) -> str:
    """`text` less a tail that could be the start of `<think>` or `</think>` (a stream waits for the rest)."""
    for tag in (THINK_OPEN, THINK_CLOSE):
        for i in range(len(tag) - 1, 0, -1):
            if text.endswith(tag[:i]):
                return text[:-i]
    return text


class ReasoningStream:
    """Splits streamed reply text into reasoning and answer deltas, as `split_reasoning` splits the whole reply
    (the `reasoning_content` / `content` deltas of OpenAI-style reasoning servers).

    Args:
        opened (bool): the reply starts inside `<think>`.
    """

    def __init__(self, opened: bool = False):
        self.opened = opened
        self.text = ""
        self.sent = ("", "")

    def feed(self, delta: str) -> tuple[str, str]:
        """Add reply text; return the new (reasoning, answer) text (a trailing partial tag waits)."""
        self.text += delta
        return self._advance(without_partial_tag(self.text))

    def flush(self) -> tuple[str, str]:
        """The (reasoning, answer) text still held back at the end of the reply."""
        return self._advance(self.text)

    def _advance(self, text: str) -> tuple[str, str]:
        parts = split_reasoning(text, self.opened)
        new = tuple(part[len(sent):] if part.startswith(sent) else "" for part, sent in zip(parts, self.sent))
        self.sent = tuple(part if part.startswith(sent) else sent for part, sent in zip(parts, self.sent))
        return new


class TextDeltas:
    """The decoded text of a growing list of token ids, piece by piece.

    Args:
        tokenizer: a Verse tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.shown = 0

    def feed(self, ids: List[int]) -> str:
        """Add ids; return the new text (a piece ending inside a UTF-8 character waits for the next ids)."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._advance(text)

    def flush(self) -> str:
        """The text still held back at the end."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


class ThinkRenderer:
    """Turns streamed reply text into streamed display text for a `--think` mode.

    Args:
        mode (str): "show", "hide" or "dim".
        opened (bool): the reply starts inside `<think>`.
    """

    def __init__(self, mode: str = "show", opened: bool = False):
        if mode not in THINK_MODES:
            raise VerseError(f"think mode must be one of {', '.join(THINK_MODES)}, got {mode!r}")
        self.mode, self.opened = mode, opened
        self.text, self.shown = "", 0

    def feed(self, delta: str) -> str:
        """Add reply text; return the new display text (a trailing partial tag waits for the next call)."""
        self.text += delta
        return self._advance(render_think(without_partial_tag(self.text), self.mode, self.opened))

    def flush(self) -> str:
        """The display text still held back, and the reset of a dim block left open."""
        rendered = render_think(self.text, self.mode, self.opened)
        tail = self._advance(rendered)
        return tail + (RESET if self.mode == "dim" and rendered.count(DIM) > rendered.count(RESET) else "")

    def _advance(self, rendered: str) -> str:
        delta = rendered[self.shown:]
        self.shown = max(self.shown, len(rendered))
        return delta


def stream_text(model, tokenizer, prompt: List[int], **kwargs) -> Iterator[str]:
    """Stream the decoded text of a generation piece by piece.

    Args:
        model (ReasoningLLM): the model.
        tokenizer: a Verse tokenizer.
        prompt (List[int]): prompt ids.
        **kwargs: the sampling and stopping arguments of `generate.stream`.

    Yields:
        str: new text; a piece that ends in the middle of a UTF-8 character waits for the next token.
    """
    deltas = TextDeltas(tokenizer)
    for token in stream(model, tokenizer, prompt, **kwargs):
        if text := deltas.feed([token]):
            yield text
    if text := deltas.flush():
        yield text


def fit_messages(tokenizer, messages: List[Dict[str, str]],
                 max_prompt_tokens: int) -> tuple[List[Dict[str, str]], List[int]]:
    """Drop the oldest turns (never the system message or the last user turn) until the prompt fits.

    Args:
        tokenizer: a Verse tokenizer.
        messages (List[Dict[str, str]]): the conversation, ending with a user message.
        max_prompt_tokens (int): most prompt tokens.

    Returns:
        tuple[List[Dict[str, str]], List[int]]: the messages kept and their prompt ids.

    Raises:
        VerseError: when even the system message and the last user message do not fit.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        prompt = chat_prompt(tokenizer, system + turns)
        if len(prompt) <= max_prompt_tokens:
            return system + turns, prompt
        if len(turns) <= 1:
            raise VerseError(f"the message is too long ({len(prompt)} prompt tokens, at most {max_prompt_tokens}); "
                             "shorten it or lower max_new_tokens")
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]


@dataclass
class ChatSession:
    """A conversation: system prompt, history and generation settings.

    Args:
        model (ReasoningLLM): the model.
        tokenizer: its tokenizer.
        system (Optional[str]): system prompt.
        generation (dict): keyword arguments of `generate.stream` (max_new_tokens, temperature, ...).
    """

    model: torch.nn.Module
    tokenizer: object
    system: Optional[str] = None
    generation: dict = field(default_factory=dict)
    history: List[Dict[str, str]] = field(default_factory=list)

    def messages(self) -> List[Dict[str, str]]:
        """The conversation so far, system prompt first."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, user: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply; the reply (even a stopped one) joins history.

        Args:
            user (str): the user's message.

        Yields:
            str: pieces of the reply text.
        """
        self.history.append({"role": "user", "content": user})
        max_new = self.generation.get("max_new_tokens", 256)
        _, prompt = fit_messages(self.tokenizer, self.messages(), self.model.args.max_seq_len - max_new)
        answer = []
        try:
            for piece in stream_text(self.model, self.tokenizer, prompt, **self.generation):
                answer.append(piece)
                yield piece
        finally:
            self.history.append({"role": "assistant", "content": "".join(answer)})

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON `{"messages": [...]}`.

        Args:
            path (str | Path): the JSON file to write.

        Returns:
            Path: where it was written.
        """
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise VerseError(f"cannot save the chat to {path}: {e.strerror}") from None
        return path


TERMINAL_HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt, empty to clear),
          /save FILE.json, /help, /quit; Ctrl-C stops an answer, Ctrl-D or /quit leaves"""


def terminal_chat(session: ChatSession, think: str = "dim", read: Callable[[str], str] = input,
                  out: TextIO = sys.stdout) -> None:
    """Chat in the terminal until end of input or /quit.

    Args:
        session (ChatSession): the conversation.
        think (str): how `<think>` blocks are displayed: show, hide or dim.
        read (Callable[[str], str]): reads a line (raises EOFError at the end).
        out (TextIO): where replies are written.
    """
    print(TERMINAL_HELP, file=out)
    if read is input and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 must not end the session
    while True:
        try:
            line = valid_text(read(">>> ")).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        except UnicodeDecodeError:
            print("(that line was not valid text and was ignored)", file=out)
            continue
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            print(TERMINAL_HELP, file=out)
        elif command == "/reset":
            session.reset()
            print("(conversation reset)", file=out)
        elif command == "/system":
            session.system = rest.strip() or None
            print(f"(system prompt {'set' if session.system else 'cleared'})", file=out)
        elif command == "/save":
            if not rest.strip():
                print("usage: /save FILE.json", file=out)
                continue
            try:
                print(f"(saved to {session.save(rest.strip())})", file=out)
            except VerseError as e:
                print(f"error: {e}", file=out)
        elif command.startswith("/") and " " not in command and len(command) > 1 and command[1:].isalpha():
            print(f"unknown command {command}; /help lists them", file=out)
        else:
            _answer(session, line, think, out)


def _answer(session: ChatSession, line: str, think: str, out: TextIO) -> None:
    renderer = ThinkRenderer(think, opens_in_think(session.tokenizer, session.messages()))
    pieces = session.reply(line)
    try:
        for piece in pieces:
            out.write(renderer.feed(for_stream(piece, out)))
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(renderer.flush() + "\n(stopped)")
    except VerseError as e:
        session.history.pop()
        out.write(f"error: {e}")
    else:
        out.write(renderer.flush())
    out.write("\n")
    out.flush()
