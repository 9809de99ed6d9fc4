"""JSON request bodies as a hostile client writes them: NaN and Infinity as JavaScript literals (Python's
json.dumps writes them so), and `Raw` literals such as `1e999` or a 400-digit integer written as is."""

from __future__ import annotations

import json
from typing import Any


class Raw(str):
    """A JSON literal sent as written (`1e999`, a 400-digit integer), not as a string."""


def body_text(body: dict[str, Any]) -> str:
    raws: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            placeholder = f"__raw_{len(raws)}__"
            raws[placeholder] = str(value)
            return placeholder
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))  # allow_nan: NaN and Infinity come out as JavaScript literals
    for placeholder, literal in raws.items():
        text = text.replace(f'"{placeholder}"', literal)
    return text
