"""Field checks shared by the grader families: each takes the value and its full path (`grader.input[0]
.role`) and raises GraderError naming that path, so every refusal points at the exact field."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from graders.errors import GraderError
from graders.limits import MAX_NAME_CHARS


def child(path: str, key: str) -> str:
    return f"{path}.{key}"


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def check_object(value: Any, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise GraderError(f"'{path}' must be an object, not {type_name(value)}.", path)
    return value


def check_keys(obj: Mapping, path: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Every required key present, no key outside required + optional (as OpenAI refuses unknown ones)."""
    required = tuple(required)
    for key in required:
        if key not in obj:
            raise GraderError(f"Missing required field '{child(path, key)}'.", child(path, key))
    allowed = set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            shown = key if isinstance(key, str) and len(key) <= 64 else repr(key)[:64]
            raise GraderError(
                f"Unknown field '{shown}' in '{path}'; allowed: {', '.join(sorted(allowed))}.", child(path, str(shown))
            )


def check_str(value: Any, path: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise GraderError(f"'{path}' must be a string, not {type_name(value)}.", path)
    if not allow_empty and not value.strip():
        raise GraderError(f"'{path}' must not be empty.", path)
    if len(value) > max_chars:
        raise GraderError(f"'{path}' is {len(value)} characters long; the limit is {max_chars}.", path)
    return value


def check_name(obj: Mapping, path: str) -> str:
    return check_str(obj["name"], child(path, "name"), max_chars=MAX_NAME_CHARS)


def check_enum(value: Any, path: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value)[:80] if isinstance(value, str) else type_name(value)
        raise GraderError(f"'{path}' must be one of {', '.join(allowed)}; got {shown}.", path)
    return value


def check_number(value: Any, path: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite JSON number (not a boolean) within [low, high] (or (low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraderError(f"'{path}' must be a number, not {type_name(value)}.", path)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise GraderError(f"'{path}' must be a finite number.", path)
    if low is not None and (number < low or (low_open and number == low)):
        bound = "greater than" if low_open else "at least"
        raise GraderError(f"'{path}' must be {bound} {low:g}; got {number:g}.", path)
    if high is not None and number > high:
        raise GraderError(f"'{path}' must be at most {high:g}; got {number:g}.", path)
    return number


def check_int(value: Any, path: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraderError(f"'{path}' must be an integer, not {type_name(value)}.", path)
    if (low is not None and value < low) or (high is not None and value > high):
        raise GraderError(f"'{path}' must be between {low} and {high}; got {value}.", path)
    return value


def check_list(value: Any, path: str, *, max_items: int, allow_empty: bool = False) -> list:
    if not isinstance(value, list | tuple):
        raise GraderError(f"'{path}' must be an array, not {type_name(value)}.", path)
    if not value and not allow_empty:
        raise GraderError(f"'{path}' must not be empty.", path)
    if len(value) > max_items:
        raise GraderError(f"'{path}' has {len(value)} items; the limit is {max_items}.", path)
    return list(value)

