"""The one unknown-key check and the one typed-field check of Verse's configuration dataclasses (training, data).

YAML hands us whatever the user typed (`lr=.inf`, `out_dir=5`, `data=[1]`, `seed=1e20`); these turn every such
value into one `ConfigError` line naming the field, before anything heavy runs.
"""

import dataclasses
import math
import typing
from typing import Any, Dict, Mapping, Tuple

from verse.errors import ConfigError


def check_keys(data: Any, cls: type, where: str, hint: str = "") -> Dict[str, Any]:
    """`data` as a plain dict of `cls`'s fields, or a `ConfigError` for a non-mapping or an unknown key.

    Args:
        data (Any): the parsed mapping (e.g. a YAML section).
        cls (type): the dataclass whose fields are the allowed keys.
        where (str): what `data` is (a file name, `data`, `data.sources[0]`), named in the error.
        hint (str): what to do about an unknown key; default: list the known ones.

    Returns:
        Dict[str, Any]: a shallow copy of `data`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__} "
                          f"{data!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((str(k) for k in data if k not in known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; {hint or 'known: ' + ', '.join(known)}")
    return dict(data)


def check_types(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass instance `obj` against its annotation, in place.

    `int` fields take integers (not booleans), `float` fields finite numbers (a string YAML left unparsed, such as
    `3e-4`, becomes the number it spells), `bool`/`str` their own type, `Optional[X]` also None, `List`/`Dict` a
    list/mapping (their items are the owner's to check); `Any` and other dataclasses pass.

    Args:
        obj (Any): a dataclass instance.
        prefix (str): put before the field name in the error (`"config: "`, `"data."`).

    Raises:
        ConfigError: `{prefix}{field}: must be ..., got ...` for the first field of the wrong type.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, value, kind = _conform(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{prefix}{f.name}: must be {kind}, got {value!r:.60}", f.name)
        setattr(obj, f.name, value)


def _conform(value: Any, expected: Any) -> Tuple[bool, Any, str]:
    """(whether `value` fits the annotation `expected`, the value (numbers from strings), what was expected)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return True, value, ""
        inner = [a for a in args if a is not type(None)]
        ok, value, kind = _conform(value, inner[0]) if len(inner) == 1 else (True, value, "")
        return ok, value, f"{kind} or null"
    if expected is bool:
        return isinstance(value, bool), value, "true or false"
    if expected is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:  # 1e3 written 1.0e3
            value = int(value)
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if expected is float:
        value = as_number(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        return ok, float(value) if ok else value, "a finite number"
    if expected is str:
        return isinstance(value, str), value, "a string"
    if origin in (list, typing.List):
        return isinstance(value, list), value, "a list"
    if origin in (dict, typing.Dict):
        return isinstance(value, Mapping), value, "a mapping"
    return True, value, ""


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def as_number(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string: the number it spells; any other value as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value
