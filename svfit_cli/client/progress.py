"""A dependency-free one-line progress bar on stderr, so stdout stays clean for what scripts capture.

On a terminal the line is redrawn in place (at most ten times a second); in a log or a CI run, where `\\r`
would pile up into one unreadable line, a plain line is written every quarter of the way or every few
seconds instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
REDRAW_INTERVAL_S = 0.1
LOG_INTERVAL_S = 5.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:d}:{rest % 60:02d}"


class ProgressBar:
    """`update(done, total, note)` as often as you like; `message(text)` prints above the bar."""

    def __init__(self, label: str, *, total: float | None = None, fmt: Callable[[float], str] = lambda n: f"{n:g}",
                 stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.done = 0.0
        self.note = ""
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._drawn_at = 0.0
        self._logged_at = 0.0
        self._logged_quarter = -1
        self._last_logged = ""
        self._width = 0

    def _line(self) -> str:
        if self.total:
            fraction = min(max(self.done / self.total, 0.0), 1.0)
            filled = int(fraction * BAR_WIDTH)
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
            counts = f"{self.fmt(self.done)}/{self.fmt(self.total)} {fraction * 100:3.0f}%"
        else:
            bar, counts = "[" + "." * BAR_WIDTH + "]", self.fmt(self.done)
        return " ".join(part for part in (self.label, bar, counts, self.note) if part)

    def _draw(self, final: bool = False) -> None:
        line = self._line()
        if self.live:
            # Pad over the previous line's tail: a shorter note would leave its characters behind.
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = 0 if final else len(line)
        elif line != self._last_logged:  # a log gets no repeats of an unchanged line
            self._last_logged = line
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, done: float, total: float | None = None, note: str | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self.live:
            if now - self._drawn_at >= REDRAW_INTERVAL_S:
                self._drawn_at = now
                self._draw()
            return
        quarter = int(4 * self.done / self.total) if self.total else 0
        if quarter != self._logged_quarter or now - self._logged_at >= LOG_INTERVAL_S:
            self._logged_quarter, self._logged_at = quarter, now
            self._draw()

    def message(self, text: str) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        if self.live and self._width:
            self._draw()
        self.stream.flush()

    def close(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self._draw(final=True)
