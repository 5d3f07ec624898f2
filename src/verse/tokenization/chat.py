"""Chat templates: render a conversation with Jinja exactly as transformers does, and find the assistant spans.

One render function serves training (loss mask), generation and the UI. Spans of assistant text come from
`{% generation %}...{% endgeneration %}` blocks when the template has them (transformers' own convention for
`return_assistant_tokens_mask`); templates without them (SmolLM2's ChatML, Qwen2.5, Qwen3, Llama 3.x) must be
prefix-stable: the render of the first i messages plus the generation prompt is a prefix of the full render, so each
reply starts right after it and runs through its end token (Qwen3's reasoning section and its history replies
reduced to their answers included; with `enable_thinking=False` the prompt's empty `<think>` block is not part of
the reply).
"""

import ctypes
import json
import re
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from verse.errors import VerseError

ROLES = ("system", "user", "assistant")

# ChatML with the reply and its <|im_end|> inside a generation block. `drop_history_think=True` removes the
# <think>...</think> section of assistant turns that are not the last message (history turns).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if drop_history_think is defined and drop_history_think and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Bounds on what a (third-party) template may do per render: time, output and the size of any value it builds.
TEMPLATE_SECONDS = 10.0
MAX_TEMPLATE_CHARS = 32 * 2**20  # longest rendered text and longest string/list a template may build

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A reasoning section a template writes at the start of a reply (Qwen3 writes one, empty or not, in the last turn).
_THINK_SECTION = re.compile(r"\s*<think>.*?</think>\s*", re.S)
_SPACE = re.compile(r"\s*")


@dataclass
class ChatEncoding:
    """A tokenized conversation.

    Attributes:
        input_ids: token ids of the rendered conversation.
        loss_mask: same length; True on the tokens of each trained assistant reply and the end token closing it.
    """

    input_ids: List[int]
    loss_mask: List[bool]


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}` block: renders its body and, while tracking, records its character span."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self._tracking: ContextVar = ContextVar("verse_generation_tracker", default=None)
        environment.extend(track_generation=self.track)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller) -> str:
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: List[str], spans: List[Tuple[int, int]]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class TemplateLimit(Exception):
    """A template went past `TEMPLATE_SECONDS` or `MAX_TEMPLATE_CHARS` (raised inside the render)."""


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_TEMPLATE_CHARS:
        raise TemplateLimit(f"it built a value of {len(value)} items (at most {MAX_TEMPLATE_CHARS})")
    return value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox plus size checks on what `*`, `**`, `+`, calls and namespaces build."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
            left, right = right, left
        if operator == "*" and isinstance(right, int) and hasattr(left, "__len__"):
            if len(left) * right > MAX_TEMPLATE_CHARS:
                raise TemplateLimit(f"it built a value of {len(left) * right} items (at most {MAX_TEMPLATE_CHARS})")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * abs(left).bit_length() > 64 * MAX_TEMPLATE_CHARS:
                raise TemplateLimit(f"{left} ** {right} is too large")
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        for value in (*args, *kwargs.values()):
            _sized(value)
        return _sized(super().call(__context, __obj, *args, **kwargs))


class _BoundedNamespace(jinja2.utils.Namespace):
    """`namespace()` whose attributes stay below the size limit (a namespace is how a loop grows a value)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _sized(value))


class _Watchdog:
    """Raises `TemplateLimit` in a thread whose render runs past its deadline.

    A template loop is Python bytecode (jinja compiles templates to Python), so the exception set on the thread by
    `PyThreadState_SetAsyncExc` (what CPython offers to interrupt another thread; signals reach only the main
    thread) stops it at its next instruction. One daemon thread per template environment serves every render (a
    timer thread per render cost more than the render itself).
    """

    def __init__(self) -> None:
        self.deadlines: Dict[int, float] = {}  # thread id -> monotonic deadline
        self.fired: set = set()
        self.wake = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        with self.wake:
            while True:
                now = time.monotonic()
                for thread, deadline in list(self.deadlines.items()):
                    if deadline <= now:
                        del self.deadlines[thread]
                        self.fired.add(thread)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                                                   ctypes.py_object(TemplateLimit))
                self.wake.wait(min(self.deadlines.values(), default=now + 3600) - now)

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """Run the block with a deadline `seconds` from now (`TemplateLimit` raised inside it when passed)."""
        thread = threading.get_ident()
        with self.wake:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="verse-template-watchdog", daemon=True)
                self.thread.start()
            self.deadlines[thread] = time.monotonic() + seconds
            self.wake.notify()
        try:
            yield
        finally:
            with self.wake:
                self.deadlines.pop(thread, None)
                if thread in self.fired:  # clear an exception that was set but not yet raised
                    self.fired.discard(thread)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    """The date or time now, as transformers offers it to templates (Llama 3.2's "Today Date")."""
    return datetime.now().strftime(format)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses (trim_blocks, lstrip_blocks).

    Args:
        source: the Jinja template.

    Returns:
        jinja2.Template: the compiled template.

    Raises:
        VerseError: when the template does not parse.
    """
    if not isinstance(source, str):
        raise VerseError(f"chat template must be a string, got {type(source).__name__}")
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _BoundedNamespace
    env.watchdog = _Watchdog()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise VerseError(f"chat template does not parse: {e.message} (line {e.lineno}); fix the template") from None
    except (RecursionError, MemoryError):
        raise VerseError("chat template does not parse: nested too deeply; fix the template") from None


def check_messages(messages: Sequence[Dict[str, str]]) -> None:
    """Raise a one-line VerseError for a conversation that is not a list of {role, content} dicts.

    Args:
        messages: the conversation.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise VerseError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise VerseError(f"message {i}: role must be one of {', '.join(ROLES)}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise VerseError(f"message {i} ({message['role']}): content must be a string")


def strip_history_think(messages: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Remove the <think>...</think> section from assistant turns that are not the last message.

    Args:
        messages: the conversation.

    Returns:
        List[Dict[str, str]]: the conversation with history replies reduced to their answers.
    """
    last = len(messages) - 1
    return [dict(m, content=m["content"].split("</think>")[-1].lstrip())
            if m["role"] == "assistant" and i < last and "</think>" in m["content"] else m
            for i, m in enumerate(messages)]


def _prepare(source: str, messages: Sequence[Dict[str, str]], context: Dict[str, object]) -> Sequence[Dict[str, str]]:
    """Check the messages; apply `drop_history_think` here when the template itself does not handle it."""
    check_messages(messages)
    if context.get("drop_history_think") and "drop_history_think" not in source:
        return strip_history_think(messages)
    return messages


def _render(template: jinja2.Template, messages: Sequence[Dict[str, str]], add_generation_prompt: bool,
            context: Dict[str, object], spans: Optional[List[Tuple[int, int]]] = None) -> str:
    kwargs = dict(context, messages=list(messages), add_generation_prompt=add_generation_prompt)
    blocks: List[str] = []
    size = 0
    try:
        env = template.environment
        with env.watchdog.limit(TEMPLATE_SECONDS), env.track_generation(blocks, [] if spans is None else spans):
            for block in template.generate(**kwargs):
                blocks.append(block)
                size += len(block)
                if size > MAX_TEMPLATE_CHARS:
                    raise TemplateLimit(f"its output passed {MAX_TEMPLATE_CHARS} characters")
    except TemplateLimit as e:
        reason = str(e) or f"it ran longer than {TEMPLATE_SECONDS:g} s"
        raise VerseError(f"chat template stopped: {reason}; fix or replace the template") from None
    except jinja2.TemplateError as e:
        raise VerseError(f"chat template failed on these messages: {e}") from None
    except RecursionError:
        raise VerseError("chat template failed: it recursed too deeply (a macro calling itself?)") from None
    except VerseError:
        raise
    except Exception as e:  # noqa: BLE001 - a template is third-party code: {{ 1/0 }}, an include without a loader ...
        raise VerseError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
    return "".join(blocks)


def render(source: str, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = False,
           **context) -> str:
    """Render a conversation to text.

    Args:
        source: the Jinja chat template.
        messages: [{"role": ..., "content": ...}, ...].
        add_generation_prompt: end with the header that opens an assistant reply.
        **context: extra template variables (bos_token, eos_token, ...). `drop_history_think=True` removes
            <think> sections from history replies, in the template if it handles it, else from the messages.

    Returns:
        str: the rendered conversation.
    """
    messages = _prepare(source, messages, context)
    return _render(compile_template(source), messages, add_generation_prompt, context)


def _reply_start(template: jinja2.Template, history: Sequence[Dict[str, str]], context: Dict[str, object],
                 text: str) -> int:
    """Where the reply after `history` starts in `text`: after the generation prompt rendered for `history`.

    When the prompt differs from the text (Qwen3 with `enable_thinking=False` closes an empty `<think>` in the
    prompt, while a reply in the text keeps its own reasoning or none), the reply starts where they part, before a
    `<think>` the prompt opened.
    """
    prompt = _render(template, history, True, context)
    if text.startswith(prompt):
        return len(prompt)
    base = len(_render(template, history, False, context))
    if not text.startswith(prompt[:base]):
        return -1
    common = base
    while common < len(prompt) and common < len(text) and prompt[common] == text[common]:
        common += 1
    opened = prompt.find(THINK_OPEN, base)
    return opened if 0 <= opened <= common else common


def _locate_reply(text: str, start: int, content: str, ends: Sequence[str]) -> Optional[Tuple[int, int]]:
    """The span of a reply whose header ends at `start`: its content (as written, trimmed, or only the answer after
    `</think>` where the template drops or rewrites the reasoning) and the end token closing it.

    The span starts at `start`: whitespace or a `<think>` section the template wrote before the content is part of
    what the model generates after the prompt. A placement followed by an end token wins over one that is not
    (content "<think>" alone matches the start of a section the template wrote).
    """
    if start < 0:
        return None
    answer = content.split(THINK_CLOSE)[-1].strip()
    think = _THINK_SECTION.match(text, start)
    unclosed = None
    for begin, candidates in ((start, (content, content.strip(), answer)), (think and think.end(), (answer,))):
        if begin is None:
            continue
        for candidate in dict.fromkeys(candidates):
            found = text.find(candidate, begin) if candidate else begin
            if found < 0 or text[begin:found].strip():
                continue
            end = found + len(candidate)
            after = _SPACE.match(text, end).end()
            closing = next((s for s in ends if text.startswith(s, after)), None)
            span = start, (after + len(closing) if closing else end)
            if closing:
                return span
            if candidate and unclosed is None:  # an empty reply is located by its end token only
                unclosed = span
    return unclosed


def render_with_spans(source: str, messages: Sequence[Dict[str, str]], add_generation_prompt: bool,
                      end_strings: Sequence[str], **context) -> Tuple[str, List[Tuple[int, int]]]:
    """Render a conversation and return the character span of each assistant reply (content + end token).

    Args:
        source: the Jinja chat template.
        messages: the conversation.
        add_generation_prompt: end with the header that opens an assistant reply.
        end_strings: token strings that close a reply (e.g. "<|im_end|>"); used by templates without
            generation blocks to extend a reply's span over its end token.
        **context: extra template variables.

    Returns:
        Tuple[str, List[Tuple[int, int]]]: the text and one (start, end) span per assistant message, in order.

    Raises:
        VerseError: when the template changes a reply in a way that hides where it is.
    """
    messages = _prepare(source, messages, context)
    template = compile_template(source)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if _GENERATION_TAG.search(source):
        spans: List[Tuple[int, int]] = []
        text = _render(template, messages, add_generation_prompt, context, spans)
        if len(spans) != n_assistant:
            raise VerseError(f"chat template marked {len(spans)} generation blocks for {n_assistant} assistant "
                             "messages; put {% generation %} around every assistant reply")
        return text, spans
    text = _render(template, messages, add_generation_prompt, context)
    spans = []
    ends = sorted(end_strings, key=len, reverse=True)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _locate_reply(text, _reply_start(template, messages[:i], context, text), message["content"], ends)
        if span is None:
            raise VerseError(f"cannot locate assistant message {i} in the rendered chat: the template is not "
                             "prefix-stable; wrap replies in {% generation %}...{% endgeneration %}")
        spans.append(span)
    return text, spans
