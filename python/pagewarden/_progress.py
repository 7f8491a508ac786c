"""A small progress bar for long work: redraws in place on a terminal, prints a line a second
otherwise (so logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Shows ``done / total`` with a label and free-form detail text."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def update(self, done: int, detail: str = "", force: bool = False) -> None:
        """Redraws the bar (at most every 0.1 s on a terminal, 1 s elsewhere)."""
        now = time.monotonic()
        interval = 0.1 if self.interactive else 1.0
        if not force and now - self._last < interval:
            return
        self._last = now
        frac = min(max(done / self.total, 0.0), 1.0)
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        line = f"{self.label} [{bar}] {frac * 100:5.1f}% {detail}"
        if self.interactive:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, done: int, detail: str = "") -> None:
        """Draws the final state and ends the line."""
        self.update(done, detail, force=True)
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.monotonic() - self._started
