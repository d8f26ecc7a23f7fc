"""Stand-in worker entry for the supervisor tests: a real Celery worker with probe tasks.

Same signature and Celery configuration as ``istasks.worker.serve`` (contract 4), but
its tasks report what the process is (ids, groups, cwd, environment) and what the
kernel and Redis let it do, so the tests can check isolation from the outside.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis
from celery import Celery

from istasks.app import create_app
from istasks.settings import get_settings
from queues.envelope import open_envelope
from queues.naming import parse_queue_name


def _status_fields() -> dict[str, str]:
    with open("/proc/self/status") as status:
        lines = [line.split(":", 1) for line in status if ":" in line]
    return {k: v.strip() for k, v in lines if k in {"Uid", "Gid", "Groups", "NoNewPrivs", "Umask"}}


def _whoami(queue_key: bytes) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "ids": [os.getresuid(), os.getresgid()],
        "groups": os.getgroups(),
        "status": _status_fields(),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "key": queue_key.decode(),
    }


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return {"bytes": len(handle.read())}
    except OSError as exc:
        return {"errno": exc.errno}


def _redis(*args: str) -> dict[str, Any]:
    url = get_settings().cache
    assert url is not None
    client = redis.Redis.from_url(url)
    try:
        return {"ok": repr(client.execute_command(*args))}  # type: ignore[no-untyped-call]
    except redis.RedisError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def register(app: Celery, queue: str, queue_key: bytes) -> None:
    """Add the probe tasks, and an ``is.jpeg`` that sleeps for the job's ``sleep_s`` (a
    request a test can leave in flight while it kills the worker, contract 5), or, with
    ``sleep_once`` (a path), only when it is the first to create that file."""

    def whoami() -> dict[str, Any]:
        return _whoami(queue_key)

    app.task(name="probe.whoami")(whoami)
    app.task(name="probe.read")(_read)
    app.task(name="probe.redis")(_redis)

    def jpeg(token: str) -> dict[str, Any]:
        payload = open_envelope(queue_key, queue, token, 120)
        job = payload["job"]
        if "sleep_once" in job:
            try:
                os.close(os.open(job["sleep_once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return {"frames": [b"{}", b"{}", b"\xff\xd8"]}
        time.sleep(float(job.get("sleep_s", 0)))
        return {"frames": [b"{}", b"{}", b"\xff\xd8"]}

    app.task(name="is.jpeg")(jpeg)


def serve(
    queue: str, queue_key: bytes, *, concurrency: int | None = None, hostname: str | None = None
) -> None:
    """Consume ``queue`` and its prefetch queue until SIGTERM."""
    identity, _ = parse_queue_name(queue)
    app = create_app(get_settings(), identity)  # results and in-flight keys of its own
    register(app, queue, queue_key)
    worker = app.Worker(
        queues=[identity.queue, identity.prefetch_queue],
        hostname=hostname or f"is_{identity.uid}_{identity.gid}@{socket.gethostname()}",
        pool="threads",
        concurrency=concurrency or 2,
        without_gossip=True,
        without_mingle=True,
        loglevel="WARNING",
        quiet=True,
    )
    worker.start()


def serve_never_ready(
    queue: str, queue_key: bytes, *, concurrency: int | None = None, hostname: str | None = None
) -> None:
    """A worker that starts but never consumes (e.g. it cannot reach its broker)."""
    time.sleep(3600)
