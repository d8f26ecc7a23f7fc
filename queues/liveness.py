"""Workers' liveness across hosts: heartbeats with a TTL in the broker Redis.

The supervisor's socket tells a bridge about its own host's workers only, and nothing
when the supervisor is gone. With several hosts consuming one identity's queue, a
bridge must also know whether *another* host's worker is alive (to dispatch when its own
supervisor is unreachable or does not serve that ESAF) and when one vanished (a request
it may have taken is retried or failed at once, not after the deadline). Every bridge
sees the same Redis, so each worker renews a key of its own there:

- ``is:hb:<uid>:<gid>:<host>`` = JSON ``{"node", "boot", "active": [task ids]}``, set
  every :data:`INTERVAL_S` with a TTL of :data:`TTL_S`: a host that loses power, its
  network or every process stops renewing it, and it expires;
- ``is:hb:<uid>:<gid>`` = the set of hosts that beat for the identity (SET and SADD go
  in one transaction, so a member without a key has expired or stopped);
- ``is:lock:<gid>:alive:<pid>@<hostname>`` in the cache Redis, same TTL: a worker of
  another host waiting on this process's computation lock sees it gone (istasks.cache)
  instead of waiting out the lock's TTL.

A worker lost is therefore seen by every bridge at most ``TTL_S`` plus one poll after
it stopped beating. ``boot`` is new in every worker process, so a worker restarted on
the same host within the TTL still counts as the old one gone. ``active`` lists the
tasks running in the worker at its last beat: a long task (``index``) shows there, so a
bridge fails an index only when the worker that held it is gone.

Standard library and redis-py only: the bridge imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from istasks.keys import heartbeat_hosts_key, heartbeat_key, holder_alive_key
from istasks.redisconn import connect
from istasks.settings import Settings
from queues.naming import Identity

log = logging.getLogger(__name__)

#: How often a worker renews its heartbeat.
INTERVAL_S = 0.5
#: How long a heartbeat outlives its last renewal: a lost worker is seen this late.
TTL_S = 1.5
#: How long a bridge trusts one reading of an identity's heartbeats.
POLL_TTL_S = 0.25
#: How long (and how many per identity) workers seen gone are remembered.
GONE_KEEP_S = 60.0
GONE_MAX = 16
_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Beat:
    """One worker's latest heartbeat as a bridge read it."""

    host: str
    node: str
    boot: str
    active: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GoneBeat:
    """A worker whose heartbeat stopped, and when the reader noticed (its monotonic)."""

    beat: Beat
    at_s: float


@dataclass(frozen=True)
class HostsState:
    """An identity's workers alive on any host, and those seen gone lately."""

    live: tuple[Beat, ...] = ()
    gone: tuple[GoneBeat, ...] = ()

    @property
    def hosts(self) -> list[str]:
        """The hosts with a live worker, sorted."""
        return sorted(beat.host for beat in self.live)

    def lost_since(
        self, task_id: str, sent_at_s: float, *, certain: bool, other_than: str = ""
    ) -> Beat | None:
        """A worker gone after ``sent_at_s`` (our monotonic, just before the publish)
        that could have taken ``task_id``, or None. ``certain``: only one whose last
        beat listed the task as running (for tasks never to be run twice). Workers of
        host ``other_than`` are left out (the bridge's own host: its supervisor tells
        their deaths exactly, queues.pool)."""
        for gone in self.gone:
            if gone.beat.host == other_than:
                continue
            if task_id in gone.beat.active:
                return gone.beat
            if not certain and gone.at_s >= sent_at_s:
                return gone.beat
        return None


class Heartbeat:
    """A worker's heartbeat: a daemon thread renewing its key until :meth:`stop`."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        host: str,
        node: str,
        active: Callable[[], Iterable[str]] = tuple,
        *,
        cache_url: str | None = None,
        settings: Settings | None = None,
        interval_s: float = INTERVAL_S,
        ttl_s: float = TTL_S,
    ) -> None:
        timeouts = {"socket_timeout": _TIMEOUT_S, "socket_connect_timeout": _TIMEOUT_S}
        self._client = connect(url, settings, **timeouts)
        self._cache = None
        if cache_url is not None and cache_url != url:
            self._cache = connect(cache_url, settings, **timeouts)
        # istasks.cache's lock holder id of this process: <pid>@<hostname>
        self._alive = holder_alive_key(identity.gid, f"{os.getpid()}@{socket.gethostname()}")
        self._with_alive = cache_url is not None
        self._key = heartbeat_key(identity.uid, identity.gid, host)
        self._hosts = heartbeat_hosts_key(identity.uid, identity.gid)
        self._host = host
        self._node = node
        self._boot = secrets.token_hex(6)
        self._active = active
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="is-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat once now (so a bridge sees the worker at once), then every interval."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the key: bridges see the worker gone at once."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._key)
            pipe.srem(self._hosts, self._host)
            if self._with_alive and self._cache is None:
                pipe.delete(self._alive)
            pipe.execute()
            if self._cache is not None:
                self._cache.delete(self._alive)
        except redis.RedisError as exc:
            log.debug("heartbeat removal failed: %s", exc)
        self._client.close()
        if self._cache is not None:
            self._cache.close()

    def beat(self) -> None:
        """Renew the key (and the host's membership) in one transaction."""
        value = {"node": self._node, "boot": self._boot, "active": sorted(self._active())}
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._key, json.dumps(value, separators=(",", ":")), px=self._ttl_ms)
        pipe.sadd(self._hosts, self._host)
        if self._with_alive and self._cache is None:
            pipe.set(self._alive, b"1", px=self._ttl_ms)
        pipe.execute()
        if self._cache is not None:
            self._cache.set(self._alive, b"1", px=self._ttl_ms)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis away: the key expires, as it should
                log.debug("heartbeat failed: %s", exc)


@dataclass
class _Known:
    """What one reader remembers of an identity."""

    live: dict[str, Beat] = field(default_factory=dict)  # host -> beat
    gone: deque[GoneBeat] = field(default_factory=lambda: deque(maxlen=GONE_MAX))
    read_at: float = float("-inf")


class Liveness:
    """A bridge's view of every host's workers, read from the heartbeats (thread-safe;
    one reading per identity is reused for ``poll_ttl_s``)."""

    def __init__(
        self, url: str, *, poll_ttl_s: float = POLL_TTL_S, settings: Settings | None = None
    ) -> None:
        self._client = connect(
            url, settings, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
        )
        self._poll_ttl_s = poll_ttl_s
        self._known: dict[Identity, _Known] = {}
        self._lock = threading.Lock()

    def state(self, identity: Identity, *, fresh: bool = False) -> HostsState:
        """The identity's live workers and recent dead (``fresh``: read now, not from
        the last reading); on a Redis error the last known state (never "all gone": an
        unreadable Redis is not a dead worker)."""
        now = time.monotonic()
        with self._lock:
            known = self._known.setdefault(identity, _Known())
            if not fresh and now - known.read_at < self._poll_ttl_s:
                return _snapshot(known)
        try:
            beats = self._read(identity)
        except redis.RedisError as exc:
            log.warning("heartbeats of %s unreadable: %s", identity.queue, exc)
            with self._lock:
                return _snapshot(known)
        with self._lock:
            self._update(known, beats, time.monotonic())
            return _snapshot(known)

    def any_live(self, identity: Identity) -> bool:
        """Whether some host's worker of ``identity`` is alive (consumes its queue); a
        "none" from the last reading is checked again (a worker may just have started)."""
        return bool(self.state(identity).live or self.state(identity, fresh=True).live)

    def close(self) -> None:
        """Close the Redis connection."""
        self._client.close()

    def _read(self, identity: Identity) -> dict[str, Beat]:
        hosts_key = heartbeat_hosts_key(identity.uid, identity.gid)
        hosts = sorted(_text(h) for h in self._client.smembers(hosts_key))
        if not hosts:
            return {}
        values = self._client.mget([heartbeat_key(identity.uid, identity.gid, h) for h in hosts])
        beats: dict[str, Beat] = {}
        expired: list[str] = []
        for host, raw in zip(hosts, values, strict=True):
            beat = _parse(host, raw)
            if beat is None:
                expired.append(host)
            else:
                beats[host] = beat
        if expired:  # safe: a live worker adds itself again with every beat
            self._client.srem(hosts_key, *expired)
        return beats

    def _update(self, known: _Known, beats: dict[str, Beat], now: float) -> None:
        for host, old in known.live.items():
            new = beats.get(host)
            if new is None or new.boot != old.boot:
                known.gone.append(GoneBeat(old, now))
                log.warning("worker %s (boot %s) stopped beating", old.node, old.boot)
        known.live = beats
        known.read_at = now
        while known.gone and now - known.gone[0].at_s > GONE_KEEP_S:
            known.gone.popleft()


def _snapshot(known: _Known) -> HostsState:
    return HostsState(tuple(known.live.values()), tuple(known.gone))


def _parse(host: str, raw: object) -> Beat | None:
    """A heartbeat value, or None (expired, or not ours)."""
    if not isinstance(raw, bytes | str):
        return None
    try:
        value = json.loads(raw)
        active = value.get("active", [])
        return Beat(host, str(value["node"]), str(value["boot"]), frozenset(map(str, active)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
