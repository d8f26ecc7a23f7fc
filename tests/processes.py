"""Child processes in tests: stopping them (signal, wait, then kill) and waiting for what
they do in the background."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import pytest


def terminate(
    proc: subprocess.Popen[bytes], *, signum: int = signal.SIGTERM, timeout_s: float = 30.0
) -> None:
    """Send ``signum`` (if still running), wait ``timeout_s``, SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``predicate()`` until true; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
