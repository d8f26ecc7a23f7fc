"""Send a request to its identity's Celery worker and hand back the reply frames.

:class:`CeleryDispatcher` signs the job for the identity's queue, sends it by task name
and returns a future that always resolves to the full reply frames, never raises. Waiting
costs no thread per request: one listener thread holds a single pattern subscription on
the result backend (the Redis backend publishes every result on a channel named after its
key), so a result is delivered the moment the worker stores it. This avoids Celery's
per-task result subscriptions, which leak channels and connections when used from many
threads (field notes 3.4), and each result is deleted right after it is read. Each
identity's worker stores its results under its own prefix (istasks.app.worker_isolation);
a result counts only under the prefix of the identity the task was sent to.
A watchdog thread enforces deadlines and notices dead workers through the pool's state.

A worker's death fails only the requests it could have taken: those sent before the pool
noticed it (:meth:`queues.pool.WorkerState.lost_since`). A request sent to a worker that
was already dead (the pool's answer is cached for half a second) is still in the queue:
it is left there for the next worker, which is started if need be. ``jpeg`` and
``spots`` are idempotent, so a request whose worker did die before replying is sent once
more, freshly sealed, under a new task id, if its deadline leaves time; whichever task
answers first answers the request and the other's result is dropped. ``index`` is never
sent twice (an indexer run twice).
Callbacks added to the returned futures run on these threads: keep them short.
Where there is more to tell than the frames show, a future resolves to a
:class:`bridge.outcome.Reply` (still the list of frames): the worker's cache outcome and
time, or an outcome such as timeout or unavailable (for the request log and metrics).

Several hosts (queues.liveness): every worker beats in Redis, so the watchdog also sees
another host's worker go (this host's are the supervisor's to tell, as above). A request
sent before such a worker was seen gone is sent again (``jpeg``, ``spots``) or failed
(``index``, only when that worker's last beat listed it as running), within the
heartbeat TTL plus a sweep, never waiting for the deadline. When the local supervisor
is unreachable, or this host does not serve the ESAF (``IS_HOST_ESAFS``), the request is
still sent when another host's worker of the identity is alive: it consumes the same
queue. Task ids start with ``isb-<host>-`` (readable in result keys, Flower and logs)
and a per-bridge random part: the pattern subscription hears our results only, so a
result goes back to the bridge that sent the task and to no other.

Index progress: the listener also hears every identity's progress channel and relays a
message only while that identity has an index request in flight that named its target
channel, onto the session Redis where is.js clients listen (bridge.progress).

Must stay light: no numpy, no h5py (the bridge is a small event loop).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from celery import Celery
from celery.backends.base import KeyValueStoreBackend
from celery.backends.redis import RedisBackend, SentinelBackend

from bridge.outcome import Outcome, Reply, exception_outcome
from bridge.progress import ProgressRelay, parse_progress
from istasks.app import TASK_NAMES, master_secret
from istasks.broker import use_pooled_client
from istasks.errors import IdentityError, IsError, WorkerUnavailable
from istasks.jobs import str_field
from istasks.keys import ENSURE, PROGRESS, RESULTS, result_prefix
from istasks.redisconn import celery_url, connect, sentinel_hosts
from istasks.replies import error_frames, error_text, success_frames
from istasks.settings import Settings
from queues.envelope import seal
from queues.liveness import HostsState, Liveness
from queues.naming import Identity
from queues.pool import WorkerPool, WorkerState

log = logging.getLogger(__name__)

Frames = list[bytes]

#: Extra wait for an index reply beyond index_timeout_s, so that the worker's own
#: "indexer timed out" reply (sent at index_timeout_s) wins over our generic timeout.
INDEX_GRACE_S = 10.0
#: How often the watchdog checks deadlines and worker epochs (contract item 5).
WATCH_INTERVAL_S = 0.25
#: Request kinds sent once more when their worker dies before replying: idempotent (a
#: view computed twice is the same view). Never ``index``, whose indexer would run twice.
RETRIED_KINDS = frozenset({"jpeg", "spots", "pixel"})
#: Sends after the first one, at most, for a worker death.
MAX_RETRIES = 1
#: Least time left before the deadline for a retry: a worker start and a cold view.
RETRY_MIN_S = 1.0
#: Read timeout of the result subscription (also how often the listener checks for stop).
READ_TIMEOUT_S = 0.5
#: Longest wait for the result subscription when the dispatcher starts.
SUBSCRIBE_WAIT_S = 5.0
#: Celery's result key prefix, before a worker's identity prefix is put in front.
TASK_META = KeyValueStoreBackend.task_keyprefix


class Dispatcher(Protocol):
    """How the bridge hands a request to a worker (contract item 3)."""

    def submit(
        self, identity: Identity, kind: str, job: dict[str, Any], request_id: str
    ) -> concurrent.futures.Future[Frames]:
        """Future of the full reply frames (a :class:`Reply` when the dispatcher knows
        more than they show); it always resolves, never raises."""
        ...

    def close(self) -> None:
        """Stop background threads; pending futures resolve with an error."""
        ...


@dataclass
class _Pending:
    """One request in flight, under one task id per send."""

    future: concurrent.futures.Future[Frames]
    identity: Identity
    kind: str
    request_id: str
    deadline: float  # time.monotonic()
    started: float
    job: dict[str, Any] | None = None  # kept while it may be sent again (RETRIED_KINDS)
    task_ids: list[str] = field(default_factory=list)
    epoch: int | None = None  # the worker watched; None while not sent (or sent again)
    sent_at: float = 0.0  # time.monotonic() just before the latest publish
    retries: int = 0
    progress_channel: str | None = None  # index: the client's progressPublisher


class PublishOnlyBackend(RedisBackend):  # type: ignore[misc]
    """The dispatcher's result backend: it never subscribes to a task's own channel.

    Celery's Redis backend subscribes each sent task's result channel (and unsubscribes
    when the AsyncResult is collected): two wasted round trips per request here, where
    _ResultListener reads every result; redis-py keeps every channel whose UNSUBSCRIBE
    confirmation is never read (~280 B per request in the bridge); and with Redis down
    the send sits ~20 s in the backend's reconnect loop instead of failing at once.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing to subscribe to: results come through the listener."""


class PublishOnlySentinelBackend(SentinelBackend):  # type: ignore[misc]
    """:class:`PublishOnlyBackend` behind Redis Sentinel (``IS_REDIS_SENTINELS``)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing to subscribe to: results come through the listener."""


class CeleryDispatcher:
    """Dispatcher over Celery with the Redis result backend."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        pool: WorkerPool | None = None,
        *,
        max_senders: int = 8,
        send_inline: bool = False,
        liveness: Liveness | None = None,
    ) -> None:
        if not settings.results:
            raise ValueError("no result backend: set IS_RESULT_URL or IS_REDIS_URL")
        # Before anything creates the (per-thread) backend: see PublishOnlyBackend.
        backend = "PublishOnlySentinelBackend" if sentinel_hosts(settings) else "PublishOnlyBackend"
        app.conf.result_backend = f"{__name__}:{backend}+{celery_url(settings.results, settings)}"
        use_pooled_client(app, celery_url(settings.broker, settings))
        self._app = app
        self._settings = settings
        self._pool = pool
        self._secret = master_secret(settings)
        # The bridge calls submit() from its admission threads, which may block: sending
        # there saves a hand-off to a sender thread per request (0.16 ms measured).
        self._send_inline = send_inline
        # Our own task-id prefix: the pattern subscription then sees only our results.
        self._id_prefix = f"isb-{settings.host}-{uuid.uuid4().hex[:12]}-"
        # Other hosts' workers (heartbeats in the broker Redis): only with a pool, whose
        # workers beat; without one (tests, hand-started workers) nothing is watched.
        if liveness is None and pool is not None and settings.broker:
            liveness = Liveness(settings.broker, settings=settings)
        self._liveness = liveness
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._senders = concurrent.futures.ThreadPoolExecutor(
            max_senders, thread_name_prefix="is-dispatch-send"
        )
        self._relay = ProgressRelay(settings.sessions) if settings.sessions else None
        self._listener = _ResultListener(app, settings, self._id_prefix, self)
        self._watchdog = threading.Thread(target=self._watch, name="is-dispatch-watch", daemon=True)
        self._listener.start()
        self._watchdog.start()
        if not self._listener.ready.wait(SUBSCRIBE_WAIT_S):
            log.warning("result subscription not ready after %.1f s; continuing", SUBSCRIBE_WAIT_S)

    # -- public API -------------------------------------------------------------------

    def submit(
        self, identity: Identity, kind: str, job: dict[str, Any], request_id: str
    ) -> concurrent.futures.Future[Frames]:
        """Send ``job`` as task ``kind`` to ``identity``'s queue: from a sender thread
        (never blocking on I/O), or on the calling thread with ``send_inline``."""
        future: concurrent.futures.Future[Frames] = concurrent.futures.Future()
        now = time.monotonic()
        entry = _Pending(future, identity, kind, request_id, now + self._timeout_s(kind), now)
        if kind == "index":
            entry.progress_channel = str_field(job, "progressPublisher") or None
        elif kind in RETRIED_KINDS and (self._pool is not None or self._liveness is not None):
            entry.job = job
        if kind not in TASK_NAMES:
            future.set_result(error_frames(f"bridge: unknown task kind {kind!r}"))
            return future
        if identity.is_root:  # the bridge refuses these first; never let one through
            refusal = error_frames(f"bridge: refusing to run as {identity.queue}")
            future.set_result(Reply(refusal, outcome="refused"))
            return future
        if self._closed.is_set():
            future.set_result(_unavailable("dispatcher closed", request_id))
            return future
        task_id = self._id_prefix + uuid.uuid4().hex
        with self._lock:  # registered now, so the deadline also covers starting the worker
            entry.task_ids.append(task_id)
            self._pending[task_id] = entry
        if self._send_inline:
            self._send(task_id, entry, job)
            return future
        try:
            self._senders.submit(self._send, task_id, entry, job)
        except RuntimeError:  # executor shut down between the check and the submit
            self.resolve(task_id, _unavailable("dispatcher closed", request_id))
        return future

    def close(self) -> None:
        """Stop threads and answer every pending request with an error."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._senders.shutdown(wait=True, cancel_futures=True)
        self._listener.stop()
        self._watchdog.join(timeout=2.0)
        if self._relay is not None:
            self._relay.close()
        if self._liveness is not None:
            self._liveness.close()
        with self._lock:
            pending, self._pending = self._pending, {}
        for entry in _distinct(pending):
            _settle(entry.future, _unavailable("bridge shutting down", entry.request_id))

    @property
    def pending_count(self) -> int:
        """Requests in flight (for metrics and tests)."""
        with self._lock:
            return len(_distinct(self._pending))

    # -- sending ----------------------------------------------------------------------

    def _timeout_s(self, kind: str) -> float:
        if kind == "index":
            return self._settings.index_timeout_s + INDEX_GRACE_S
        return self._settings.view_timeout_s

    def _send(self, task_id: str, entry: _Pending, job: dict[str, Any]) -> None:
        """Sender thread: ensure the worker, sign, publish; then watch that worker."""
        try:
            epoch = self._local_worker(entry.identity)
            if entry.future.done():
                return  # timed out (or closed) while the worker was starting
            token = seal(self._secret, entry.identity.queue, {"job": job, "rid": entry.request_id})
            entry.sent_at = time.monotonic()  # before: a worker gone after may have taken it
            self._app.send_task(
                TASK_NAMES[entry.kind],
                args=[token],
                queue=entry.identity.queue,
                task_id=task_id,
                expires=max(entry.deadline - time.monotonic(), 1.0),
                # Events (Flower) and worker logs show these instead of the envelope,
                # which carries the session's pid and the user's paths.
                argsrepr="('<envelope>',)",
                kwargsrepr="{}",
                # No queue declaration per send (kombu's maybe_declare copies and binds the
                # Queue even when cached: 100-150 us a request). On Redis a direct send to
                # a queue is an LPUSH onto its list, which no binding is consulted for; the
                # worker declares its own queues when it starts consuming them.
                declare=[],
            )
            entry.epoch = epoch
        except IsError as exc:
            reply = Reply(error_frames(exc.wire_text()), outcome=exception_outcome(exc))
            self.resolve(task_id, reply)
        except Exception as exc:  # broker down, kombu/redis errors: answer, never raise
            log.warning("send %s to %s failed: %s", entry.kind, entry.identity.queue, exc)
            self.resolve(task_id, _unavailable(f"broker unavailable ({exc})", entry.request_id))

    def _local_worker(self, identity: Identity) -> int | None:
        """This host's worker epoch for ``identity`` (started if need be), or None when
        the task goes to another host's live worker: this host does not serve the ESAF,
        or its supervisor cannot start one. Raises when no host can take the task."""
        if self._pool is None:
            return None
        if not self._settings.serves_esaf(identity.gid):
            if self._remote_live(identity) or self._started_elsewhere(identity):
                return None
            raise WorkerUnavailable(
                f"ESAF {identity.gid} is not served on host {self._settings.host}"
                f" and no other host's worker for {identity.queue} is up"
            )
        try:
            return self._pool.ensure(identity)
        except IdentityError:
            raise
        except WorkerUnavailable as exc:
            if not (self._remote_live(identity) or self._started_elsewhere(identity)):
                raise
            log.warning("%s; another host's worker for %s is up: sent there",
                        exc, identity.queue)  # fmt: skip
            return None

    def _started_elsewhere(self, identity: Identity) -> bool:
        """Ask the other hosts' bridges (channel ``is:ensure``) to start a worker for
        ``identity`` through their supervisors; whether one beats within the worker start
        timeout. (A host restricted by ``IS_HOST_ESAFS``, or whose supervisor is down,
        can then still serve an identity no worker runs for.)"""
        if self._liveness is None or self._settings.results is None:
            return False
        message = {"uid": identity.uid, "gid": identity.gid, "from": self._settings.host}
        try:
            client = connect(self._settings.results, self._settings, socket_timeout=2.0)
            try:
                listeners = int(client.publish(ENSURE, json.dumps(message)))
            finally:
                client.close()
        except redis.RedisError as exc:
            log.warning("cannot ask other hosts for a worker of %s: %s", identity.queue, exc)
            return False
        if listeners <= 1:  # only ourselves
            return False
        deadline = time.monotonic() + self._settings.worker_start_timeout_s
        while time.monotonic() < deadline and not self._closed.is_set():
            if self._liveness.state(identity, fresh=True).live:
                return True
            time.sleep(0.05)
        return False

    def on_ensure(self, data: bytes) -> None:
        """Listener callback: another host's bridge asks for a worker of an identity.
        Started here (on a sender thread) when this host serves its ESAF."""
        try:
            message = json.loads(data)
            identity = Identity(int(message["uid"]), int(message["gid"]))
            sender = str(message.get("from", ""))
        except (ValueError, KeyError, TypeError):
            log.warning("bad ensure request %r: ignored", data[:200])
            return
        pool = self._pool
        if pool is None or sender == self._settings.host or identity.is_root:
            return
        if not self._settings.serves_esaf(identity.gid):
            return
        log.info("host %s asks for a worker of %s: ensuring it here", sender, identity.queue)
        with contextlib.suppress(RuntimeError):  # shut down
            self._senders.submit(_ensure_quietly, pool, identity)

    def _remote_live(self, identity: Identity) -> bool:
        """Whether some host's worker of ``identity`` beats (queues.liveness)."""
        return self._liveness is not None and self._liveness.any_live(identity)

    # -- completion -------------------------------------------------------------------

    def pending_keys(self) -> list[tuple[str, bytes]]:
        """(task id, result key) of every task still waiting (the listener re-reads
        them after a reconnect)."""
        with self._lock:
            return [(tid, result_key(e.identity, tid)) for tid, e in self._pending.items()]

    def claim_result(self, channel: bytes) -> str | None:
        """The waiting task whose result key is ``channel``, or None: answered already,
        or published under another identity's prefix (a worker can write only its own,
        so one that learnt another identity's task id still cannot answer for it)."""
        task_id = channel.rpartition(TASK_META.encode())[2].decode("ascii", "replace")
        with self._lock:
            entry = self._pending.get(task_id)
        if entry is None:
            return None
        if channel != result_key(entry.identity, task_id):
            log.warning("result for %s came on %r: ignored", entry.identity.queue, channel)
            return None
        return task_id

    def resolve(self, task_id: str, frames: Frames) -> bool:
        """Answer one request exactly once; False when it was already answered."""
        with self._lock:
            found = self._pending.pop(task_id, None)
            for other in found.task_ids if found is not None else ():
                self._pending.pop(other, None)  # a late result of another send: dropped
        if found is None or found.future.done():
            return False
        _settle(found.future, frames)
        elapsed_ms = (time.monotonic() - found.started) * 1000.0
        log.debug(
            "%s %s rid=%s frames=%d bytes=%d %.1f ms",
            found.kind, found.identity.queue, found.request_id, len(frames),
            sum(map(len, frames)), elapsed_ms,
        )  # fmt: skip
        return True

    def on_progress(self, channel: bytes, data: bytes) -> None:
        """Listener callback with one worker's progress message: relay it to the channel
        it names if that identity has an index request in flight that named it."""
        parsed = parse_progress(channel, data)
        if parsed is None or self._relay is None:
            return
        identity, target, message = parsed
        with self._lock:
            wanted = any(
                e.identity == identity and e.progress_channel == target
                for e in self._pending.values()
            )
        if wanted:
            self._relay.put(target, message)
        else:
            log.debug("progress of %s for %r not in flight: dropped", identity.queue, target)

    def on_result(self, task_id: str, meta: dict[str, Any]) -> None:
        """Listener callback with the decoded result meta of one of our tasks."""
        with self._lock:
            entry = self._pending.get(task_id)
        if entry is None:
            return  # already answered (timeout) or a duplicate delivery
        self.resolve(task_id, _frames_from_meta(meta, entry.request_id))

    # -- watchdog ---------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_INTERVAL_S):
            try:
                self._sweep(time.monotonic())
            except Exception:  # the watchdog must survive anything
                log.exception("dispatch watchdog sweep failed")

    def _sweep(self, now: float) -> None:
        with self._lock:
            entries = [(e.task_ids[-1], e) for e in _distinct(self._pending)]
        states: dict[Identity, WorkerState | None] = {}
        hosts: dict[Identity, HostsState] = {}
        for task_id, entry in entries:
            if now >= entry.deadline:
                waited_s = now - entry.started
                text = f"{entry.kind} request timed out after {waited_s:.0f} s"
                self.resolve(task_id, _unavailable(text, entry.request_id, "timeout"))
                continue
            if self._pool is not None and entry.epoch is not None:
                if entry.identity not in states:
                    states[entry.identity] = self._worker_state(entry.identity)
                state = states[entry.identity]
                if state is not None:
                    self._check_worker(task_id, entry, state, now)
            if self._liveness is not None and entry.sent_at > 0.0 and not entry.future.done():
                if entry.identity not in hosts:
                    hosts[entry.identity] = self._liveness.state(entry.identity)
                self._check_hosts(task_id, entry, hosts[entry.identity], now)

    def _check_worker(self, task_id: str, entry: _Pending, state: WorkerState, now: float) -> None:
        """Act on the worker state of a request that was sent: a worker that could have
        taken it is gone (send it again, or fail it), or the worker it was sent to is not
        the live one (gone before the send: follow its successor, started if need be)."""
        epoch = entry.epoch
        if epoch is None:
            return  # being sent again meanwhile
        if state.lost_since(epoch, entry.sent_at):
            self._lost(task_id, entry, now, f"worker for {entry.identity.queue}")
        elif state.epoch != epoch:
            entry.epoch = None
            self._hand_off(self._follow, task_id, entry)

    def _check_hosts(self, task_id: str, entry: _Pending, state: HostsState, now: float) -> None:
        """Act on every host's heartbeats: a worker (of any host) that could have taken
        the request stopped beating after it was sent. ``index`` only when that worker's
        last beat listed it as running (never sent twice, and never failed while it may
        still run elsewhere)."""
        with self._lock:
            current = entry.sent_at > 0.0 and entry.task_ids[-1] == task_id
        if not current:
            return  # being sent again meanwhile
        certain = entry.kind not in RETRIED_KINDS
        gone = state.lost_since(
            task_id, entry.sent_at, certain=certain, other_than=self._own_host_watched()
        )
        if gone is not None:
            self._lost(task_id, entry, now, f"worker {gone.node}")

    def _own_host_watched(self) -> str:
        """Our host's name when its supervisor watches our host's workers (their deaths
        are then judged by its exact times, not by heartbeats); else ""."""
        return self._settings.host if self._pool is not None else ""

    def _lost(self, task_id: str, entry: _Pending, now: float, who: str) -> None:
        """A worker that could have taken the request is gone: send it again (once, if
        idempotent and its deadline leaves time), else answer with the error."""
        retry = entry.job is not None and entry.retries < MAX_RETRIES
        if retry and entry.deadline - now >= RETRY_MIN_S:
            self._send_again(entry)
            return
        text = f"{who} died while serving {entry.kind}"
        self.resolve(task_id, _unavailable(text, entry.request_id))

    def _send_again(self, entry: _Pending) -> None:
        """Retry: the same job, sealed afresh, under a new task id (the first task's
        result, should it come after all, is then late and dropped)."""
        assert entry.job is not None
        task_id = self._id_prefix + uuid.uuid4().hex
        with self._lock:
            if entry.future.done() or entry.task_ids[-1] not in self._pending:
                return  # answered meanwhile
            entry.retries += 1
            entry.epoch = None
            entry.sent_at = 0.0  # not sent yet: no loss can be seen for it meanwhile
            entry.task_ids.append(task_id)
            self._pending[task_id] = entry
        left_s = entry.deadline - time.monotonic()
        log.warning("worker for %s died before replying to %s rid=%s: sent again, %.1f s left",
                    entry.identity.queue, entry.kind, entry.request_id, left_s)  # fmt: skip
        self._hand_off(self._send, task_id, entry, entry.job)

    def _follow(self, task_id: str, entry: _Pending) -> None:
        """Sender thread: the request waits in the queue for the identity's live worker
        (started now if none runs); watch that one."""
        assert self._pool is not None
        try:
            epoch = self._pool.ensure(entry.identity)
        except IsError as exc:
            reply = Reply(error_frames(exc.wire_text()), outcome=exception_outcome(exc))
            self.resolve(task_id, reply)
            return
        except Exception as exc:  # the pool's transport: answer, never raise
            log.warning("ensure %s failed: %s", entry.identity.queue, exc)
            self.resolve(task_id, _unavailable(f"worker unavailable ({exc})", entry.request_id))
            return
        log.info("%s rid=%s was sent to a worker of %s already gone: follows epoch %d",
                 entry.kind, entry.request_id, entry.identity.queue, epoch)  # fmt: skip
        entry.epoch = epoch

    def _hand_off(self, work: Callable[..., None], task_id: str, *args: Any) -> None:
        """Run ``work(task_id, *args)`` on a sender thread: it may wait for a worker to
        start, the watchdog must not."""
        try:
            self._senders.submit(work, task_id, *args)
        except RuntimeError:  # shut down: close() answers the request
            return

    def _worker_state(self, identity: Identity) -> WorkerState | None:
        """The pool's state of ``identity``; None when it cannot be asked (which is not a
        dead worker)."""
        assert self._pool is not None
        try:
            return self._pool.state(identity)
        except Exception as exc:
            log.warning("state(%s) failed: %s", identity.queue, exc)
            return None


class _ResultListener(threading.Thread):
    """Pattern subscriptions on the result backend: our tasks' results under every
    identity's prefix (``is:res:*:celery-task-meta-<our prefix>*``) and the identities'
    progress channels (``is:progress:*``)."""

    def __init__(
        self, app: Celery, settings: Settings, id_prefix: str, owner: CeleryDispatcher
    ) -> None:
        super().__init__(name="is-dispatch-results", daemon=True)
        self._app = app
        self._settings = settings
        assert settings.results is not None
        self._url = settings.results
        self._owner = owner
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._pattern = f"{RESULTS}:*:{TASK_META}{id_prefix}*".encode()
        self._progress_pattern = f"{PROGRESS}:*".encode()

    def stop(self) -> None:
        """Ask the loop to end and wait for it."""
        self._stopping.set()
        self.join(timeout=2.0)

    def run(self) -> None:
        backoff_s = 0.1
        while not self._stopping.is_set():
            try:
                self._serve()
                backoff_s = 0.1
            except (redis.RedisError, OSError) as exc:
                self.ready.clear()
                log.warning("result listener lost Redis (%s); retrying in %.1f s", exc, backoff_s)
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)

    def _serve(self) -> None:
        # RESP2 on purpose: redis-py's RESP3 push-message path parses a 200 KB result
        # about 5x slower (2.6 ms vs 0.5 ms measured for a 1024 px JPEG reply).
        client = connect(
            self._url, self._settings, protocol=2, socket_connect_timeout=2.0,
            socket_keepalive=True,
        )  # fmt: skip
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.psubscribe(self._pattern, self._progress_pattern)
            pubsub.subscribe(ENSURE)
            self._await_subscription(pubsub, count=3)
            self.ready.set()
            self._recover(client)
            while not self._stopping.is_set():
                self._drain(pubsub, client)
        finally:
            pubsub.close()
            client.close()

    def _await_subscription(self, pubsub: Any, *, count: int) -> None:
        """Wait for the server's ``count`` confirmations so no later publish is missed."""
        deadline = time.monotonic() + SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] in ("psubscribe", "subscribe"):
                count -= 1
                if count == 0:
                    return
        raise redis.ConnectionError("no psubscribe confirmation")

    def _recover(self, client: redis.Redis) -> None:
        """Results stored while we were not subscribed are still under their keys."""
        for task_id, key in self._owner.pending_keys():
            payload = client.get(key)
            if isinstance(payload, bytes):
                self._deliver(task_id, payload)
                client.delete(key)

    def _drain(self, pubsub: Any, client: redis.Redis) -> None:
        """Read every message that is there (waiting briefly for the first), then delete
        the results read in one round trip."""
        consumed: list[bytes] = []
        message = pubsub.get_message(timeout=READ_TIMEOUT_S)
        while message is not None:
            if message["type"] == "message":  # the ENSURE channel: another host asks
                self._owner.on_ensure(bytes(message["data"]))
            elif message["type"] == "pmessage":
                channel = bytes(message["channel"])
                if bytes(message["pattern"]) == self._progress_pattern:
                    self._owner.on_progress(channel, bytes(message["data"]))
                else:
                    task_id = self._owner.claim_result(channel)
                    if task_id is not None:
                        self._deliver(task_id, bytes(message["data"]))
                    consumed.append(channel)  # late, duplicate or foreign: delete too
            # More already waiting? Never read with a zero timeout: a large result that
            # has only partly arrived would then fail as a read timeout.
            ready = pubsub.connection is not None and pubsub.connection.can_read(timeout=0)
            message = pubsub.get_message(timeout=READ_TIMEOUT_S) if ready else None
        if consumed:
            client.delete(*consumed)

    def _deliver(self, task_id: str, payload: bytes) -> None:
        try:
            meta = self._app.backend.decode(payload)
        except Exception as exc:  # a corrupt or foreign payload must not kill the loop
            log.warning("undecodable result for %s: %s", task_id, exc)
            meta = {"status": "FAILURE", "result": None}
        if isinstance(meta, dict):
            self._owner.on_result(task_id, meta)


def _ensure_quietly(pool: WorkerPool, identity: Identity) -> None:
    """Start ``identity``'s worker for another host; a refusal or failure is only logged."""
    try:
        pool.ensure(identity)
    except Exception as exc:
        log.warning("ensure %s for another host failed: %s", identity.queue, exc)


def result_key(identity: Identity, task_id: str) -> bytes:
    """Key (and channel) of task ``task_id``'s result as ``identity``'s worker stores it."""
    return f"{result_prefix(identity.uid, identity.gid)}{TASK_META}{task_id}".encode()


def _frames_from_meta(meta: dict[str, Any], request_id: str) -> Frames:
    """Reply frames from a task's stored meta (``{"frames": [...]}`` or ``{"error": s}``,
    with the worker's ``cache``, ``elapsed_ms`` and, for an image, ``validator``)."""
    result = meta.get("result")
    if meta.get("status") == "SUCCESS" and isinstance(result, dict):
        report = {"cache": result.get("cache", "none"), "worker_ms": result.get("elapsed_ms"),
                  "validator": result.get("validator")}  # fmt: skip
        frames = result.get("frames")
        if isinstance(frames, list) and all(isinstance(f, bytes) for f in frames):
            return Reply(success_frames(*frames), **report)
        error = result.get("error")
        if isinstance(error, str) and error:
            return Reply(error_frames(error), **report)
    if meta.get("status") == "REVOKED":
        return _unavailable("request expired before a worker took it", request_id, "timeout")
    log.error("task failed outside the service (status %s) rid=%s", meta.get("status"), request_id)
    return error_frames(error_text(RuntimeError("task failure"), request_id))


def _unavailable(text: str, request_id: str, outcome: Outcome = "unavailable") -> Reply:
    """The error reply of a request no worker answered."""
    frames = error_frames(WorkerUnavailable(f"{text} (request {request_id})").wire_text())
    return Reply(frames, outcome=outcome)


def _settle(future: concurrent.futures.Future[Frames], frames: Frames) -> None:
    """Set a result unless the caller cancelled the future meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(frames)


def _distinct(pending: dict[str, _Pending]) -> list[_Pending]:
    """Each request once (a request sent again is registered under each task id)."""
    return list({id(entry): entry for entry in pending.values()}.values())
