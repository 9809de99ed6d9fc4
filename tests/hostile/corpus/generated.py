"""Upload bodies too big (or too repetitive) to keep as files: built on demand, each by one function.

Sizes are the point of these cases, so they are fixed here rather than scaled down: a 50 MB single line,
two million tiny lines, JSON nested a hundred thousand deep.
"""

from __future__ import annotations

import json

MB = 1024 * 1024


def _line(example: dict) -> bytes:
    return json.dumps(example).encode() + b"\n"


def fifty_mb_single_line() -> bytes:
    """One classification example whose text is 50 MB: longer than the per-line limit (16 MiB)."""
    return b'{"text": "' + b"a" * (50 * MB) + b'", "label": 0}\n'


def two_million_empty_objects() -> bytes:
    """2,000,000 lines of `{}`: each valid JSON, none an example. 6 MB."""
    return b"{}\n" * 2_000_000


def two_million_blank_lines() -> bytes:
    return b"\n" * 2_000_000


def two_million_junk_examples() -> bytes:
    """2,000,000 short lines that look like examples but put a number where the text goes."""
    return b'{"text":1,"label":0}\n' * 2_000_000


def deeply_nested_array() -> bytes:
    """`[[[[…]]]]` 100,000 deep: Python's json recurses once per level."""
    depth = 100_000
    return b"[" * depth + b"]" * depth + b"\n"


def deeply_nested_value() -> bytes:
    """A plausible example whose text is an array nested 5,000 deep."""
    depth = 5_000
    return _line({"text": "ok", "label": 0}) + b'{"text": ' + b"[" * depth + b"]" * depth + b', "label": 0}\n'


def huge_integer_label() -> bytes:
    """A label with 5,000 digits: over Python's int-parsing limit (4,300 digits), a ValueError not a JSONDecodeError."""
    return _line({"text": "ok", "label": 0}) + b'{"text": "x", "label": ' + b"9" * 5_000 + b"}\n"


def hundred_thousand_keys() -> bytes:
    """One object with 100,000 keys and none of the format keys: its problem must not quote them all."""
    keys = {f"key{i}": i for i in range(100_000)}
    return _line(keys)


def megabyte_label() -> bytes:
    """A label that is a 1 MB string: the problem quotes the value, and must cut it short."""
    return _line({"text": "x", "label": "L" * MB})


def valid_then_junk_tail() -> bytes:
    """A valid file whose last line (no newline after it) is garbage: the unterminated tail is a line too."""
    good = b"".join(_line({"text": f"t{i}", "label": i % 2}) for i in range(5))
    return good + b"\x00\x01garbage"
