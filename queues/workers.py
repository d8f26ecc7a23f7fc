"""One worker process as the supervisor tracks it, and what it is given at start.

Kept apart from the supervisor's event loop: the record of a worker from fork to
reaping, the identity policy (which ``uid:gid`` may be served at all), the scrubbed
environment a worker starts with, and how it is signalled.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

from istasks.settings import ENV_PREFIX, Settings
from queues.acl import WorkerUrls
from queues.budget import MemoryShare
from queues.control import Client
from queues.naming import Identity

#: Settings a worker must not see: the master secret (and any queue key: a worker gets
#: its own from the supervisor), admin Redis URLs (replaced by its own ACL'd ones),
#: session access and the supervisor's own knobs.
_NOT_FOR_WORKERS = frozenset(
    {
        "redis_url", "broker_url", "result_url", "cache_url", "session_redis_url",
        "session_public_key", "task_secret", "task_secret_file", "queue_key", "flower_basic_auth",
        "metrics_port", "supervisor_socket", "extra",
    }
)  # fmt: skip
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # workers parallelise by request; one BLAS thread each (the zygote needs it anyway)
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Worker:
    """One worker process, from fork to reaping."""

    identity: Identity
    started_at: float
    last_used: float
    deadline: float  # start deadline, then the SIGKILL deadline while stopping
    state: Literal["starting", "running", "stopping"] = "starting"
    pid: int | None = None
    epoch: int | None = None
    spawn_sock: socket.socket | None = None
    spawn_buffer: bytes = b""
    waiters: list[Client] = field(default_factory=list)
    reason: str = ""
    killed: bool = False
    ready: bool = False  # Celery consumes its queues
    run_as: tuple[int, int] | None = None  # (uid, gid) when not the identity's own
    share: MemoryShare | None = None  # the memory share last sent to it (queues.budget)

    def log_fields(self) -> tuple[str, int, int, int]:
        """queue, pid, and the uid and gid the process runs as, for log lines."""
        uid, gid = self.run_as or (self.identity.uid, self.identity.gid)
        return self.identity.queue, self.pid or 0, uid, gid

    def status_row(self, now: float) -> dict[str, Any]:
        """One line of the supervisor's status reply."""
        return {
            "queue": self.identity.queue, "uid": self.identity.uid, "gid": self.identity.gid,
            "pid": self.pid, "epoch": self.epoch, "state": self.state, "ready": self.ready,
            "idle_s": round(now - self.last_used, 3), "age_s": round(now - self.started_at, 3),
        }  # fmt: skip


def refusal(settings: Settings, identity: Identity) -> str | None:
    """Why ``identity`` is never served (uid/gid 0, outside the ranges), or None."""
    s = settings
    if identity.is_root:
        return f"refusing identity {identity.queue}: uid 0 and gid 0 are never served"
    if not s.uid_min <= identity.uid <= s.uid_max:
        return f"uid {identity.uid} is outside the served range {s.uid_min}..{s.uid_max}"
    if not s.gid_min <= identity.gid <= s.gid_max:
        return f"gid {identity.gid} is outside the served range {s.gid_min}..{s.gid_max}"
    if not s.serves_esaf(identity.gid):
        return f"ESAF {identity.gid} is not served on host {s.host} (IS_HOST_ESAFS)"
    return None


def worker_environment(settings: Settings, urls: WorkerUrls) -> dict[str, str]:
    """The scrubbed environment of a worker: non-secret settings plus its own Redis URLs."""
    env = dict(_BASE_ENV)
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if item.name in _NOT_FOR_WORKERS or value is None:
            continue
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        env[ENV_PREFIX + item.name.upper()] = text
    env[ENV_PREFIX + "BROKER_URL"] = urls.broker
    env[ENV_PREFIX + "RESULT_URL"] = urls.results
    env[ENV_PREFIX + "CACHE_URL"] = urls.cache
    return env


def describe_status(status: int) -> str:
    """``exit 3`` or ``signal 9 (SIGKILL)`` from a waitpid status."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"signal {number} ({signal.Signals(number).name})"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def signal_worker(pid: int, signum: int) -> None:
    """SIGTERM to the worker; SIGKILL to its whole process group (pool children too).

    Safe from pid reuse: the worker is the supervisor's child and not reaped yet, so its
    pid (and the group id it leads after setsid) still belong to it.
    """
    try:
        if signum == signal.SIGKILL:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass
