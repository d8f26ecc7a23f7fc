"""Cache of reduced full-depth images: in-process LRU in front of Redis, one ESAF gid.

Reducing a frame is the expensive step (read + decompress + max-pool); contrast and JPEG
encoding are cheap, so the reduced image is what we keep (spec 5.9, README "Speedy
Access"). Keys carry a file identity (path, mtime, size) taken from the file opened
afresh on every request, so a rewritten file is never served stale (bug 17); it is
opened as the worker's identity, so file permissions still apply before anything cached
is shown.

Identical concurrent requests are computed once: in-process by a single-flight table,
across the workers of one gid by a short Redis lock whose losers poll for the value. The
lock names its holder's process, so a worker killed mid-computation holds up nobody: its
waiters see it gone and compute (a request sent again after such a death, bridge.dispatch,
would otherwise wait out LOCK_WAIT_S, past its deadline).
Redis trouble never fails a request: the cache logs, stops asking Redis for a few
seconds, and computes. An LRU hit is reported to Redis (TTL refresh, hit counter) by a
background thread, off the request path. This module knows nothing of numpy: values only need
``to_bytes()`` and ``nbytes`` plus a decoder. How each lookup was served (LRU, Redis or
computed; "jpeg" when the service answered from its rendered-reply LRU without a lookup)
is reported to whoever opened a :func:`report_outcome` block around it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import redis

from istasks.cache_budget import CacheBudget
from istasks.errors import DataUnavailable
from istasks.keys import (
    CACHE_INDEX,
    file_identity,
    holder_alive_key,
    lock_key,
    reduced_key,
    stats_key,
    view_validator,
)
from istasks.redisconn import connect

log = logging.getLogger(__name__)

#: Values above this are not written to Redis (Redis strings stop at 512 MB, and moving
#: hundreds of MB through Redis is slower than recomputing).
MAX_REDIS_VALUE_BYTES = 64 * 1024 * 1024
#: Lifetime of the cross-worker computation lock; a crashed holder frees it this late.
LOCK_TTL_S = 15.0
#: Longest a worker waits for another worker's computation before doing it itself.
LOCK_WAIT_S = 10.0
LOCK_POLL_S = 0.02
#: After a Redis error the cache works without Redis for this long.
REDIS_BACKOFF_S = 5.0
#: LRU hits are written to Redis in batches, at most one per this interval.
HIT_BATCH_S = 0.05

#: How a lookup was served: this process's LRU, Redis, or computed here; "jpeg" when the
#: whole rendered reply came from the service's JPEG LRU; "none" when a request never
#: reached the cache (no file name, failed before, index jobs).
CacheOutcome = Literal["jpeg", "lru", "redis", "computed", "none"]


class Cacheable(Protocol):
    """What a cached value offers: its serialised form and its size in memory."""

    @property
    def nbytes(self) -> int:
        """Memory held by the value (for the LRU's byte budget)."""
        ...

    def to_bytes(self) -> bytes:
        """Serialised form stored in Redis."""
        ...


V = TypeVar("V", bound=Cacheable)
T = TypeVar("T")


@dataclass(frozen=True)
class FileVersion:
    """One version of a file: a rewrite changes ``mtime_ns`` or ``size``."""

    path: str
    mtime_ns: int
    size: int

    @property
    def file_id(self) -> str:
        """Digest naming this version inside cache keys."""
        return file_identity(self.path, self.mtime_ns, self.size)


@dataclass
class OutcomeReport:
    """Filled by :meth:`ReducedCache.get` inside a :func:`report_outcome` block.

    ``validator``: a digest naming the rendered view's bytes (file version and every
    view parameter, see :func:`note_validator`), or None when nothing was rendered.
    """

    outcome: CacheOutcome = "none"
    validator: str | None = None


_report: contextvars.ContextVar[OutcomeReport | None] = contextvars.ContextVar(
    "is_cache_report", default=None
)


@contextlib.contextmanager
def report_outcome() -> Iterator[OutcomeReport]:
    """Collect how the lookups inside the block were served (the last one wins).

    Context-local, so each task thread of a worker sees only its own request's lookups;
    the task adapter puts it in its log line and result without the service passing it.
    """
    report = OutcomeReport()
    token = _report.set(report)
    try:
        yield report
    finally:
        _report.reset(token)


def note_outcome(outcome: CacheOutcome) -> None:
    """Record how this request's image was found (for an enclosing :func:`report_outcome`)."""
    report = _report.get()
    if report is not None:
        report.outcome = outcome


def note_validator(view_key: str) -> None:
    """Record the key of the view this request rendered or found (as its digest).

    The gateway's ETag: the key names the file version and everything the JPEG depends
    on, so it identifies the bytes without the gateway hashing a few hundred kB per
    reply (0.2 ms of its 1 ms budget, measured).
    """
    report = _report.get()
    if report is not None:
        report.validator = view_validator(view_key)


def stat_version(path: str) -> FileVersion:
    """The file's version, as the current identity may read it; DataUnavailable if not.

    The file is opened, not just ``stat``'ed: ``stat`` needs no read permission on the
    file, and the cache is shared by every user of an ESAF gid, so a file one of them
    cannot read would otherwise reach them from another's cached view. Non-blocking, so
    a FIFO cannot hang the request; the version comes from the opened descriptor.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DataUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return FileVersion(path, st.st_mtime_ns, st.st_size)


class ByteLRU(Generic[T]):
    """Thread-safe LRU bounded by the total ``nbytes`` of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[T, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> T | None:
        """The value, marked most recently used; None on a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: T, nbytes: int) -> None:
        """Insert, evicting least recently used values; a value over budget is skipped."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            self._evict_over_budget()

    def resize(self, max_bytes: int) -> None:
        """A new budget (the supervisor's share, istasks.memory); evicts down to it now."""
        with self._lock:
            self.max_bytes = max_bytes
            self._evict_over_budget()

    def _evict_over_budget(self) -> None:
        """Drop least recently used values until within budget (caller holds the lock)."""
        while self._bytes > self.max_bytes and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted

    def clear(self) -> None:
        """Drop every value (a worker past its hard memory limit)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        with self._lock:
            return self._bytes

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is held (its place in the LRU order unchanged)."""
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class SingleFlight(Generic[T]):
    """Runs a function once per key among concurrent callers; the others share its result."""

    def __init__(self) -> None:
        self._flights: dict[str, concurrent.futures.Future[T]] = {}
        self._lock = threading.Lock()

    def do(self, key: str, fn: Callable[[], T]) -> T:
        """``fn()``'s result (or exception) for every caller arriving while it runs."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = concurrent.futures.Future()
        if not leader:
            return flight.result()
        try:
            result = fn()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            with self._lock:
                del self._flights[key]


class ReducedCache(Generic[V]):
    """Reduced images of one ESAF gid: LRU -> Redis -> compute, computed once."""

    def __init__(
        self,
        redis_url: str | None,
        gid: int,
        decode: Callable[[bytes], V],
        *,
        ttl_s: int,
        lru_max_bytes: int,
        redis_max_bytes: int = 1 << 30,
    ) -> None:
        self.gid = gid
        self.budget = CacheBudget(redis_max_bytes)
        self._decode = decode
        self._ttl_s = ttl_s
        self.lru: ByteLRU[V] = ByteLRU(lru_max_bytes)
        # Callers sharing a flight also share how it was served (computed, or Redis).
        self._flights: SingleFlight[tuple[V, CacheOutcome]] = SingleFlight()
        self._redis = _redis_client(redis_url) if redis_url else None
        self._redis_down_until = 0.0
        self._token_suffix = uuid.uuid4().hex
        self._hits = HitReporter(self._redis_call, stats_key(gid, "lru_hits"), ttl_s)
        # Values computed for this process only still count as computed, off the path.
        self._computed_here = HitReporter(self._redis_call, stats_key(gid, "computed"), ttl_s)

    def get(
        self,
        path: str,
        view_token: str,
        compute: Callable[[FileVersion], V],
        *,
        version: FileVersion | None = None,
        shared: bool = True,
        keep: bool = True,
    ) -> V:
        """The reduced image of ``path`` for ``view_token``; ``compute`` runs on a miss.

        ``version`` is the caller's fresh :func:`stat_version` of ``path`` (stat'ed here
        when not given). ``shared=False`` computes the value in this process (no Redis
        read, lock or write: zoom tiles, see ``Settings.share_zoomed_views``) and keeps
        it in the LRU unless ``keep=False`` (then it is only shared with the callers
        asking for it at the same time).
        ``compute``'s DataUnavailable (and any other error) propagates and nothing is
        cached, so the next request tries again. How the value was found goes to the
        enclosing :func:`report_outcome` block, if any.
        """
        version = version or stat_version(path)
        key = self.key(version, view_token)
        value = self.lru.get(key)
        if value is not None:
            self._hits.note(key)
            note_outcome("lru")
            return value
        if shared:
            value, outcome = self._flights.do(key, lambda: self._load(key, version, compute))
        else:
            value, outcome = self._flights.do(
                key, lambda: self._compute_here(key, version, compute, keep=keep)
            )
        note_outcome(outcome)
        return value

    def key(self, version: FileVersion, view_token: str) -> str:
        """The cache key of ``version``'s reduced image for ``view_token`` (a rewritten
        file has a new version, hence new keys)."""
        return reduced_key(self.gid, version.file_id, view_token)

    def stats(self) -> dict[str, int]:
        """The gid's counters in Redis (``computed``, ``hits``, ``lru_hits``), with this
        process's LRU hits reported first."""
        self._hits.flush()
        self._computed_here.flush()
        names = ("computed", "hits", "lru_hits")
        raw = self._redis_call(lambda r: r.mget([stats_key(self.gid, n) for n in names]))
        values = raw if isinstance(raw, list) else [None] * len(names)
        return {n: int(v or 0) for n, v in zip(names, values, strict=True)}

    def close(self) -> None:
        """Report pending LRU hits, then release the Redis connection pool."""
        self._hits.close()
        self._computed_here.close()
        if self._redis is not None:
            self._redis.close()

    # -- miss path --------------------------------------------------------------------

    def _compute_here(
        self, key: str, version: FileVersion, compute: Callable[[FileVersion], V], *, keep: bool
    ) -> tuple[V, CacheOutcome]:
        value = compute(version)
        if keep:
            self.lru.put(key, value, value.nbytes)
        self._computed_here.note()
        return value, "computed"

    def _load(
        self, key: str, version: FileVersion, compute: Callable[[FileVersion], V]
    ) -> tuple[V, CacheOutcome]:
        value = self._from_redis(key)
        if value is not None:
            return value, "redis"
        lock = lock_key(self.gid, key)
        token = self._token
        owner = self._redis_call(lambda r: r.set(lock, token, nx=True, px=_ms(LOCK_TTL_S)))
        if owner is None and self._redis_usable():
            value = self._wait_for_other(key, lock)
            if value is not None:
                return value, "redis"
        try:
            value = compute(version)
            self._store(key, value)
        finally:
            if owner:
                self._release(lock)
        return value, "computed"

    def _from_redis(self, key: str) -> V | None:
        """Value from Redis (refreshing its TTL and counting the hit), or None."""
        data = self._redis_call(lambda r: _get_refresh(r, key, self._ttl_s))
        if not isinstance(data, bytes):
            return None
        try:
            value = self._decode(data)
        except Exception as exc:  # a corrupt entry is a miss, never a failure
            log.warning("cache entry %s undecodable (%s); recomputing", key, exc)
            return None
        self._redis_call(lambda r: r.incr(stats_key(self.gid, "hits")))
        self.lru.put(key, value, value.nbytes)
        return value

    @property
    def _token(self) -> str:
        """This process's lock value, ``<pid>@<host>/<random>`` (read at lock time: the
        cache may have been made before a fork)."""
        return f"{os.getpid()}@{socket.gethostname()}/{self._token_suffix}"

    def _wait_for_other(self, key: str, lock: str) -> V | None:
        """Another worker computes this key: poll for its value, bounded, and no longer
        than the holder lives."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(LOCK_POLL_S)
            value = self._from_redis(key)
            if value is not None:
                return value
            holder = self._redis_call(lambda r: r.get(lock))
            if not isinstance(holder, bytes):
                return self._from_redis(key)  # holder finished (or failed): last look
            if holder_gone(holder) or self._holder_host_lost(holder):
                log.warning("lock holder %r of %s is gone; computing it here", holder, key)
                self._release(lock, holder)
                return None
        log.warning("waited %.0f s for %s; computing it here", LOCK_WAIT_S, key)
        return None

    def _holder_host_lost(self, holder: bytes) -> bool:
        """Whether a holder on another host is gone: its worker's liveness key
        (queues.liveness, renewed every 0.5 s with a 1.5 s TTL) has expired. Issue 14:
        a retry on this host used to wait out the lock's TTL of a killed host's worker."""
        ident = holder.decode("ascii", "replace").partition("/")[0]
        pid_text, _, host = ident.partition("@")
        if not pid_text.isdigit() or not host or host == socket.gethostname():
            return False
        return self._redis_call(lambda r: r.exists(holder_alive_key(self.gid, ident))) == 0

    def _store(self, key: str, value: V) -> None:
        self.lru.put(key, value, value.nbytes)
        data = value.to_bytes()
        computed = stats_key(self.gid, "computed")
        if len(data) <= min(MAX_REDIS_VALUE_BYTES, self.budget.max_bytes):
            # One round trip on the cold path: the count rides in the store's MULTI.
            self._redis_call(
                lambda r: self.budget.store(r, key, data, self._ttl_s, counter=computed)
            )
        else:
            self._redis_call(lambda r: r.incr(computed))

    def _release(self, lock: str, holder: bytes | None = None) -> None:
        """Delete our lock (or a gone ``holder``'s). GET-then-DEL is not atomic: at worst
        another worker's fresh lock goes early and one image is computed twice, which is
        harmless (kept simple: the lock is the gid's own, unlike the budget's script)."""
        token = holder if holder is not None else self._token.encode()

        def release(r: redis.Redis) -> None:
            if r.get(lock) == token:
                r.delete(lock)

        self._redis_call(release)

    # -- Redis guard ------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_call(self, fn: Callable[[redis.Redis], T]) -> T | None:
        """Run ``fn`` on Redis; on any Redis error log, back off, return None."""
        if self._redis is None or not self._redis_usable():
            return None
        try:
            return fn(self._redis)
        except (redis.RedisError, OSError) as exc:
            self._redis_down_until = time.monotonic() + REDIS_BACKOFF_S
            log.warning(
                "cache Redis error (%s); working without it for %.0f s", exc, REDIS_BACKOFF_S
            )
            return None


class HitReporter:
    """Reports LRU hits to Redis from a background thread: each hit key's TTL is
    refreshed (a value in use must outlive its TTL in Redis too, for the gid's other
    workers) and the hit counter increased, in one pipeline per batch.

    Done on the request path this was a Redis round trip per warm view (0.7 ms of a
    ~14 ms view in the e2e bench); here the hits of each :data:`HIT_BATCH_S` go out in
    one pipeline. :meth:`flush` writes synchronously (for ``stats()``).
    """

    def __init__(
        self,
        call: Callable[[Callable[[redis.Redis], None]], None],
        counter: str,
        ttl_s: int,
    ) -> None:
        self._call = call
        self._counter = counter
        self._ttl_s = ttl_s
        self._pending: dict[str, None] = {}
        self._count = 0
        self._lock = threading.Lock()  # guards _pending, _count and the thread
        self._flushing = threading.Lock()  # one batch at a time, so flush() sees all
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def note(self, key: str | None = None) -> None:
        """Record one hit of ``key`` (None: count it only, there is no key in Redis to
        refresh); written soon by the background thread."""
        with self._lock:
            if key is not None:
                self._pending[key] = None
            self._count += 1
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="is-cache-hits", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self) -> None:
        """Write every hit recorded so far (waits for a batch being written)."""
        with self._flushing:
            with self._lock:
                keys, count = list(self._pending), self._count
                self._pending, self._count = {}, 0
            if count:
                self._call(lambda r: _report_hits(r, keys, self._ttl_s, self._counter, count))

    def close(self) -> None:
        """Stop the thread after writing what is pending."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=5.0)
        self.flush()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            # Gather the hits of the next moment into the same batch: one pipeline per
            # HIT_BATCH_S at most, however many views are served meanwhile.
            time.sleep(HIT_BATCH_S)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the reporter must outlive any bug in a batch
                log.exception("reporting cache hits failed")


class ReaderCache(Generic[T]):
    """Opened readers by file version, so an Eiger dataset's files stay open between frames.

    Readers are leased: one evicted while in use is closed when its last lease ends.
    """

    def __init__(
        self, capacity: int, opener: Callable[[str], T], closer: Callable[[T], None]
    ) -> None:
        self.capacity = capacity
        self._opener = opener
        self._closer = closer
        self._open: collections.OrderedDict[FileVersion, T] = collections.OrderedDict()
        self._leases: collections.Counter[int] = collections.Counter()
        self._retired: dict[int, T] = {}
        self._opening: dict[FileVersion, threading.Lock] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self, version: FileVersion) -> Iterator[T]:
        """An open reader for ``version`` for the duration of the ``with`` block."""
        reader = self._acquire(version)
        try:
            yield reader
        finally:
            self._release(reader)

    def close(self) -> None:
        """Close every reader not in use; the rest close when their leases end."""
        with self._lock:
            readers = list(self._open.values())
            self._open.clear()
        for reader in readers:
            self._retire(reader)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _acquire(self, version: FileVersion) -> T:
        with self._lock:
            reader = self._lease_open(version)
            if reader is not None:
                return reader
            opening = self._opening.setdefault(version, threading.Lock())
        with opening:  # one thread opens a given version; the others then find it
            with self._lock:
                reader = self._lease_open(version)
                if reader is not None:
                    return reader
            reader = self._opener(version.path)
            with self._lock:
                self._opening.pop(version, None)
                # Older versions of the same path go at once: HDF5 shares one open file
                # per inode, so a stale handle could lend its cached metadata to a reopen.
                evicted = [self._open.pop(v) for v in list(self._open) if v.path == version.path]
                self._open[version] = reader
                self._leases[id(reader)] += 1
                while len(self._open) > self.capacity:
                    evicted.append(self._open.popitem(last=False)[1])
        for old in evicted:
            self._retire(old)
        return reader

    def _lease_open(self, version: FileVersion) -> T | None:
        """Lease an already open reader (caller holds the lock)."""
        reader = self._open.get(version)
        if reader is not None:
            self._open.move_to_end(version)
            self._leases[id(reader)] += 1
        return reader

    def _retire(self, reader: T) -> None:
        with self._lock:
            if self._leases[id(reader)] > 0:
                self._retired[id(reader)] = reader
                return
        self._close_quietly(reader)

    def _release(self, reader: T) -> None:
        with self._lock:
            self._leases[id(reader)] -= 1
            if self._leases[id(reader)] > 0:
                return
            del self._leases[id(reader)]
            retired = self._retired.pop(id(reader), None)
        if retired is not None:
            self._close_quietly(retired)

    def _close_quietly(self, reader: T) -> None:
        try:
            self._closer(reader)
        except Exception as exc:  # closing a broken file must not fail a request
            log.warning("closing reader failed: %s", exc)


def _redis_client(url: str) -> redis.Redis:
    """Short timeouts: a slow cache must cost little before we give up on it."""
    return connect(url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=30)


def _get_refresh(r: redis.Redis, key: str, ttl_s: int) -> object:
    """The value, its TTL refreshed and its last use noted in the budget's index."""
    with r.pipeline(transaction=False) as pipe:
        pipe.getex(key, ex=ttl_s)
        pipe.zadd(CACHE_INDEX, {key: time.time()}, xx=True)
        data, _ = pipe.execute()
    return data


def _report_hits(r: redis.Redis, keys: list[str], ttl_s: int, counter: str, count: int) -> None:
    now = time.time()
    with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.expire(key, ttl_s)
        if keys:
            pipe.zadd(CACHE_INDEX, dict.fromkeys(keys, now), xx=True)
        pipe.incrby(counter, count)
        pipe.execute()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def holder_gone(holder: bytes) -> bool:
    """Whether a lock value names a process of this host that no longer runs (or is a
    zombie nobody reaped yet). Anything else counts as alive: another host's worker, an
    unreadable value, a pid we may not signal (another uid's worker, which lives)."""
    pid_text, _, rest = holder.decode("ascii", "replace").partition("@")
    host = rest.partition("/")[0]
    if not pid_text.isdigit() or host != socket.gethostname():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rfind(b")") + 2 : text.rfind(b")") + 3] == b"Z"
