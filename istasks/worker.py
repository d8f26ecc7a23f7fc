"""Entry point of one identity's Celery worker (contract item 4).

``python -m istasks.worker --queue UID:GID`` (or :func:`serve`) runs a worker that
consumes exactly ``UID:GID`` and ``UID:GID:prefetch``, in that priority order, with
node name ``is_<uid>_<gid>@<host>``. The process holds its queue's envelope key (given
by the supervisor, or ``IS_QUEUE_KEY``; dev only: derived from the master secret) and
refuses any task not sealed for its queue. Its Celery app stores results under keys of
its own identity (:func:`istasks.app.worker_isolation`).

Pool: threads. A request is mostly numpy/h5py/libjpeg work that releases the GIL, the
in-process LRU and open readers are shared by every thread (prefork would keep one copy
per child and pay a pickled hand-off per task), and there is no child-process start-up.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import signals
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.concurrency.thread import ApplyResult, TaskPool
from celery.worker.consumer import Consumer

from istasks.app import create_app, master_secret
from istasks.broker import use_pooled_client
from istasks.logs import configure_logging
from istasks.memory import GOVERNOR
from istasks.redisconn import celery_url, sentinel_hosts
from istasks.settings import Settings, get_settings
from queues import proctitle
from queues.envelope import queue_key as derive_queue_key
from queues.liveness import Heartbeat
from queues.naming import Identity, parse_queue_name

log = logging.getLogger(__name__)

#: Celery's own per-task INFO lines would log every envelope and a result repr; ours
#: (istasks.tasks) is the one line per request.
_QUIET_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.worker.consumer.mingle")
#: Seconds between attempts to reach a lost broker: first, added each time, at most.
RECONNECT_INTERVALS_S = (0.2, 0.2, 1.0)


def serve(
    queue: str, queue_key: bytes, *, concurrency: int | None = None, hostname: str | None = None
) -> None:
    """Run the worker for ``queue`` in this process until shutdown.

    Raises SystemExit with Celery's exit code when the worker stopped on an error.
    """
    started = time.monotonic()
    identity, is_prefetch = parse_queue_name(queue)
    if is_prefetch:
        raise ValueError(f"serve the interactive queue, not {queue!r}")
    settings = get_settings()
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Import the image core now, not on the first request (numpy, h5py, Pillow: ~0.5 s).
    from istasks.context import WorkerContext
    from istasks.service import build_service
    from istasks.tasks import register

    threads = concurrency or settings.worker_concurrency
    service = build_service(settings, identity, threads=threads)
    GOVERNOR.attach(service.cache.lru, service.jpegs, service.readers.close, service.frames)
    app = create_app(settings, identity)
    # Before anything creates the (per-thread) backend: see StoreOnlyBackend.
    backend = "StoreOnlySentinelBackend" if sentinel_hosts(settings) else "StoreOnlyBackend"
    app.conf.result_backend = f"{__name__}:{backend}+{celery_url(settings.results, settings)}"
    use_pooled_client(app, celery_url(settings.broker, settings))
    register(app, WorkerContext(queue, queue_key, settings, service))
    node = hostname or f"is_{identity.uid}_{identity.gid}@{settings.host}"

    heartbeat = _heartbeat(settings, identity, node)

    def _ready(**_: object) -> None:
        if heartbeat is not None:
            heartbeat.start()  # consuming now: other hosts' bridges may count on it
        log.info(
            "worker %s ready on %s in %.0f ms", node, queue, (time.monotonic() - started) * 1e3
        )

    signals.worker_ready.connect(_ready, weak=False)

    proctitle.set_title(proctitle.worker_title(node))
    worker = _titled(app.Worker)(
        hostname=node,
        queues=[queue, identity.prefetch_queue],
        pool_cls=WakingThreadPool,
        consumer_cls=PromptReconnectConsumer,
        concurrency=threads,
        loglevel=settings.log_level,
        quiet=True,
        # Mingle waits for other nodes' replies at start-up and gossip follows every
        # worker's events: per-identity workers need neither, and start faster.
        without_mingle=True,
        without_gossip=True,
    )
    try:
        worker.start()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        service.close()
    if worker.exitcode:
        raise SystemExit(worker.exitcode)


def _titled(worker_cls: Any) -> Any:
    """Celery's worker class, keeping the process title ours: Celery's own would be
    ``[celeryd: <node>:MainProcess] -active- (<argv>)``, and a forked worker's argv is
    the fork server's command line."""

    class TitledWorker(worker_cls):  # type: ignore[misc]
        def set_process_status(self, info: str) -> str:
            title = proctitle.worker_title(self.hostname)
            proctitle.set_title(title)
            return title

    return TitledWorker


def _heartbeat(settings: Settings, identity: Identity, node: str) -> Heartbeat | None:
    """The worker's liveness heartbeat (queues.liveness) listing its running tasks, so
    that every host's bridge sees it alive, and sees it go; None without a broker URL."""
    if not settings.broker:
        return None
    running: set[str] = set()
    lock = threading.Lock()

    def _prerun(task_id: str = "", **_: object) -> None:
        with lock:
            running.add(task_id)

    def _postrun(task_id: str = "", **_: object) -> None:
        with lock:
            running.discard(task_id)

    def _active() -> list[str]:
        with lock:
            return list(running)

    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
    return Heartbeat(
        settings.broker, identity, settings.host, node, _active, cache_url=settings.cache,
        settings=settings,
    )  # fmt: skip


class WakingThreadPool(TaskPool):  # type: ignore[misc]
    """Celery's thread pool, waking the consumer's event loop whenever a task ends.

    With ``worker_disable_prefetch`` the consumer stops asking Redis for messages while
    every thread is busy, and asks again only when its event loop next runs. Nothing
    wakes that loop when a thread frees up except, by chance, the task event the thread
    sends. With task events off (``celery control disable_events``, or no Flower to turn
    them on) 16 clients got 7-11 views/s instead of 110+, waiting up to a second per
    view; with the wake-up here the loop asks for the next message at once.
    """

    _hub: Any = None

    def register_with_event_loop(self, loop: Any) -> None:
        self._hub = loop
        super().register_with_event_loop(loop)

    def on_apply(self, *args: Any, **kwargs: Any) -> ApplyResult:
        result: ApplyResult = super().on_apply(*args, **kwargs)
        hub = self._hub
        if hub is not None:  # after the task's callbacks: its thread counts as free
            result.f.add_done_callback(lambda _: hub.call_soon(_ready_for_more))
        return result


def _ready_for_more() -> None:
    """Nothing to do: running the loop once is what re-arms the consumer."""


class PromptReconnectConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, trying a lost broker again every second at most.

    Celery asks kombu for its default back-off, 2 s more after each failed attempt and
    up to 30 s, so a worker came back up to 30 s after Redis did: 7-11 s after a 5-45 s
    outage, measured, with every view timing out meanwhile. An attempt on a Redis that
    is down is a refused connection, so trying each second costs nothing.
    """

    def ensure_connected(self, conn: Any) -> Any:
        start, step, most = RECONNECT_INTERVALS_S
        ensure = conn.ensure_connection
        # Celery passes no intervals, so kombu's defaults would apply: pass ours.
        conn.ensure_connection = functools.partial(
            ensure, interval_start=start, interval_step=step, interval_max=most
        )
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection


class StoreOnlyBackend(RedisBackend):  # type: ignore[misc]
    """The worker's result backend: stores a result without reading its key first, and
    without a transaction around the store and its publish.

    Celery GETs the key before every store so that a redelivered task cannot overwrite
    an earlier SUCCESS. Here no task is ever redelivered (acked when a thread takes it,
    no ack emulation: istasks.app) and every task id is new (the bridge makes one per
    request), so that GET was a wasted Redis round trip per request
    (0.3-0.4 ms of a warm view in the e2e bench).
    """

    def _set(self, key: str | bytes, value: bytes | str, expires: int | None = None) -> None:
        """SET with its expiry, then PUBLISH, in one pipelined write.

        Celery wraps the two in MULTI/EXEC and calls ``setex``, which redis-py 8
        deprecates (a warning raised and filtered on every result). Neither is needed:
        one connection's commands run in order, so the key exists before the bridge
        hears the publish. 50-70 us less per 130 kB result measured here.
        """
        if expires is None:
            expires = self.expires
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, value, ex=expires or None)
            pipe.publish(key, value)
            pipe.execute()

    def _store_result(
        self,
        task_id: str | bytes,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        try:
            self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result


class StoreOnlySentinelBackend(SentinelBackend):  # type: ignore[misc]
    """:class:`StoreOnlyBackend` behind Redis Sentinel (``IS_REDIS_SENTINELS``)."""

    _store_result = StoreOnlyBackend._store_result
    _set = StoreOnlyBackend._set


def worker_key(queue: str, settings: Settings) -> bytes:
    """The queue's envelope key: ``settings.queue_key`` (``IS_QUEUE_KEY``, set by whoever
    spawns this worker by hand), else, for development only, derived from the master
    secret (which then lives in this process)."""
    if settings.queue_key:
        return settings.queue_key.encode()
    log.warning("IS_QUEUE_KEY not set: deriving the queue key from the master secret (dev only)")
    return derive_queue_key(master_secret(settings), queue)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istasks.worker --queue UID:GID [--concurrency N] [--hostname NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m istasks.worker", description=__doc__)
    parser.add_argument("--queue", required=True, help="interactive queue UID:GID")
    parser.add_argument("--concurrency", type=int, default=None, help="threads (default setting)")
    parser.add_argument("--hostname", default=None, help="Celery node name")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings, "is-worker", tag=args.queue)
    try:
        key = worker_key(args.queue, settings)
        serve(args.queue, key, concurrency=args.concurrency, hostname=args.hostname)
        return 0
    except ValueError as exc:
        print(f"istasks.worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
