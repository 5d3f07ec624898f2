"""Record layouts of the supported datasets, each normalised to a conversation or a pretraining text.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}, ...]` ending with the
assistant; the assistant's reasoning stays inside its content as `<think>...</think>`.
A record that cannot be used raises `BadRecord` with a short reason that the loader counts.
"""

import re
from typing import Any, Dict, List, Union

Messages = List[Dict[str, str]]
Example = Union[Messages, str]  # a conversation, or a plain text for pretraining

ROLES = ("system", "user", "assistant")
# ShareGPT-style speaker names seen in the wild, mapped to chat roles.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_THOUGHT = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", re.DOTALL)
_SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.DOTALL)


class BadRecord(Exception):
    """A record the pipeline skips; `reason` is the counter key (e.g. "missing_field")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def detect_schema(record: Dict[str, Any]) -> str:
    """Guess the layout of one record from its keys.

    Args:
        record: a decoded record.

    Returns:
        str: openthoughts, opencodereasoning, messages or text.
    """
    if "conversations" in record:
        return "openthoughts"
    if "messages" in record:
        return "messages"
    if "input" in record and ("output" in record or "solution" in record):
        return "opencodereasoning"
    if "text" in record:
        return "text"
    raise BadRecord("unknown_schema",
                    f"keys {sorted(record)[:8]}; expected conversations, messages, input/output or text")


def to_example(record: Any, schema: str = "auto") -> Example:
    """Normalise one record to a conversation (or a text for the `text` schema).

    Args:
        record: a decoded record (a dict).
        schema: auto, openthoughts, opencodereasoning, ultrachat, messages or text.

    Returns:
        Example: the validated conversation, or the text.

    Raises:
        BadRecord: missing fields, wrong types, empty conversations, a conversation not ending with
            the assistant, an empty text.
    """
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", f"record is a {type(record).__name__}, not an object")
    if schema == "auto":
        schema = detect_schema(record)
    if schema == "text":
        text = _field(record, "text", str)
        if not text.strip():
            raise BadRecord("empty", "text is empty")
        return text
    if schema == "openthoughts":
        messages = _openthoughts(record)
    elif schema == "opencodereasoning":
        messages = _opencodereasoning(record)
    else:  # ultrachat, messages
        messages = _turns(_field(record, "messages", list), "messages", "role", "content")
    return validate_messages(messages)


def validate_messages(messages: Messages) -> Messages:
    """Check a normalised conversation: system only first, no empty user/assistant turn, ends with the assistant.

    Args:
        messages: the conversation.

    Returns:
        Messages: the same list.

    Raises:
        BadRecord: empty (no turns, an empty user or assistant turn, no user turn), unknown_role or
            not_ending_with_assistant.
    """
    if not messages:
        raise BadRecord("empty", "conversation has no turns")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise BadRecord("unknown_role", f"system turn at position {i}; only the first turn may be system")
    if messages[-1]["role"] != "assistant":
        raise BadRecord("not_ending_with_assistant", f"last turn is {messages[-1]['role']!r}")
    for i, m in enumerate(messages):
        # an empty reply would be trained on as "end the turn at once", an empty question as noise
        if m["role"] != "system" and not m["content"].strip():
            raise BadRecord("empty", f"{m['role']} turn at position {i} is empty")
    if not any(m["role"] == "user" for m in messages):
        raise BadRecord("empty", "conversation has no user turn")
    return messages


def think_from_openthoughts(value: str) -> str:
    """Rewrite OpenThoughts' `<|begin_of_thought|>...<|begin_of_solution|>...` as `<think>...</think>` + solution.

    Args:
        value: an assistant message of OpenThoughts-114k.

    Returns:
        str: "<think>\\nTHOUGHT\\n</think>\\n\\nSOLUTION", or `value` unchanged without the markers.
    """
    thought = _THOUGHT.search(value)
    if thought is None:
        return value
    solution = _SOLUTION.search(value, thought.end())
    answer = solution.group(1) if solution else value[thought.end():]
    return f"<think>\n{thought.group(1).strip()}\n</think>\n\n{answer.strip()}"


def _openthoughts(record: Dict[str, Any]) -> Messages:
    turns = _turns(_field(record, "conversations", list), "conversations", "from", "value")
    for m in turns:
        if m["role"] == "assistant":
            m["content"] = think_from_openthoughts(m["content"])
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRecord("wrong_type", f"system is a {type(system).__name__}, not a string")
    if system and system.strip() and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": system})
    return turns


def _opencodereasoning(record: Dict[str, Any]) -> Messages:
    problem = _field(record, "input", str)
    if not problem.strip() or problem.strip() == "-":
        # nvidia/OpenCodeReasoning split_1 stores "-" and expects the problem from TACO/APPS/...
        raise BadRecord("missing_field", "input (the problem) is empty or '-'")
    output = record.get("output")
    if output is None or (isinstance(output, str) and not output.strip()):
        output = _field(record, "solution", str)
    if not isinstance(output, str):
        raise BadRecord("wrong_type", f"output is a {type(output).__name__}, not a string")
    if "</think>" in output and "<think>" not in output:
        output = "<think>\n" + output
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": output}]


def _turns(items: List[Any], where: str, role_key: str, content_key: str) -> Messages:
    """[{role_key, content_key}] -> messages, checking every turn."""
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRecord("wrong_type", f"{where}[{i}] is a {type(item).__name__}, not an object")
        if role_key not in item or content_key not in item:
            raise BadRecord("missing_field", f"{where}[{i}] lacks {role_key!r} or {content_key!r}")
        role, content = item[role_key], item[content_key]
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRecord("wrong_type", f"{where}[{i}].{role_key}/{content_key} must be strings")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise BadRecord("unknown_role", f"{where}[{i}].{role_key} = {item[role_key]!r}")
        turns.append({"role": role, "content": content})
    return turns


def _field(record: Dict[str, Any], key: str, kind: type) -> Any:
    if key not in record or record[key] is None:
        raise BadRecord("missing_field", f"no {key!r} (keys: {sorted(record)[:8]})")
    value = record[key]
    if not isinstance(value, kind):
        raise BadRecord("wrong_type", f"{key} is a {type(value).__name__}, not a {kind.__name__}")
    return value
