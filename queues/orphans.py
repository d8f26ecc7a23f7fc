"""Processes a dead worker left behind, which the supervisor adopts as child subreaper.

A worker runs the external indexer in a session of its own (so that its timeout can
kill the indexer's whole process group). When the worker itself dies (SIGKILL, OOM)
or is killed after its stop grace, nobody enforces that timeout any more: the indexer
would run on for as long as it likes. Being the subreaper, the supervisor inherits such
orphans as children; :func:`adopted_orphans` finds them and :func:`kill_orphan` ends
each with its process group. Linux ``/proc`` only; standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Collection

log = logging.getLogger(__name__)

_PROC = "/proc"


def adopted_orphans(parent_pid: int, known: Collection[int]) -> list[int]:
    """Children of ``parent_pid`` that are not in ``known`` (its workers, the zygote)."""
    orphans = []
    with contextlib.suppress(OSError):
        for name in os.listdir(_PROC):
            if name.isdigit() and int(name) not in known and _parent(int(name)) == parent_pid:
                orphans.append(int(name))
    return orphans


def kill_orphan(pid: int) -> None:
    """SIGKILL an orphan, with its whole process group when it leads one (an indexer).

    Safe from pid reuse: the orphan is our unreaped child, so its pid and the group id
    it leads still belong to it.
    """
    try:
        group = os.getpgid(pid)
        command = _command(pid)
        if group == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    log.warning("orphan kill pid=%d group=%s cmd=%r (left by a worker that exited)",
                pid, "own" if group == pid else group, command)  # fmt: skip


def _parent(pid: int) -> int | None:
    """PPid of ``pid`` from /proc/<pid>/stat, None when it is gone or unreadable."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = text[text.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _command(pid: int) -> str:
    """The orphan's command line, shortened, for the log line."""
    try:
        with open(f"{_PROC}/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
