"""Chat templates: render a conversation with Jinja exactly as transformers does, and find the assistant spans.

One render function serves training (loss mask), generation and the UI. Spans of assistant text come from
`{% generation %}...{% endgeneration %}` blocks when the template has them (transformers' own convention for
`return_assistant_tokens_mask`); templates without them (e.g. SmolLM2's ChatML) must be prefix-stable: the render
of the first i messages plus the generation prompt is a prefix of the full render, so each reply starts right
after it.
"""

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise VerseError(f"chat template does not parse: {e.message} (line {e.lineno}); fix the template") from None


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
    try:
        if spans is None:
            return template.render(**kwargs)
        blocks: List[str] = []
        with template.environment.track_generation(blocks, spans):
            for block in template.generate(**kwargs):
                blocks.append(block)
        return "".join(blocks)
    except jinja2.TemplateError as e:
        raise VerseError(f"chat template failed on these messages: {e}") from None


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
        prefix = _render(template, messages[:i], True, context)
        start = -1
        if text.startswith(prefix):
            for content in (message["content"], message["content"].strip()):  # templates may trim replies
                start = text.find(content, len(prefix))
                if start >= 0 and not text[len(prefix):start].strip():
                    break
                start = -1
        if start < 0:
            raise VerseError(f"cannot locate assistant message {i} in the rendered chat: the template is not "
                             "prefix-stable; wrap replies in {% generation %}...{% endgeneration %}")
        end = start + len(content)
        end += next((len(s) for s in ends if text.startswith(s, end)), 0)
        spans.append((start, end))
    return text, spans
