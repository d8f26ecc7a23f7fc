"""The bridge's event loop: is.js requests in on a ROUTER, replies out, each exactly once.

One thread owns the ZeroMQ socket (sockets are not thread-safe). It parses envelopes and
answers malformed ones at once; session checks, identity lookups and dispatch run on a
small thread pool (they wait on Redis and NSS), and finished replies come back to the
loop through a queue plus a wake-up pipe polled next to the socket. A slow request never
delays another, and a deadline per request guarantees an answer even if a dispatcher
never resolves its future. Every answer is logged as one ``key=value`` line (and counted
in the metrics, when given) with its outcome (:mod:`bridge.outcome`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from bridge.outcome import Outcome, Reply, exception_outcome, frames_outcome
from bridge.sessions import SessionVerifier
from bridge.wire import MalformedEnvelope, parse_job, reply_message, split_envelope
from istasks.errors import (
    IsError,
    RequestError,
    SessionBusy,
    UnknownRequestType,
    WorkerUnavailable,
)
from istasks.jobs import Job, dumps, int_field, str_field
from istasks.logs import log_value, redact_token, token_prefix
from istasks.replies import exception_frames
from istasks.settings import Settings
from queues.identity import IdentityResolver

if TYPE_CHECKING:  # the protocol only; importing it at run time would load Celery
    from bridge.dispatch import Dispatcher
    from bridge.metrics import BridgeMetrics

log = logging.getLogger(__name__)

KINDS = frozenset({"jpeg", "spots", "index"})
OBSOLETE_TYPES = frozenset(
    {"rsync_host_test", "rsync_connection_test", "local_dir_stats", "rsync_transfer"}
)
#: Per-socket message queues. The original used 0 (unbounded); a bound keeps a stalled
#: proxy from eating memory (10k jpeg replies ~ 1 GB), and ROUTER_MANDATORY makes a
#: full queue a logged drop instead of a silent one.
SOCKET_HWM = 10_000
#: How long close() may spend flushing replies already queued.
LINGER_MS = 500
#: Requests accepted at once; more are refused at once with an error frame.
MAX_IN_FLIGHT = 10_000
#: Threads doing session checks, identity lookups and dispatch (which sends the task and
#: may wait up to IS_WORKER_START_TIMEOUT_S for a new identity's worker to start).
ADMIT_THREADS = 16
#: Extra wait beyond the dispatcher's own deadline before the loop answers by itself.
DEADLINE_MARGIN_S = 5.0
#: After SIGTERM, how long in-flight requests may still finish before getting an error.
SHUTDOWN_GRACE_S = 2.0
#: Messages read per loop turn before completions are delivered again (fairness).
READ_BATCH = 256
#: ZMTP heartbeats on the connection to the proxy (several hosts): we ping every
#: HEARTBEAT_IVL_MS, and the proxy is told (TTL) to drop us after HEARTBEAT_TTL_MS
#: without traffic, so it stops sending requests to a bridge whose host vanished
#: without closing its TCP connection (power, network) within 2 s. We drop a silent
#: proxy after HEARTBEAT_TIMEOUT_MS and reconnect.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
HEARTBEAT_TTL_MS = 1500
_WAKE = b"!"


def request_kind(job: Job) -> str:
    """The task kind of ``job``'s ``type`` (case-insensitive), or UnknownRequestType (spec 2.5)."""
    kind = str_field(job, "type")
    if kind is None:
        raise UnknownRequestType(f"No type parameter in job {dumps(job)}")
    lowered = kind.lower()
    if lowered in KINDS:
        return lowered
    if lowered in OBSOLETE_TYPES:
        raise UnknownRequestType(f"Obsolete job type '{kind}' in job '{dumps(job)}'")
    raise UnknownRequestType(f"Unknown job type '{kind}' in job '{dumps(job)}'")


def request_pid(job: Job) -> str:
    """The session token of ``job``; RequestError like the original's main when absent."""
    pid = str_field(job, "pid")
    if pid is None:
        raise RequestError("request does not contain pid")
    return pid


@dataclass
class _InFlight:
    """A request accepted and not yet answered."""

    rid: str
    route: tuple[bytes, ...]
    job: Job | None
    started: float  # time.monotonic()
    identity: str = "-"
    session: str | None = None  # the pid it counts against while in flight


@dataclass(frozen=True)
class _Completion:
    """A reply ready to send, handed from a pool thread to the loop."""

    rid: str
    frames: list[bytes]
    identity: str = "-"
    outcome: Outcome | None = None  # None: read it from the frames


@dataclass
class _Stopping:
    """Shutdown state: set once stop() is seen by the loop."""

    requested: threading.Event = field(default_factory=threading.Event)
    grace_end: float | None = None


class BridgeServer:
    """The ZeroMQ front of the service: binds or connects a ROUTER and serves requests.

    Construct, then call :meth:`serve_forever` in the thread that will own the socket
    (or :meth:`start` for a background thread); :meth:`stop` may be called from any
    thread or a signal handler.
    """

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        sessions: SessionVerifier,
        identities: IdentityResolver,
        *,
        context: zmq.Context[Any] | None = None,
        admit_threads: int = ADMIT_THREADS,
        deadline_margin_s: float = DEADLINE_MARGIN_S,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._sessions = sessions
        self._identities = identities
        self._margin_s = deadline_margin_s
        self._grace_s = shutdown_grace_s
        self._socket = _open_router(context or zmq.Context.instance(), settings)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            admit_threads, thread_name_prefix="is-bridge-admit"
        )
        self._done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Guards the pipe against use after close; re-entrant because stop() may run in a
        # signal handler on the loop thread while _close() holds it.
        self._wake_lock = threading.RLock()
        self._closed = False
        self._in_flight: dict[str, _InFlight] = {}
        self._per_session: collections.Counter[str] = collections.Counter()
        self._deadlines: list[tuple[float, str]] = []
        self._stopping = _Stopping()
        self._rid_prefix = secrets.token_hex(2)
        self._rid_count = 0
        self._thread: threading.Thread | None = None
        self._metrics = metrics
        if metrics is not None:
            metrics.track_in_flight(lambda: len(self._in_flight))

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Serve in a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="is-bridge-loop")
        self._thread.start()

    def stop(self, *, wait_s: float | None = None) -> None:
        """Ask the loop to finish in-flight work and close; safe from signal handlers."""
        self._stopping.requested.set()
        self._wake()
        if wait_s is not None and self._thread is not None:
            self._thread.join(wait_s)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered (approximate outside the loop)."""
        return len(self._in_flight)

    def serve_forever(self) -> None:
        """Run the loop until :meth:`stop`; then answer what is left and close."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        log.info("bridge serving on %s", self.endpoint)
        try:
            while not self._finished():
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self._wake_r in events:
                    self._drain_wake()
                self._deliver_completions()
                if self._socket in events:
                    self._read_requests()
                self._expire(time.monotonic())
        finally:
            self._close()

    # -- the loop ---------------------------------------------------------------------

    def _finished(self) -> bool:
        """True once stopping and either nothing is in flight or the grace time is over."""
        if not self._stopping.requested.is_set():
            return False
        now = time.monotonic()
        if self._stopping.grace_end is None:
            self._stopping.grace_end = now + self._grace_s
            log.info("bridge stopping; %d request(s) in flight", len(self._in_flight))
        return not self._in_flight or now >= self._stopping.grace_end

    def _poll_timeout_ms(self) -> int:
        """Sleep until the next deadline (or the end of the shutdown grace), at most 1 s."""
        until = time.monotonic() + 1.0
        if self._deadlines:
            until = min(until, self._deadlines[0][0])
        if self._stopping.grace_end is not None:
            until = min(until, self._stopping.grace_end)
        return max(0, int((until - time.monotonic()) * 1000) + 1)

    def _read_requests(self) -> None:
        for _ in range(READ_BATCH):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._accept(frames)
            except Exception:  # a bug here must not stop the service for everyone
                log.exception("unexpected failure accepting a %d-frame message", len(frames))

    def _accept(self, frames: list[bytes]) -> None:
        """Take one message: answer bad ones now, hand good ones to the pool."""
        rid = self._next_rid()
        started = time.monotonic()
        try:
            route, payload, extra = split_envelope(frames)
        except MalformedEnvelope as exc:
            entry = _InFlight(rid, exc.route, None, started)
            self._answer(entry, exception_frames(exc, rid), exception_outcome(exc))
            return
        if extra:
            log.debug("rid=%s ignoring %d frame(s) after the payload", rid, extra)
        entry = _InFlight(rid, route, None, started)
        try:
            job = entry.job = parse_job(payload)
            pid = request_pid(job)
            self._check_capacity(rid)
            self._check_session(rid, pid)
        except IsError as exc:
            self._answer(entry, exception_frames(exc, rid), exception_outcome(exc))
            return
        self._in_flight[rid] = entry
        entry.session = pid
        self._per_session[pid] += 1
        heapq.heappush(self._deadlines, (started + self._deadline_s(job), rid))
        self._pool.submit(self._admit, rid, job, pid)

    def _check_capacity(self, rid: str) -> None:
        if self._stopping.requested.is_set():
            raise WorkerUnavailable(f"bridge shutting down (request {rid})")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise WorkerUnavailable(f"too many requests in flight (request {rid})")

    def _check_session(self, rid: str, pid: str) -> None:
        """One session may have ``session_max_in_flight`` requests in flight (is.js has
        one or two; a script looping over a dataset must not starve everyone else)."""
        most = self._settings.session_max_in_flight
        if most > 0 and self._per_session[pid] >= most:
            raise SessionBusy(
                f"this session has {most} requests in flight, the most "
                f"IS_SESSION_MAX_IN_FLIGHT allows; send more as they are answered (request {rid})"
            )

    def _deadline_s(self, job: Job) -> float:
        """How long the loop waits before answering by itself."""
        kind = (str_field(job, "type") or "").lower()
        limits = self._settings
        timeout_s = limits.index_timeout_s if kind == "index" else limits.view_timeout_s
        return timeout_s + limits.worker_start_timeout_s + self._margin_s

    def _deliver_completions(self) -> None:
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            entry = self._in_flight.pop(done.rid, None)
            if entry is None:
                log.info("rid=%s late reply dropped (already answered)", done.rid)
                continue
            entry.identity = done.identity
            self._answer(entry, done.frames, done.outcome)

    def _expire(self, now: float) -> None:
        """Answer requests whose deadline passed; their late replies are dropped."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            entry = self._in_flight.pop(rid, None)
            if entry is not None:
                waited_s = now - entry.started
                exc = WorkerUnavailable(f"no reply within {waited_s:.0f} s (request {rid})")
                self._answer(entry, exception_frames(exc, rid), "timeout")

    def _answer(
        self, entry: _InFlight, frames: list[bytes], outcome: Outcome | None = None
    ) -> None:
        """Count the request, send its reply along its route, log its line. Counted
        first, so that a client holding a reply finds it in the metrics."""
        if entry.session is not None:
            self._per_session[entry.session] -= 1
            if self._per_session[entry.session] <= 0:
                del self._per_session[entry.session]
            entry.session = None
        kind = (str_field(entry.job or {}, "type") or "-").lower()
        outcome = outcome or frames_outcome(kind, frames)
        duration_s = time.monotonic() - entry.started
        if self._metrics is not None:
            cache = frames.cache if isinstance(frames, Reply) else "none"
            self._metrics.observe(kind, outcome, duration_s, cache)
        message = reply_message(entry.route, frames)
        try:
            self._socket.send_multipart(message, zmq.NOBLOCK)
            sent = "sent"
        except zmq.Again:
            sent = "dropped:queue-full"
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client or proxy hop is gone
            sent = f"dropped:{exc.strerror}"
        _log_request(entry, frames, outcome, duration_s, sent)

    # -- pool side (runs in admit threads) --------------------------------------------

    def _admit(self, rid: str, job: Job, pid: str) -> None:
        """Verify the session, find the identity, dispatch; every path posts a reply."""
        identity_text = "-"
        try:
            esaf = int_field(job, "esaf")
            session = self._sessions.verify(pid, esaf)
            identity = self._identities.resolve(session.user, esaf)
            identity_text = identity.queue
            kind = request_kind(job)
            future = self._dispatcher.submit(identity, kind, job, rid)
        except Exception as exc:
            if not isinstance(exc, IsError):
                log.exception("rid=%s admission failed", rid)
            frames = exception_frames(exc, rid)
            self._post(_Completion(rid, frames, identity_text, exception_outcome(exc)))
            return
        future.add_done_callback(lambda f: self._dispatched(rid, identity_text, f))

    def _dispatched(
        self, rid: str, identity: str, future: concurrent.futures.Future[list[bytes]]
    ) -> None:
        """Dispatcher future done: post its frames (or a generic error if it broke)."""
        try:
            frames = future.result()
            if not _valid_reply(frames):
                raise TypeError(f"dispatcher returned a malformed reply: {frames!r:.200}")
        except Exception as exc:  # includes CancelledError: still one answer
            log.error("rid=%s dispatch failed: %r", rid, exc)
            frames = exception_frames(exc, rid)
        self._post(_Completion(rid, frames, identity))

    def _post(self, done: _Completion) -> None:
        self._done.put(done)
        self._wake()

    # -- plumbing ---------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wake_lock:
            if self._closed:
                return
            # A full pipe already holds wake-ups: the loop will run anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, _WAKE)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _next_rid(self) -> str:
        self._rid_count += 1
        return f"{self._rid_prefix}-{self._rid_count:x}"

    def _close(self) -> None:
        """Answer everything still in flight, then release socket, pipe and threads."""
        self._deliver_completions()
        for rid in list(self._in_flight):
            entry = self._in_flight.pop(rid)
            exc = WorkerUnavailable(f"bridge shutting down (request {rid})")
            self._answer(entry, exception_frames(exc, rid), "unavailable")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._socket.close(linger=LINGER_MS)
        with self._wake_lock:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("bridge stopped")


def _open_router(context: zmq.Context[Any], settings: Settings) -> zmq.Socket[Any]:
    """The front ROUTER: connect to the proxy's DEALER, or bind when standalone."""
    endpoint = settings.proxy_endpoint or settings.bind_endpoint
    if not endpoint:
        raise ValueError("set IS_PROXY_ENDPOINT (is_proxy DEALER) or IS_BIND_ENDPOINT")
    sock: zmq.Socket[Any] = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # ZMTP heartbeats (libzmq >= 4.2 on both ends: ours and is-proxy) so that a dead
    # bridge is dropped by the proxy and a dead proxy by us within seconds; TCP
    # keepalive as well, for a peer that does not answer pings.
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    try:
        if settings.proxy_endpoint:
            sock.connect(settings.proxy_endpoint)
        else:
            sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def _valid_reply(frames: object) -> bool:
    """A dispatcher reply must be a non-empty list of bytes."""
    return isinstance(frames, list) and bool(frames) and all(isinstance(f, bytes) for f in frames)


def _log_request(
    entry: _InFlight, frames: list[bytes], outcome: Outcome, duration_s: float, sent: str
) -> None:
    """One scannable ``key=value`` line per request: who (pid prefix, esaf, identity),
    what (type, file, frame, size), how (cache, outcome, worker time) and how long;
    ``error`` quotes an error reply's text (with the pid cut: it may echo the job)."""
    if not log.isEnabledFor(logging.INFO):
        return
    job = entry.job or {}
    index = (str_field(job, "type") or "").lower() == "index"
    report = frames if isinstance(frames, Reply) else Reply(())
    pid = str_field(job, "pid")
    error = frames[0].decode("utf-8", "replace") if frames and frames[0] else None
    log.info(
        "rid=%s pid=%s esaf=%d identity=%s type=%s fn=%s frame=%d xsize=%d cache=%s "
        "outcome=%s bytes=%d ms=%.1f worker_ms=%s sent=%s%s",
        entry.rid,
        log_value(token_prefix(pid)),
        int_field(job, "esaf"),
        entry.identity,
        log_value(str_field(job, "type"), 24),
        log_value(str_field(job, "fn1" if index else "fn")),
        int_field(job, "frame1" if index else "frame"),
        int_field(job, "xsize"),
        report.cache,
        outcome,
        sum(len(f) for f in frames),
        duration_s * 1000.0,
        "-" if report.worker_ms is None else f"{report.worker_ms:.1f}",
        log_value(sent),
        f" error={log_value(redact_token(error, pid))}" if error else "",
    )
