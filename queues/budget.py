"""The memory budget of all workers of one host together, shared out by the supervisor.

A worker's in-process caches (reduced-image LRU, rendered-JPEG LRU) were sized per
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
from dataclasses import dataclass
from typing import Any

from istasks.settings import Settings

MIB = 1024 * 1024
#: Part of the machine's memory all workers may use together by default (the rest: Redis,
#: the bridge, the page cache that keeps detector files warm).
DEFAULT_MACHINE_FRACTION = 0.4
#: What a worker holds besides its caches (PSS of a worker that served views with its
#: caches empty: open readers, decode buffers, Celery; measured ~110-150 MiB, README).
WORKER_BASE_BYTES = 160 * MIB
#: Least cache a worker is given however many share the host (a few reduced images).
MIN_CACHE_BYTES = 24 * MIB


@dataclass(frozen=True)
class MemoryShare:
    """One worker's part of the host budget."""

    live: int  # workers sharing the budget when this was computed
    lru_max_bytes: int
    jpeg_lru_max_bytes: int
    hard_max_bytes: int  # PSS past which the worker drops its caches, then is recycled

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
            values = {f.name: int(body[f.name]) for f in dataclasses.fields(cls)}
        except (KeyError, TypeError, ValueError):
            return None
        return cls(**values)


def machine_memory_bytes() -> int:
    """MemTotal of /proc/meminfo (8 GiB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 1024 * MIB


def workers_max_bytes(settings: Settings) -> int:
    """The host budget: ``IS_WORKERS_MAX_BYTES``, or a part of the machine's memory."""
    if settings.workers_max_bytes > 0:
        return settings.workers_max_bytes
    return int(machine_memory_bytes() * DEFAULT_MACHINE_FRACTION)


def share_for(settings: Settings, live: int) -> MemoryShare:
    """Each of ``live`` workers' share: the host budget split evenly, less what a worker
    holds besides its caches, split between the two LRUs in the ratio of their
    configured ceilings (never above them)."""
    live = max(1, live)
    per_worker = workers_max_bytes(settings) // live
    caches = max(MIN_CACHE_BYTES, per_worker - WORKER_BASE_BYTES)
    ceilings = settings.lru_max_bytes + settings.jpeg_lru_max_bytes
    lru = caches if ceilings <= 0 else caches * settings.lru_max_bytes // ceilings
    lru = min(settings.lru_max_bytes, lru)
    jpeg = min(settings.jpeg_lru_max_bytes, caches - lru)
    # A derived budget never sets a limit below what a worker needs; one the operator
    # gave is taken as given (too small, and workers are recycled after every request).
    floor = 0 if settings.workers_max_bytes > 0 else WORKER_BASE_BYTES + 2 * MIN_CACHE_BYTES
    return MemoryShare(live, lru, jpeg, max(per_worker, floor))


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
