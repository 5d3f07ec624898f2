"""Final-answer extraction: a configurable regular expression over the model's reply."""

import re
from typing import Optional

DEFAULT_PATTERN = r"Answer:\s*(-?[\d,]*\.?\d+)"


def compile_pattern(pattern: str) -> re.Pattern:
    """Compile an answer pattern, turning a bad regex into a `VerseError` that names it.

    Args:
        pattern (str): regular expression; its first group (or the whole match without groups) is the answer.

    Returns:
        re.Pattern: the compiled pattern.
    """
    from verse.errors import VerseError

    try:
        return re.compile(pattern)
    except re.error as e:
        raise VerseError(f"answer pattern {pattern!r} is not a valid regular expression ({e}); "
                         "fix --answer-pattern") from None


def normalize(answer: str) -> str:
    """Canonical form for comparing answers: surrounding space, thousands separators and a trailing dot dropped."""
    return answer.strip().replace(",", "").rstrip(".")


def extract_answer(text: str, pattern: str | re.Pattern = DEFAULT_PATTERN) -> Optional[str]:
    """The final answer in `text`: the normalised LAST match of `pattern`.

    Args:
        text (str): the reply.
        pattern (str | re.Pattern): regex; group 1 is the answer when the pattern has groups, else the match.

    Returns:
        Optional[str]: the normalised answer, or None when nothing matches.
    """
    regex = compile_pattern(pattern) if isinstance(pattern, str) else pattern
    matches = list(regex.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return normalize(last.group(1) if regex.groups else last.group(0))
