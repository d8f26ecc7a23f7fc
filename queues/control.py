"""The supervisor's control socket: who may reach it, and how it is created.

A Unix stream socket rather than Redis or Celery's remote control: the kernel enforces
who can connect (directory and socket modes), tells us who connected (SO_PEERCRED,
SO_PEERGROUPS), a round trip costs ~0.1 ms, and nothing that can merely write to the
broker can start workers. The original's per-worker endpoints were abstract sockets that
any local process could reach (spec 8.20); here only the bridge's group can ask.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from queues.pool import MAX_LINE_BYTES, encode_message

log = logging.getLogger(__name__)

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_UCRED = struct.Struct("3i")
_LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Peer:
    """Credentials the kernel recorded when a client connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def peer_of(sock: socket.socket) -> Peer:
    """The connected peer's pid, uid, gid and supplementary groups."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return Peer(pid, uid, gid, groups)


def peer_allowed(peer: Peer, client_gid: int | None) -> bool:
    """Root, our own uid, or a member of the configured client (bridge) group."""
    if peer.uid in (0, os.geteuid()):
        return True
    return client_gid is not None and (peer.gid == client_gid or client_gid in peer.groups)


def resolve_group(value: str | None) -> int | None:
    """A group name or number as a gid (None stays None); ValueError when unknown."""
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError as exc:
        raise ValueError(f"unknown group {value!r}") from exc


def _prepare_directory(path: str, client_gid: int | None) -> None:
    """Create the socket's directory (0750, or 0700 without a client group) if missing."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        info = os.stat(directory)
        mode = stat.S_IMODE(info.st_mode)
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise PermissionError(f"{directory} is world-writable: the socket could be replaced")
        if info.st_uid not in (0, os.geteuid()):
            raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to us")
        return
    os.makedirs(directory, mode=0o750 if client_gid is not None else 0o700)
    if client_gid is not None:
        os.chown(directory, -1, client_gid)


def _remove_stale(path: str) -> None:
    """Remove a socket left by a dead supervisor; refuse when one still answers."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another supervisor is listening on {path}")


def listen(path: str, client_gid: int | None) -> socket.socket:
    """Bind the control socket: mode 0660 with the client group, else 0600."""
    _prepare_directory(path, client_gid)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never reachable by others, even for an instant
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    if client_gid is not None:
        os.chown(path, -1, client_gid)
        os.chmod(path, 0o660)
    sock.listen(_LISTEN_BACKLOG)
    sock.setblocking(False)
    log.debug("control socket %s (group %s)", path, client_gid)
    return sock


#: A request handler: the reply now, or None when it will come later (via reply()).
Handler = Callable[["Client", bytes], "dict[str, Any] | None"]


@dataclass
class Client:
    """One connection on the control socket."""

    sock: socket.socket
    peer: Peer
    buffer: bytes = b""
    waiting: bool = False


class ControlServer:
    """The line protocol (one JSON object per line each way) on the control socket.

    Driven by the supervisor's selector; requests of one client are answered in order,
    and a client whose answer is pending (a worker is starting) is not read further.
    """

    def __init__(
        self,
        path: str,
        client_gid: int | None,
        selector: selectors.BaseSelector,
        handler: Handler,
    ) -> None:
        self.path = path
        self._client_gid = client_gid
        self._sel = selector
        self._handler = handler
        self._clients: dict[socket.socket, Client] = {}
        self._sock: socket.socket | None = listen(path, client_gid)
        selector.register(self._sock, selectors.EVENT_READ, self._on_accept)

    def reply(self, client: Client, message: dict[str, Any]) -> None:
        """Send ``message`` to ``client``; it may send its next request."""
        client.waiting = False
        try:
            client.sock.sendall(encode_message(message))
        except OSError:
            self._drop(client)

    def resume(self) -> None:
        """Answer requests that arrived while their client waited for a reply."""
        for client in list(self._clients.values()):
            self._serve(client)

    def close(self) -> None:
        """Stop listening, drop every client, remove the socket file."""
        if self._sock is None:
            return
        self._sel.unregister(self._sock)
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for client in list(self._clients.values()):
            self._drop(client)

    def _on_accept(self) -> None:
        assert self._sock is not None
        try:
            sock, _ = self._sock.accept()
        except BlockingIOError:
            return
        peer = peer_of(sock)
        if not peer_allowed(peer, self._client_gid):
            log.warning("refused control connection from pid=%d uid=%d", peer.pid, peer.uid)
            sock.close()
            return
        sock.settimeout(1.0)  # replies are small; a client that never reads is dropped
        client = Client(sock, peer)
        self._clients[sock] = client
        self._sel.register(sock, selectors.EVENT_READ, functools.partial(self._on_data, client))

    def _on_data(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except OSError:
            data = b""
        if not data or len(client.buffer) + len(data) > MAX_LINE_BYTES:
            self._drop(client)
            return
        client.buffer += data
        self._serve(client)

    def _serve(self, client: Client) -> None:
        while (
            self._clients.get(client.sock) is client
            and not client.waiting
            and (b"\n" in client.buffer)
        ):
            line, _, client.buffer = client.buffer.partition(b"\n")
            client.waiting = True
            answer = self._handler(client, line)
            if answer is not None:
                self.reply(client, answer)

    def _drop(self, client: Client) -> None:
        if self._clients.pop(client.sock, None) is not None:
            self._sel.unregister(client.sock)
        client.sock.close()
