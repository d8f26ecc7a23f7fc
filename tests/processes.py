"""Stopping the child processes tests start: signal, wait, then kill."""

from __future__ import annotations

import signal
import subprocess


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
