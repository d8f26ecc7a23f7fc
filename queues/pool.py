"""The worker pool as the bridge sees it, and the client of the supervisor's socket.

The bridge asks :meth:`WorkerPool.ensure` before every request and polls
:meth:`WorkerPool.epoch` while it waits (contract 5). :class:`SupervisorClient` answers
both over the supervisor's Unix socket (:mod:`queues.control` says why a socket): one
JSON line each way, ~0.05 ms, and a positive answer is cached for ``cache_ttl_s`` so
that the per-request cost is ~0. Deaths are seen fast without any push channel: the
supervisor is every worker's parent and learns of a death from SIGCHLD at once, so an
``epoch`` poll answers None at most ``cache_ttl_s`` after the worker died. Workers are
started and killed only by the supervisor; the socket is the one way to ask for them.

Standard library only: the bridge imports this module.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from typing import Any, Protocol

from istasks.errors import IdentityError, WorkerUnavailable
from istasks.settings import Settings
from queues.naming import Identity

#: Longest request or reply line; a status listing of a few hundred workers fits.
MAX_LINE_BYTES = 1 << 20
#: How long a live worker's epoch is trusted without asking again. The dispatcher polls
#: every 0.25 s, so a death is seen within ~0.75 s, and a busy identity costs one round
#: trip per half second instead of one per request.
CACHE_TTL_S = 0.5
#: Extra wait beyond the supervisor's own start timeout before giving up on it.
_REPLY_GRACE_S = 2.0
_NO_SUPERVISOR = (errno.ENOENT, errno.ECONNREFUSED)


class WorkerPool(Protocol):
    """Per-identity workers, started on demand (contract 5)."""

    def ensure(self, identity: Identity) -> int:
        """Start the identity's worker unless running; its epoch (new on every restart).

        Raises WorkerUnavailable when none can be started in time, IdentityError when
        the identity is refused (uid/gid 0 or outside the configured ranges).
        """
        ...

    def epoch(self, identity: Identity) -> int | None:
        """Epoch of the identity's live worker; None once it died or was stopped."""
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
        self._cache: dict[Identity, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[_Connection] = []

    def ensure(self, identity: Identity) -> int:
        """See :meth:`WorkerPool.ensure`; answered from the cache while it is fresh."""
        cached = self._cached(identity)
        if cached is not None:
            return cached
        reply = self._request({"op": "ensure", "uid": identity.uid, "gid": identity.gid})
        if not reply.get("ok"):
            text = str(reply.get("error", "worker unavailable"))
            if reply.get("kind") == "identity":
                raise IdentityError(text)
            raise WorkerUnavailable(text)
        epoch = int(reply["epoch"])
        self._remember(identity, epoch)
        return epoch

    def epoch(self, identity: Identity) -> int | None:
        """See :meth:`WorkerPool.epoch`. No supervisor listening means no live worker
        (workers die with it); other failures raise WorkerUnavailable."""
        cached = self._cached(identity)
        if cached is not None:
            return cached
        try:
            reply = self._request({"op": "epoch", "uid": identity.uid, "gid": identity.gid})
        except WorkerUnavailable as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _NO_SUPERVISOR:
                return None
            raise
        epoch = reply.get("epoch")
        if not reply.get("ok") or epoch is None:
            with self._lock:
                self._cache.pop(identity, None)
            return None
        self._remember(identity, int(epoch))
        return int(epoch)

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

    def _cached(self, identity: Identity) -> int | None:
        with self._lock:
            entry = self._cache.get(identity)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        return None

    def _remember(self, identity: Identity, epoch: int) -> None:
        with self._lock:
            self._cache[identity] = (epoch, time.monotonic() + self._cache_ttl_s)

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
