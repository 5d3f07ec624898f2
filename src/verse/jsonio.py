"""Reading JSON files a user (or a downloaded checkpoint) provides: one place, one-line errors.

Every reader of config.json, verse.json, tokenizer_config.json, generation_config.json, index files and training
state goes through `read_json`, so a missing, non-UTF-8, malformed, too deeply nested or oversized file always
ends in one `VerseError` line naming the file.
"""

import json
from pathlib import Path
from typing import Any, Type

from verse.errors import CheckpointError, VerseError

MAX_JSON_BYTES = 256 * 2**20  # the largest tokenizer.json files are ~30 MB; configs are a few KB


def parse_json(text: str | bytes, source: str | Path, error: Type[VerseError] = CheckpointError) -> Any:
    """Parse JSON text, raising `error` that names `source` when it is not valid JSON.

    Args:
        text (str | bytes): the JSON text (bytes must be UTF-8).
        source (str | Path): where the text came from (named in errors).
        error (Type[VerseError]): the error class to raise.

    Returns:
        Any: the parsed value.
    """
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)  # never guess UTF-16/32
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); fix or replace the file") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e}); fix or replace the file") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read; fix or replace the file") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise error(f"{source}: not valid JSON ({str(e).splitlines()[0]}); fix or replace the file") from None


def read_json(path: str | Path, error: Type[VerseError] = CheckpointError, expect: type = dict,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file, raising `error` (one line naming the file) when it is missing, unreadable or malformed.

    Args:
        path (str | Path): the file.
        error (Type[VerseError]): the error class to raise (CheckpointError, ConfigError, ...).
        expect (type): the type the top-level value must have (dict: a JSON object); `object` accepts anything.
        max_bytes (int): larger files are refused before they are read.

    Returns:
        Any: the parsed value.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a JSON file here (at most {max_bytes})")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    value = parse_json(data, path, error)
    if not isinstance(value, expect):
        kinds = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}
        raise error(f"{path}: expected {kinds.get(expect, expect.__name__)}, got {type(value).__name__}")
    return value
