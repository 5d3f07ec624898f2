"""Text shown in a terminal: control characters that come from data or a model are escaped, never obeyed.

Training data and generated text may hold ANSI/OSC escape sequences or carriage returns that would recolour,
clear or rewrite the user's terminal (or set its title, or hide text). Written to a terminal they are shown
as `\\x1b`, `\\r`, ...; piped or in `--json` the text is kept byte for byte.
"""

import re
from typing import Any

# C0 controls except tab and newline, DEL, and the C1 controls (U+0080-U+009F, e.g. U+009B = CSI)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and streams without `isatty`)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def escape_controls(text: str) -> str:
    """Replace each control character (tab and newline kept) by its visible `\\xNN` spelling.

    Args:
        text (str): text from data or a model.

    Returns:
        str: the text, safe to write to a terminal.
    """
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def for_stream(text: str, stream: Any) -> str:
    """`text` escaped when `stream` is a terminal, unchanged otherwise (pipes and files get the raw text).

    Args:
        text (str): text from data or a model.
        stream (Any): where it will be written.

    Returns:
        str: what to write.
    """
    return escape_controls(text) if is_terminal(stream) else text
