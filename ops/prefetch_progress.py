"""What ``isctl prefetch`` shows while it runs: frames done / total and the errors.

Drawn on stderr: redrawn in place on a terminal, one line every few seconds otherwise
(a log or a pipe stays readable), and a summary line at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Tally:
    """Frames done out of the total, and what went wrong."""

    total: int = 0
    done: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        """Every frame done, nothing failed."""
        return self.done == self.total and not self.errors

    def line(self) -> str:
        """The final summary line."""
        elapsed_s = time.monotonic() - self.started
        rate = self.done / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"prefetch: {self.done}/{self.total} frames done, {_errors(len(self.errors))}"
            f" in {elapsed_s:.1f} s ({rate:.1f} frames/s)"
        )


def _errors(count: int) -> str:
    return f"{count} error" + ("" if count == 1 else "s")


class ProgressBar:
    """``[####----] done/total frames, N errors`` on stderr: redrawn in place on a
    terminal, else one line every ``interval_s`` (logs stay readable)."""

    def __init__(self, stream: TextIO, *, width: int = 30, interval_s: float = 5.0) -> None:
        self._stream, self._width, self._interval_s = stream, width, interval_s
        self._tty = stream.isatty()
        self._last_s = -math.inf

    def draw(self, tally: Tally, *, force: bool = False) -> None:
        """Show the current state (throttled unless ``force`` or on a terminal)."""
        now = time.monotonic()
        if not (self._tty or force or now - self._last_s >= self._interval_s):
            return
        self._last_s = now
        filled = self._width * tally.done // tally.total if tally.total else 0
        bar = "#" * filled + "-" * (self._width - filled)
        text = f"[{bar}] {tally.done}/{tally.total} frames, {_errors(len(tally.errors))}"
        self._stream.write(f"\r{text}" if self._tty else f"{text}\n")
        self._stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an error, a finished dataset) without breaking the bar."""
        self._stream.write(("\r\x1b[K" if self._tty else "") + text + "\n")
        self._stream.flush()

    def finish(self, tally: Tally, *, max_errors: int = 10) -> None:
        """The last bar, the first errors and the summary line."""
        self.draw(tally, force=True)
        if self._tty:
            self._stream.write("\n")
        for text in tally.errors[:max_errors]:
            self._stream.write(f"  error: {text}\n")
        if len(tally.errors) > max_errors:
            self._stream.write(f"  ... and {len(tally.errors) - max_errors} more\n")
        self._stream.write(tally.line() + "\n")
        self._stream.flush()
