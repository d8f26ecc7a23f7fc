"""Relay of index progress from identity channels to the channels clients listen on.

A worker may publish progress only on its own channel ``is:progress:<uid>:<gid>``
(istasks.keys), each message wrapped as ``{"channel": <progressPublisher>, "message":
<is.js JSON text>}``. The dispatcher (bridge.dispatch) hears those on its result
subscription, checks that the identity has an index request in flight that named that
channel, and hands the message to :class:`ProgressRelay`, which publishes it on the
session Redis (``settings.sessions``) where is.js clients subscribe. The original
published on the Redis named by the request's ``progressAddress``/``progressPort``; we
deliberately never connect to a host taken from a request.

Must stay light: no numpy, no h5py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time

import redis

from istasks.keys import PREFIX, parse_progress_channel
from queues.naming import Identity

log = logging.getLogger(__name__)

#: Longest relayed progress message (the worker's are a few hundred characters).
MAX_PROGRESS_CHARS = 4096
#: Progress messages waiting for the session Redis before new ones are dropped.
RELAY_BACKLOG = 1024
RELAY_TIMEOUT_S = 1.0
#: Channels never relayed to: ours, Celery's results and kombu's fanout exchanges
#: (``/<db>.<exchange>/...``, e.g. remote control) in case the session Redis is the broker.
_RESERVED_CHANNELS = (f"{PREFIX}:", "celery-", "/")


class ProgressRelay:
    """Publishes relayed progress on the session Redis from its own thread, so that a
    slow or unreachable session Redis never delays results; beyond a backlog of
    RELAY_BACKLOG messages new ones are dropped (progress is best effort)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=RELAY_TIMEOUT_S, socket_connect_timeout=RELAY_TIMEOUT_S
        )
        # None: the end of the messages, put there by close()
        self._backlog: queue.Queue[tuple[str, str] | None] = queue.Queue(RELAY_BACKLOG)
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="is-dispatch-progress", daemon=True)
        self._thread.start()

    def put(self, channel: str, message: str) -> None:
        """Queue one message for ``channel``; never blocks."""
        try:
            self._backlog.put_nowait((channel, message))
        except queue.Full:
            log.warning("progress relay backlog full: message for %r dropped", channel)

    def _run(self) -> None:
        while (item := self._backlog.get()) is not None and not self._abandoned.is_set():
            channel, message = item
            try:
                self._client.publish(channel, message)
            except (redis.RedisError, OSError) as exc:
                log.warning("progress for %r not relayed: %s", channel, exc)

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish what is queued (for up to ``timeout_s``), stop, close the connection."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._backlog.put(None, timeout=timeout_s)
        self._thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        self._abandoned.set()  # the rest is dropped
        self._client.close()


def parse_progress(channel: bytes, data: bytes) -> tuple[Identity, str, str] | None:
    """(identity, target channel, message) of one wrapped progress message, or None
    when it is malformed, too long or aimed at a reserved channel."""
    try:
        uid, gid = parse_progress_channel(channel.decode("ascii"))
        identity = Identity(uid, gid)
        wrapped = json.loads(data)
        target, message = wrapped["channel"], wrapped["message"]
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        log.debug("malformed progress on %r dropped: %s", channel, exc)
        return None
    if not (isinstance(target, str) and isinstance(message, str)) or not target:
        return None
    if len(message) > MAX_PROGRESS_CHARS or target.startswith(_RESERVED_CHANNELS):
        log.warning("progress of %s for %r refused (reserved or too long)", identity, target)
        return None
    return identity, target, message
