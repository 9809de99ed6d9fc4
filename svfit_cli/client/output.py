"""Human output: aligned tables and `key: value` blocks on stdout. (`--json` output is `base.print_json`.)"""

from __future__ import annotations

import time
from collections.abc import Sequence


def when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        # The last column is not padded: it is often long (a model id) and trailing blanks help no one.
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)) + ("  " if len(row) > 1 else "") + row[-1])


def fields(pairs: Sequence[tuple[str, object]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}} {'-' if value is None else value}")
