"""The memory budget of all workers of one host together, shared out by the supervisor.

A worker's in-process caches (reduced-image LRU, rendered-JPEG LRU, decoded-frame LRU)
were sized per
worker: 20 identities active in a shift asked for 24 GB on one host. Here the supervisor,
which knows how many identities are live, gives each worker an equal share of one host
budget (``IS_WORKERS_MAX_BYTES``, by default a part of the machine's memory): the share
shrinks as identities arrive and grows as they leave. The configured LRU sizes stay
ceilings. A worker past its share (its *hard limit*) once its requests are done drops
its caches and, still over, asks to be recycled (istasks.memory).

The share travels over the socket the supervisor already holds to each worker (the one
its spec came through, queues.forkserver): no file a worker of another uid could read or
write, no Redis key, and the supervisor learns on it when a worker asks to be recycled.

Memory is measured as PSS, not RSS: workers share the fork server's pages (Python,
numpy, Celery), which RSS would count once per worker. Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from istasks.settings import Settings

MIB = 1024 * 1024
#: Part of the machine's memory all workers may use together by default (the rest: Redis,
#: the bridge, the page cache that keeps detector files warm).
DEFAULT_MACHINE_FRACTION = 0.4
#: What a worker holds besides its caches: ~50 MiB idle (PSS: the fork server's pages are
#: shared), plus one request's working set, which for an Eiger2 16M frame (72 MB decoded,
#: its reduction's buffers) peaks near 200 MiB (bench soak: 16 workers with empty-ish
#: caches averaged ~200-220 MiB PSS while serving 16M views one at a time).
WORKER_BASE_BYTES = 256 * MIB
#: Least cache a worker is given however many share the host (a few reduced images).
MIN_CACHE_BYTES = 24 * MIB


@dataclass(frozen=True)
class MemoryShare:
    """One worker's part of the host budget."""

    live: int  # workers sharing the budget when this was computed
    lru_max_bytes: int
    jpeg_lru_max_bytes: int
    hard_max_bytes: int  # PSS past which the worker drops its caches, then is recycled
    #: The decoded-frame LRU (zoom/pan tiles, issue 13); last, with a default, so a share
    #: line without it (a supervisor of the previous release) still reads.
    frame_lru_max_bytes: int = 0

    def to_message(self) -> dict[str, Any]:
        """The line the supervisor sends to a worker."""
        return {"memory": dataclasses.asdict(self)}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> MemoryShare | None:
        """The share in a supervisor message, None when it holds none (or a bad one)."""
        body = message.get("memory")
        if not isinstance(body, dict):
            return None
        try:
            values = {
                f.name: int(body[f.name])
                for f in dataclasses.fields(cls)
                if f.name in body or f.default is dataclasses.MISSING
            }
        except (KeyError, TypeError, ValueError):
            return None
        return cls(**values)


def machine_memory_bytes() -> int:
    """MemTotal of /proc/meminfo (8 GiB when it cannot be read), or the memory limit of
    our cgroup when lower (a container: compose.yaml)."""
    total = 8 * 1024 * MIB
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            text = limit.read().strip()  # "max" when unlimited
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


def workers_max_bytes(settings: Settings) -> int:
    """The host budget: ``IS_WORKERS_MAX_BYTES``, or a part of the machine's memory."""
    if settings.workers_max_bytes > 0:
        return settings.workers_max_bytes
    return int(machine_memory_bytes() * DEFAULT_MACHINE_FRACTION)


def share_for(settings: Settings, live: int) -> MemoryShare:
    """Each of ``live`` workers' share: the host budget split evenly, less what a worker
    holds besides its caches, split between the three LRUs (reduced images, frames,
    JPEGs) in the ratio of their configured ceilings (never above them)."""
    live = max(1, live)
    per_worker = workers_max_bytes(settings) // live
    caches = max(MIN_CACHE_BYTES, per_worker - WORKER_BASE_BYTES)
    lru_c, frame_c = settings.lru_max_bytes, settings.frame_lru_max_bytes
    ceilings = lru_c + settings.jpeg_lru_max_bytes + frame_c
    lru = 0 if ceilings <= 0 else min(lru_c, caches * lru_c // ceilings)
    frames = 0 if ceilings <= 0 else min(frame_c, caches * frame_c // ceilings)
    jpeg = min(settings.jpeg_lru_max_bytes, caches - lru - frames)
    # A derived budget never sets a limit below what a worker needs; one the operator
    # gave is taken as given (too small, and workers are recycled after every request).
    floor = 0 if settings.workers_max_bytes > 0 else WORKER_BASE_BYTES + 2 * MIN_CACHE_BYTES
    return MemoryShare(live, lru, jpeg, max(per_worker, floor), frames)


def pss_bytes(pid: int | str = "self") -> int | None:
    """Proportional set size of a process (``/proc/<pid>/smaps_rollup``); None when it
    cannot be read (gone, or another uid's and we are not root)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set (``/proc/self/statm``: one cheap read, an upper bound
    of its PSS, so PSS is only read when this is over a limit)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PssSampler:
    """PSS of the live workers, read by a thread of its own every ``interval_s``.

    Reading ``smaps_rollup`` walks a process's page tables: 15-50 ms for a worker of a
    few hundred MB on a loaded host, so the supervisor's loop (which answers every
    ``ensure``) must never do it; its status shows the last values read here.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self._interval_s = interval_s
        self._pids: frozenset[int] = frozenset()
        self._values: dict[int, int | None] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def watch(self, pids: Iterable[int]) -> dict[int, int | None]:
        """Sample these pids from now on (new ones at once); their last PSS (None: not
        read yet, or unreadable)."""
        pids = frozenset(pids)
        if pids - self._pids:
            self._wake.set()
        self._pids = pids
        if self._thread is None:  # started on first use, in the process that serves
            self._thread = threading.Thread(target=self._run, name="is-pss", daemon=True)
            self._thread.start()
        values = self._values
        return {pid: values.get(pid) for pid in pids}

    def close(self) -> None:
        """Stop the thread."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stopped:
            pids = self._pids
            self._values = {pid: pss_bytes(pid) for pid in pids}  # replaced whole: no lock
            self._wake.wait(self._interval_s)
            self._wake.clear()
