"""A worker's side of the host memory budget (queues.budget): its share, its hard limit.

The supervisor sends each worker its share of the host budget whenever the number of
live identities changes, over the socket the worker's spec came through
(:meth:`MemoryGovernor.connect`); the worker resizes its LRUs at once. After each
request, once none is running, the worker compares its memory with its hard limit (RSS
first, a cheap upper bound, then PSS): past it, it drops its caches (a giant ``xsize``
view leaves hundreds of MB behind) and, if still over, asks the supervisor to recycle
it. The supervisor then stops it gracefully (Celery's warm shutdown finishes what it has
taken; what is queued waits for its successor), so no request fails for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from queues.budget import MemoryShare, pss_bytes, rss_bytes

log = logging.getLogger(__name__)

_MAX_LINE_BYTES = 1 << 16


class Resizable(Protocol):
    """An in-process cache with a byte budget (istasks.cache.ByteLRU)."""

    def resize(self, max_bytes: int) -> None:
        """Set a new budget, evicting down to it."""
        ...

    def clear(self) -> None:
        """Drop everything."""
        ...


class MemoryGovernor:
    """The worker process's caches, its share of the host budget and its hard limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lru: Resizable | None = None
        self._jpegs: Resizable | None = None
        self._frames: Resizable | None = None
        self._drop_readers: Callable[[], None] | None = None
        self._send: Callable[[dict[str, Any]], None] | None = None
        self.share: MemoryShare | None = None
        self._inflight = 0
        self.recycle_asked = False
        self.drops = 0

    def attach(
        self,
        lru: Resizable,
        jpegs: Resizable,
        drop_readers: Callable[[], None],
        frames: Resizable | None = None,
    ) -> None:
        """The caches to size and drop (the service's, at worker start)."""
        with self._lock:
            self._lru, self._jpegs, self._drop_readers = lru, jpegs, drop_readers
            self._frames = frames
            share = self.share
        if share is not None:
            self.apply(share)

    def connect(self, sock: socket.socket) -> None:
        """Listen for shares on the supervisor's socket; recycle requests go back on it."""
        write_lock = threading.Lock()

        def send(message: dict[str, Any]) -> None:
            with write_lock, contextlib.suppress(OSError):
                sock.sendall(json.dumps(message).encode() + b"\n")

        self._send = send
        threading.Thread(
            target=self._listen, args=(sock,), name="is-memory-share", daemon=True
        ).start()

    def apply(self, share: MemoryShare) -> None:
        """Size the caches to ``share`` (shrinking evicts at once)."""
        with self._lock:
            self.share = share
            lru, jpegs, frames = self._lru, self._jpegs, self._frames
        if lru is not None and jpegs is not None:
            lru.resize(share.lru_max_bytes)
            jpegs.resize(share.jpeg_lru_max_bytes)
        if frames is not None:
            frames.resize(share.frame_lru_max_bytes)
        log.info("memory share: %d live worker(s), lru %d B, jpeg lru %d B, frame lru %d B, "
                 "hard limit %d B", share.live, share.lru_max_bytes, share.jpeg_lru_max_bytes,
                 share.frame_lru_max_bytes, share.hard_max_bytes)  # fmt: skip

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one request: the limit is checked when the last running one ends."""
        with self._lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1
                idle = self._inflight == 0
            if idle:
                self.check()

    def check(self) -> None:
        """Past the hard limit: drop the caches; still past it, ask to be recycled."""
        share = self.share
        if share is None or self.recycle_asked or rss_bytes() <= share.hard_max_bytes:
            return
        pss = pss_bytes()
        if pss is None or pss <= share.hard_max_bytes:
            return
        self.drop_caches()
        after = pss_bytes() or 0
        log.warning("memory past the hard limit: pss %d B > %d B; caches dropped, now %d B",
                    pss, share.hard_max_bytes, after)  # fmt: skip
        if after > share.hard_max_bytes and self._send is not None:
            self.recycle_asked = True
            self._send({"recycle": "memory", "pss": after})

    def drop_caches(self) -> None:
        """Empty the LRUs, close idle readers and give freed memory back to the system."""
        with self._lock:
            lru, jpegs, drop_readers = self._lru, self._jpegs, self._drop_readers
            frames = self._frames
        for cache in (lru, jpegs, frames):
            if cache is not None:
                cache.clear()
        if drop_readers is not None:
            drop_readers()
        gc.collect()
        _malloc_trim()
        self.drops += 1

    def _listen(self, sock: socket.socket) -> None:
        buffer = b""
        with sock:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk or len(buffer) > _MAX_LINE_BYTES:
                    self._send = None
                    return  # the supervisor is gone (we die with it) or talks nonsense
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        share = MemoryShare.from_message(message) if isinstance(message, dict) else None
        if share is not None:
            self.apply(share)


def _malloc_trim() -> None:
    """glibc keeps freed small-block arenas; trimming returns them (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


#: The one governor of this worker process.
GOVERNOR = MemoryGovernor()
