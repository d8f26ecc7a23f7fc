"""The one Celery app, configured from :func:`istasks.settings.get_settings`.

The bridge imports this module to send tasks, so it must stay light: Celery and the
standard library only, never numpy or h5py. Workers add the tasks with
``istasks.tasks.register(app, context)``; the bridge only sends them by name.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from celery import Celery

from istasks.keys import result_prefix
from istasks.redisconn import celery_url, sentinel_options
from istasks.settings import Settings, get_settings
from queues.naming import Identity

#: Task names of the wire request types (contract item 1).
#: ``pixel`` is the gateway's own (the value under the viewer's cursor); the ZeroMQ bridge
#: never sends it (bridge.server.KINDS), so is.js meets the original's types only.
TASK_NAMES = {"jpeg": "is.jpeg", "spots": "is.spots", "index": "is.index", "pixel": "is.pixel"}

#: Results are read once, straight from the backend's pub/sub message, and deleted by
#: the bridge right after; the stored copy only bridges a dropped pub/sub connection.
RESULT_EXPIRES_S = 120


def celery_config(settings: Settings, identity: Identity | None = None) -> dict[str, Any]:
    """Celery settings derived from ours; every choice that differs from Celery's default
    is explained here because several are security or latency decisions.

    ``identity``: the configuration of that identity's worker, whose result keys are
    its own (:func:`worker_isolation`); None for the bridge and tools.
    """
    sentinel = sentinel_options(settings)  # {} unless behind Redis Sentinel
    config = {
        "broker_url": celery_url(settings.broker, settings),
        "result_backend": celery_url(settings.results, settings),
        # No pickle anywhere: anyone who can write to the broker could otherwise run
        # code as every per-user worker (CELERYSA-0001, field notes 3.1). Task messages
        # are JSON (one string argument); results are msgpack so JPEG bytes travel as
        # native binary instead of +34% base64.
        "task_serializer": "json",
        "result_serializer": "msgpack",
        "accept_content": ["json", "msgpack"],
        "result_accept_content": ["json", "msgpack"],
        "event_serializer": "json",
        # Per-identity queues ("uid:gid") are created on first use.
        "task_create_missing_queues": True,
        # Take a message only when a thread is free (Redis-only option, Celery 5.6+):
        # the interactive-before-prefetch order is then decided when the work starts,
        # not when it was fetched, and nothing waits behind a long index job in a
        # private buffer. Measured: no latency cost (BRPOP is already waiting).
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        # Early ack on purpose: a task is acknowledged when a thread takes it, so it never
        # runs twice (with acks_late Redis redelivers a long one: field notes 3.6); a lost
        # view request is simply retried by the user, a duplicated index job is not.
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "result_expires": RESULT_EXPIRES_S,
        # A result that cannot be stored (Redis restarting, or the worker's ACL user not
        # re-created yet) is retried, not dropped: dropped, its client would wait for the
        # whole deadline (index: 30 min) for a reply that was ready. Full-jitter backoff
        # 0.1 s .. 1 s, at most ~20 s; only connection errors are retried.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "result_extended": False,
        "task_track_started": False,
        # Priority lists: interactive queue first, ":prefetch" queue only when idle.
        # No polling_interval anywhere: the Redis transport waits in BRPOP and wakes on
        # push (polling_interval would only change the BRPOP timeout), and the bridge
        # gets results by pub/sub push (bridge.dispatch). Measured warm round trip of a
        # small reply ~3 ms, of a 1024 px JPEG ~11 ms (bench/bench_tasks.py).
        "broker_transport_options": {
            "queue_order_strategy": "priority",
            # No ack emulation: kombu would record every delivered message in an
            # "unacked" hash, a Redis round trip on delivery and another on ack (0.4 ms
            # of every view's path, measured), to redeliver it after a visibility
            # timeout. Tasks are acked the moment a thread takes them, so that would
            # guard a millisecond, and a redelivered view is past its expiry anyway. A
            # worker that stops cleanly still puts back what it took and did not start.
            "ack_emulation": False,
            "socket_connect_timeout": 2.0,
            **sentinel,
        },
        "result_backend_transport_options": {"socket_connect_timeout": 2.0, **sentinel},
        "redis_socket_connect_timeout": 2.0,
        "redis_socket_timeout": 10.0,
        # A send to a dead broker fails within about a second instead of hanging.
        "broker_connection_timeout": 2.0,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.0,
            "interval_step": 0.2,
            "interval_max": 0.4,
        },
        # Logging is ours (module loggers, one line per task); events feed Flower.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Task events are three publishes per task: off unless IS_TASK_EVENTS (Celery's
        # default too) where nobody reads them. Where Flower runs the setting is on, so a
        # new worker's first tasks show: Flower turns events on in every worker only
        # every 5 s.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "worker_enable_remote_control": True,
        "broker_connection_max_retries": None,
        "enable_utc": True,
    }
    if identity is not None:
        config.update(worker_isolation(config, identity))
    return config


def worker_isolation(config: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """Result options that give one identity's worker Redis keys of its own, so that its
    ACL user (queues.acl) reaches no other identity's results.

    Every result key and channel gets the prefix ``is:res:<uid>:<gid>:`` (Celery's
    ``global_keyprefix``, Celery >= 5.3). The bridge knows each task's identity and
    reads exactly there (bridge.dispatch), so a worker can neither read another ESAF's
    images nor forge another identity's replies. (Without ack emulation, see
    :func:`celery_config`, workers keep no in-flight messages in Redis at all.)
    """
    return {
        "result_backend_transport_options": {
            **config["result_backend_transport_options"],
            "global_keyprefix": result_prefix(identity.uid, identity.gid),
        },
    }


def create_app(settings: Settings | None = None, identity: Identity | None = None) -> Celery:
    """A new Celery app for ``settings`` (default: the process settings); with
    ``identity``, the app of that identity's worker (or of a tool reading its results)."""
    settings = settings or get_settings()
    app = Celery("is", set_as_current=False)
    app.conf.update(celery_config(settings, identity))
    return app


@functools.lru_cache(maxsize=1)
def get_app() -> Celery:
    """The process-wide app built from :func:`get_settings` (tests build their own)."""
    return create_app(get_settings())


def master_secret(settings: Settings) -> bytes:
    """The envelope master secret (``IS_TASK_SECRET`` or the file ``IS_TASK_SECRET_FILE``).

    Raises ValueError naming both variables when neither is set or the secret is empty:
    the bridge cannot sign tasks without it, and a default would be a shared password.
    """
    if settings.task_secret:
        secret = settings.task_secret.encode()
    elif settings.task_secret_file:
        try:
            secret = Path(settings.task_secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read IS_TASK_SECRET_FILE: {exc}") from exc
    else:
        raise ValueError("no task secret: set IS_TASK_SECRET or IS_TASK_SECRET_FILE")
    if not secret:
        raise ValueError("the task secret (IS_TASK_SECRET / IS_TASK_SECRET_FILE) is empty")
    return secret


def __getattr__(name: str) -> Celery:
    """``celery -A istasks.app ...`` (Flower) finds ``app`` without import-time config."""
    if name in {"app", "celery"}:
        return get_app()
    raise AttributeError(name)
