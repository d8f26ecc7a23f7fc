"""The worker pool as the bridge sees it, and the client of the supervisor's socket.

The bridge asks :meth:`WorkerPool.ensure` before every request and polls
:meth:`WorkerPool.state` while it waits (contract 5). :class:`SupervisorClient` answers
both over the supervisor's Unix socket (:mod:`queues.control` says why a socket): one
JSON line each way, ~0.05 ms, and a positive answer is cached for ``cache_ttl_s`` so
that the per-request cost is ~0. Deaths are seen fast without any push channel: the
supervisor is every worker's parent and learns of a death from SIGCHLD at once, so a
poll shows it at most ``cache_ttl_s`` after the worker died.

A state also lists the identity's workers that died or were stopped lately, with when
the supervisor noticed (its ``time.monotonic()``, the same clock as ours on one host;
the client checks that). Since a cached epoch may already be dead when a task is sent,
"the identity's worker changed" does not mean "the worker that could have taken my task
is gone": only a worker gone *after* the task was sent could have taken it
(:meth:`WorkerState.lost_since`). The supervisor notes every death before it answers
anything else, so no answer ever shows a worker that had already died as live. Workers
are started and killed only by the supervisor; the socket is the one way to ask for them.

Standard library only: the bridge imports this module.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from istasks.errors import IdentityError, WorkerUnavailable
from istasks.settings import Settings
from queues.naming import Identity

log = logging.getLogger(__name__)

#: Longest request or reply line; a status listing of a few hundred workers fits.
MAX_LINE_BYTES = 1 << 20
#: How long a live worker's epoch is trusted without asking again. The dispatcher polls
#: every 0.25 s, so a death is seen within ~0.75 s, and a busy identity costs one round
#: trip per half second instead of one per request.
CACHE_TTL_S = 0.5
#: Extra wait beyond the supervisor's own start timeout before giving up on it.
_REPLY_GRACE_S = 2.0
_NO_SUPERVISOR = (errno.ENOENT, errno.ECONNREFUSED)


@dataclass(frozen=True)
class Gone:
    """A worker of an identity that died or was stopped."""

    epoch: int | None  # None: every worker of the pool (the supervisor itself is gone)
    at_s: float | None  # our time.monotonic() when the pool noticed; None: unknown


@dataclass(frozen=True)
class WorkerState:
    """An identity's live worker (its epoch, None when none runs) and its recent dead."""

    epoch: int | None
    gone: tuple[Gone, ...] = ()

    def lost_since(self, epoch: int, sent_at_s: float) -> bool:
        """Whether a worker that could have taken a task sent at ``sent_at_s`` (our
        ``time.monotonic()``, just before the publish) to worker ``epoch`` is gone: one
        that went after the send. A worker gone before it never saw the task, which is
        still queued for its successor. When the time is not known, the worker ``epoch``
        or a later one going is taken as a loss."""
        for gone in self.gone:
            if gone.at_s is not None:
                if gone.at_s >= sent_at_s:
                    return True
            elif gone.epoch is None or gone.epoch >= epoch:
                return True
        return False


class WorkerPool(Protocol):
    """Per-identity workers, started on demand (contract 5)."""

    def ensure(self, identity: Identity) -> int:
        """Start the identity's worker unless running; its epoch (larger on every start).

        Raises WorkerUnavailable when none can be started in time, IdentityError when
        the identity is refused (uid/gid 0 or outside the configured ranges).
        """
        ...

    def epoch(self, identity: Identity) -> int | None:
        """Epoch of the identity's live worker; None once it died or was stopped."""
        ...

    def state(self, identity: Identity) -> WorkerState:
        """The identity's live worker and the ones gone lately (what :meth:`epoch` says,
        plus which workers went and when)."""
        ...


def encode_message(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    """Parse one protocol line; ValueError when it is not a JSON object."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("protocol message is not an object")
    return message


class _Connection:
    """One blocking connection to the supervisor (one per client thread)."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buffer = b""

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.sock.settimeout(timeout_s)
        self.sock.sendall(encode_message(request))
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("supervisor closed the connection")
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE_BYTES:
                raise ConnectionResetError("supervisor reply too long")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return decode_message(line)

    def close(self) -> None:
        self.sock.close()


class SupervisorClient:
    """:class:`WorkerPool` backed by the supervisor at ``settings.supervisor_socket``."""

    def __init__(
        self,
        settings: Settings,
        *,
        socket_path: str | None = None,
        cache_ttl_s: float = CACHE_TTL_S,
    ) -> None:
        self.socket_path = socket_path or settings.supervisor_socket
        self._reply_timeout_s = settings.worker_start_timeout_s + _REPLY_GRACE_S
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[Identity, tuple[WorkerState, float]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._clock_differs = False

    def ensure(self, identity: Identity) -> int:
        """See :meth:`WorkerPool.ensure`; answered from the cache while it is fresh."""
        cached = self._cached(identity)
        if cached is not None and cached.epoch is not None:
            return cached.epoch
        reply, state = self._ask({"op": "ensure", "uid": identity.uid, "gid": identity.gid})
        if not reply.get("ok") or state.epoch is None:
            text = str(reply.get("error", "worker unavailable"))
            if reply.get("kind") == "identity":
                raise IdentityError(text)
            raise WorkerUnavailable(text)
        self._remember(identity, state)
        return state.epoch

    def epoch(self, identity: Identity) -> int | None:
        """See :meth:`WorkerPool.epoch`."""
        return self.state(identity).epoch

    def state(self, identity: Identity) -> WorkerState:
        """See :meth:`WorkerPool.state`. No supervisor listening means no live worker
        (workers die with it); other failures raise WorkerUnavailable."""
        cached = self._cached(identity)
        if cached is not None:
            return cached
        try:
            reply, state = self._ask({"op": "epoch", "uid": identity.uid, "gid": identity.gid})
        except WorkerUnavailable as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _NO_SUPERVISOR:
                return WorkerState(None, (Gone(None, None),))
            raise
        if not reply.get("ok") or state.epoch is None:
            with self._lock:
                self._cache.pop(identity, None)
            return WorkerState(None, state.gone)
        self._remember(identity, state)
        return state

    def status(self) -> dict[str, Any]:
        """The supervisor's mode, ACL state and worker table (for ``isctl status``)."""
        return self._request({"op": "status"})

    def forget(self, identity: Identity) -> None:
        """Drop the cached epoch (e.g. after a request saw the worker fail)."""
        with self._lock:
            self._cache.pop(identity, None)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    # -- internals --------------------------------------------------------------------

    def _cached(self, identity: Identity) -> WorkerState | None:
        with self._lock:
            entry = self._cache.get(identity)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        return None

    def _remember(self, identity: Identity, state: WorkerState) -> None:
        with self._lock:
            self._cache[identity] = (state, time.monotonic() + self._cache_ttl_s)

    def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], WorkerState]:
        """One ``ensure`` or ``epoch`` round trip: the reply and the state it tells."""
        before_s = time.monotonic()
        reply = self._request(request)
        same_clock = self._same_clock(reply.get("now"), before_s, time.monotonic())
        epoch = reply.get("epoch")
        live = int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        return reply, WorkerState(live, _parse_gone(reply.get("gone"), same_clock))

    def _same_clock(self, now: object, before_s: float, after_s: float) -> bool:
        """Whether the supervisor's ``time.monotonic()`` is ours (one host, one time
        namespace): its ``now`` must fall within our round trip. Once it did not, its
        times are never used again (a loss is then judged by epoch alone)."""
        if self._clock_differs or now is None:  # None: a supervisor that sends no times
            return False
        if isinstance(now, int | float) and before_s <= now <= after_s:
            return True
        self._clock_differs = True
        log.warning("supervisor clock %r is not ours (%.3f..%.3f): its times unused",
                    now, before_s, after_s)  # fmt: skip
        return False

    def _connection(self) -> _Connection:
        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _Connection(self.socket_path, self._reply_timeout_s)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _drop_connection(self) -> None:
        connection: _Connection | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One round trip; reconnects once (the supervisor may have been restarted)."""
        for attempt in (1, 2):
            try:
                return self._connection().call(request, self._reply_timeout_s)
            except (OSError, ValueError) as exc:
                self._drop_connection()
                final = isinstance(exc, TimeoutError) or (
                    isinstance(exc, OSError) and exc.errno in _NO_SUPERVISOR
                )
                if attempt == 2 or final:
                    raise WorkerUnavailable(
                        f"worker supervisor unreachable at {self.socket_path}: {exc}"
                    ) from exc
        raise AssertionError("unreachable")


def _parse_gone(items: object, same_clock: bool) -> tuple[Gone, ...]:
    """The ``gone`` list of a reply (``[[epoch, monotonic time], ...]``); times are
    kept only when the supervisor's clock is ours."""
    if not isinstance(items, list):
        return ()
    return tuple(
        Gone(item[0], float(item[1]) if same_clock else None)
        for item in items
        if _is_gone_item(item)
    )


def _is_gone_item(item: object) -> bool:
    """``[int epoch, number]``."""
    if not isinstance(item, list) or len(item) != 2:
        return False
    epoch, at_s = item
    return (
        isinstance(epoch, int)
        and not isinstance(epoch, bool)
        and isinstance(at_s, int | float)
        and not isinstance(at_s, bool)
    )
