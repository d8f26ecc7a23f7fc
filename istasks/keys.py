"""Every Redis key prefix the service writes, defined once.

Cache keys start with the ESAF gid (``is:r:<gid>:``) so that a per-gid Redis ACL user
(``~is:r:<gid>:*``) can be given exactly its own ESAF's entries. For the same reason a
worker's Celery results and its index progress channel are named after its identity
(``<uid>:<gid>``): queues.acl grants each worker only its own.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "is"
REDUCED = f"{PREFIX}:r"  # reduced full-depth images, per gid
LOCK = f"{PREFIX}:lock"  # single-flight computation locks, per gid
STATS = f"{PREFIX}:stats"  # counters (cache hits, computations)
WORKERS = f"{PREFIX}:workers"  # supervisor's registry of live workers
ENSURE = f"{PREFIX}:ensure"  # channel: a bridge asks other hosts' bridges for a worker
PROGRESS = f"{PREFIX}:progress"  # progress channels (index: one per identity)
RESULTS = f"{PREFIX}:res"  # Celery result keys and channels, per identity
SEEN = f"{PREFIX}:seen"  # sessions a bridge verified, per (pid, esaf): "(7)" after logout
HEARTBEAT = f"{PREFIX}:hb"  # workers' liveness across hosts, per identity and host

#: The cache's byte budget across every ESAF (istasks.cache.CacheBudget): one sorted set
#: of reduced-image keys by last use, one hash of their sizes, the bytes they hold, and
#: how many were evicted. Only reduced keys (``is:r:``) are ever entered, or evicted.
CACHE_BUDGET = f"{PREFIX}:cache"
CACHE_INDEX = f"{CACHE_BUDGET}:lru"
CACHE_SIZES = f"{CACHE_BUDGET}:sizes"
CACHE_BYTES = f"{CACHE_BUDGET}:bytes"
CACHE_EVICTIONS = f"{CACHE_BUDGET}:evictions"

#: How long "this session was verified here" outlives the session's last verification.
#: The original remembered it for the life of the per-(pid, esaf) process, i.e. until
#: the server restarted (every 2 h in the 2025 fork); a day covers a beamline shift.
SEEN_TTL_S = 24 * 3600

_PROGRESS_RE = re.compile(re.escape(PROGRESS) + r":(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})")


def file_identity(path: str, mtime_ns: int, size: int) -> str:
    """Short digest of (path, mtime, size): a rewritten file never matches an old key."""
    raw = f"{path}\0{mtime_ns}\0{size}".encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


#: Hex digits of a view validator (:func:`view_validator`), the gateway's ETag.
VALIDATOR_HEX = 40
VALIDATOR_RE = re.compile(f"[0-9a-f]{{{VALIDATOR_HEX}}}")


def view_validator(view_key: str) -> str:
    """Digest of a rendered view's key (file version and every parameter the JPEG
    depends on): equal validators, equal bytes. Hashed because the key holds the path."""
    return hashlib.sha256(view_key.encode("utf-8", "surrogatepass")).hexdigest()[:VALIDATOR_HEX]


def reduced_key(gid: int, file_id: str, view_token: str) -> str:
    """Cache key of one reduced image of one frame/window/size of one file version."""
    return f"{REDUCED}:{gid}:{file_id}:{view_token}"


def lock_key(gid: int, cache_key: str) -> str:
    """Lock that makes identical concurrent requests compute once."""
    return f"{LOCK}:{gid}:{cache_key}"


def holder_alive_key(gid: int, holder: str) -> str:
    """Renewed (with a TTL) by a worker process while it lives, named by its cache-lock
    holder id ``<pid>@<hostname>``: a worker of another host waiting on its lock can
    tell it is gone (istasks.cache, queues.liveness). Under the gid's lock keys, so the
    ACL of every worker of the ESAF reaches it."""
    return f"{LOCK}:{gid}:alive:{holder}"


def seen_session_key(pid: str, esaf: int) -> str:
    """Marker that session ``pid`` was verified for ``esaf`` (in the broker Redis, shared
    by every bridge). The pid is a bearer token, so the key holds a digest, never the pid."""
    raw = f"{pid}\0{esaf}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"{SEEN}:{digest}"


def gid_pattern(gid: int) -> list[str]:
    """Key patterns a worker of ESAF ``gid`` may touch (for Redis ACLs)."""
    return [f"{REDUCED}:{gid}:*", f"{LOCK}:{gid}:*", f"{STATS}:{gid}:*"]


def budget_keys() -> list[str]:
    """The cache budget's keys, in the order the budget's script takes them: index (last
    use by key), sizes, bytes used, evictions."""
    return [CACHE_INDEX, CACHE_SIZES, CACHE_BYTES, CACHE_EVICTIONS]


def budget_patterns() -> list[str]:
    """Key patterns every worker may touch for the shared budget (for Redis ACLs)."""
    return [f"{CACHE_BUDGET}:*"]


def eviction_pattern() -> str:
    """Keys any worker may only delete, to evict another ESAF's least recently used
    reduced images when over the budget (never read or write them)."""
    return f"{REDUCED}:*"


def stats_key(gid: int, name: str) -> str:
    """Counter ``name`` of ESAF ``gid`` (e.g. ``hits``, ``computed``)."""
    return f"{STATS}:{gid}:{name}"


def result_prefix(uid: int, gid: int) -> str:
    """Celery ``global_keyprefix`` of an identity's worker: its results are stored and
    published under ``is:res:<uid>:<gid>:celery-task-meta-<task id>``."""
    return f"{RESULTS}:{uid}:{gid}:"


def heartbeat_hosts_key(uid: int, gid: int) -> str:
    """Set of the hosts whose worker of identity ``uid:gid`` has sent a heartbeat (the
    bridge drops a host from it once its heartbeat key has expired)."""
    return f"{HEARTBEAT}:{uid}:{gid}"


def heartbeat_key(uid: int, gid: int, host: str) -> str:
    """The heartbeat of identity ``uid:gid``'s worker on ``host``: expires unless renewed,
    so a host lost with its worker is seen by every bridge (queues.liveness)."""
    return f"{HEARTBEAT}:{uid}:{gid}:{host}"


def heartbeat_patterns(uid: int, gid: int) -> list[str]:
    """Key patterns of the identity's heartbeats (for its Redis ACL user)."""
    return [heartbeat_hosts_key(uid, gid), f"{heartbeat_hosts_key(uid, gid)}:*"]


def progress_channel(uid: int, gid: int) -> str:
    """Channel where the identity's worker publishes index progress for the bridge to
    relay (bridge.progress); the only channel besides its results it may publish on."""
    return f"{PROGRESS}:{uid}:{gid}"


def parse_progress_channel(channel: str) -> tuple[int, int]:
    """(uid, gid) of a :func:`progress_channel` name; ValueError for anything else."""
    match = _PROGRESS_RE.fullmatch(channel)
    if match is None:
        raise ValueError(f"not an index progress channel: {channel!r}")
    return int(match[1]), int(match[2])
