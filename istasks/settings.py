"""The one settings object: every knob of the service, read from ``IS_*`` variables.

Read it through :func:`get_settings` (cached); tests call :func:`reset_settings` after
changing the environment. Nothing else in the project reads ``os.environ`` for
configuration. This module imports only the standard library so the bridge stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "IS_"


@dataclass(frozen=True)
class Settings:
    """Service configuration. Field ``foo_bar`` is read from ``IS_FOO_BAR``."""

    # Redis: one URL serves broker, results and cache unless the specific ones are set.
    redis_url: str | None = None
    broker_url: str | None = None
    result_url: str | None = None
    cache_url: str | None = None
    session_redis_url: str | None = None
    # Redis failover: the sentinels (host:port,...) and the master's name. Set, the
    # broker/result/cache URLs give only credentials and db (istasks.redisconn); the
    # session store stays a plain URL.
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "is"
    session_public_key: str | None = None
    # Only when redis_url is unset (``isctl up``, tests): the private redis-server's
    # budget. It holds the queues and the cache together, so at the budget it evicts
    # only keys that expire anyway (cache, results), never a queue (volatile-lru).
    embedded_redis_maxmemory: str = "1gb"
    identity_policy: str = "user"  # "user" (original) or "esaf" (2025 fork)

    # ZeroMQ: connect to an is_proxy DEALER, or bind our own ROUTER when standalone.
    proxy_endpoint: str | None = None
    bind_endpoint: str | None = None

    # Task envelopes: per-queue keys are derived from this master secret.
    task_secret: str | None = None
    task_secret_file: str | None = None
    task_max_age_s: float = 120.0
    # Per process, never service-wide: the hex envelope key of the one queue a worker
    # started by hand (``python -m istasks.worker``) serves, set by whoever spawns it.
    # The supervisor hands its workers their keys directly and never passes this on.
    queue_key: str | None = None

    # Request deadlines (the bridge always answers; these bound how long it waits).
    view_timeout_s: float = 20.0
    index_timeout_s: float = 1800.0
    worker_start_timeout_s: float = 5.0

    # Image core and cache.
    jpeg_quality: int = 90
    cache_ttl_s: int = 3600
    # Bytes of reduced images in the cache Redis, every ESAF together: a write past it
    # evicts the least recently used images first (istasks.cache.CacheBudget), whatever
    # the instance's own maxmemory says (a shared Redis without one grew to 9 GB).
    cache_max_bytes: int = 1024 * 1024 * 1024
    lru_max_bytes: int = 512 * 1024 * 1024
    # Rendered jpeg replies kept per worker: a repeated identical view skips contrast+encode.
    jpeg_lru_max_bytes: int = 64 * 1024 * 1024
    # Decoded frames kept per worker, so that the tiles of the frame on screen (zoom, pan)
    # are reduced without decoding it again: room for two Eiger2 16M uint32 frames
    # (4148 x 4362 x 4 B = 72.4 MB each). 0: off.
    frame_lru_max_bytes: int = 160 * 1024 * 1024
    # Whether zoomed views (tiles) go to the cache Redis too. Off: a tile is reduced in
    # the worker and only its JPEG is kept there (Service.reduced says why).
    # Recomputing it from the frame LRU costs less than storing it (4 MB per 1024 px
    # uint32 tile, 28 tiles for one frame looked over at zoom 2-8), the store held a
    # single-threaded Redis, which carries every request, for ~10 ms per tile, and
    # tiles would evict the views of other frames from the budget.
    share_zoomed_views: bool = False
    max_xsize: int = 10000
    # Cost limits against one user starving a host: pixels of one view (a 10000 px view
    # costs 4 s of CPU and 400 MB), and requests one session may have in flight at once
    # (0: no limit). Over them: the blank image with the reason, and an error frame.
    view_max_pixels: int = 4096 * 4096
    session_max_in_flight: int = 16
    spot_sensitivity: float = 1.5
    # Our edge fold (istasks.core.reduce): off gives the original's picture to the pixel;
    # on adds the far-edge pixels no box reaches to the edge row/column (numbers unchanged).
    fold_edges: bool = False

    # Index task.
    indexer_command: str = "rapd.index"
    index_tmp_dir: str | None = None

    # Admin prefetch (``isctl prefetch``). A queued backlog waits behind every view, so
    # its envelopes live longer than interactive ones (a replayed one only warms the
    # cache); each run keeps this many tasks in flight, i.e. worker threads busy.
    prefetch_max_age_s: float = 3600.0
    prefetch_window: int = 1
    # ``--watch DIR`` looks this many directories below DIR (beamlines nest each
    # dataset as ESAF/user/sample/...): bounded, so a stray deep tree costs nothing.
    prefetch_watch_depth: int = 6

    # Workers and identities (supervisor).
    worker_idle_s: float = 600.0
    worker_max: int = 64
    worker_concurrency: int = 4
    # Threads one image's compiled passes may use at once (istasks.core.bands): a zoom
    # tile's reduce, statistics and grey levels split into row bands. 0: the CPUs this
    # process may run on, at most 4; 1: none.
    core_threads: int = 0
    # Memory of every worker of this host together (0: a share of the machine's memory,
    # queues.budget.default_workers_max_bytes). Each live worker gets an equal share for
    # its in-process caches (the two LRU settings above are ceilings) and is recycled
    # between requests when past its share even with its caches dropped.
    workers_max_bytes: int = 0
    uid_min: int = 1000
    uid_max: int = 4_000_000_000
    gid_min: int = 1000
    gid_max: int = 4_000_000_000
    data_root: str | None = None
    # Several hosts on one broker: the name this host goes by in worker node names,
    # Redis ACL users, liveness heartbeats and task ids (default: the hostname), and the
    # ESAF gids whose data this host has (comma-separated; unset: every ESAF).
    host_name: str | None = None
    host_esafs: str | None = None
    supervisor_socket: str = "/run/is/supervisor.sock"
    run_dir: str | None = None

    # Operations.
    log_level: str = "INFO"
    log_syslog: bool = False
    log_syslog_address: str = "/dev/log"
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    flower_port: int = 5555
    # HTTP gateway (``is-gateway``, bridge.gateway): browsers and scripts. Port 0 in
    # ``isctl up`` means any free port; the gateway itself needs a real one.
    gateway_port: int = 8090
    gateway_address: str = "127.0.0.1"
    # Requests one session may have in flight at the gateway; more get 429.
    gateway_session_in_flight: int = 16
    # Mark the session cookie Secure (set when the gateway is served over HTTPS).
    gateway_secure_cookie: bool = False
    flower_basic_auth: str | None = None
    # Celery task events (Flower's task views) from a worker's first task. Off, as in
    # Celery, where nobody listens; on where Flower runs (ops/is.env, compose, ``isctl
    # up --flower``): Flower's own enable-events broadcast reaches a new worker only
    # after up to 5 s, and a user's first views are exactly those seconds.
    task_events: bool = False

    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``IS_*`` variables, converting by each field's type."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, raw, hints[f.name])
        return cls(**values)  # type: ignore[arg-type]

    @property
    def image_threads(self) -> int:
        """``core_threads``, with 0 resolved to this process's CPUs (at most 4)."""
        if self.core_threads > 0:
            return self.core_threads
        return max(1, min(4, len(os.sched_getaffinity(0))))

    @property
    def broker(self) -> str | None:
        """Celery broker URL: ``IS_BROKER_URL`` or the shared ``IS_REDIS_URL``."""
        return self.broker_url or self.redis_url

    @property
    def results(self) -> str | None:
        """Celery result-backend URL."""
        return self.result_url or self.redis_url

    @property
    def cache(self) -> str | None:
        """Redis URL of the reduced-image cache."""
        return self.cache_url or self.redis_url

    @property
    def host(self) -> str:
        """This host's name (``IS_HOST_NAME`` or the hostname), safe in node names, Redis
        ACL user names and keys: no spaces, ``@`` or ``:``."""
        raw = self.host_name or socket.gethostname() or "localhost"
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)[:64]

    @property
    def esafs(self) -> frozenset[int] | None:
        """The ESAF gids this host serves (``IS_HOST_ESAFS``); None: every ESAF."""
        if not self.host_esafs or not self.host_esafs.strip():
            return None
        try:
            return frozenset(int(part) for part in self.host_esafs.split(",") if part.strip())
        except ValueError as exc:
            raise ValueError(f"IS_HOST_ESAFS={self.host_esafs!r}: not a list of gids") from exc

    def serves_esaf(self, gid: int) -> bool:
        """Whether this host's supervisor starts workers for ESAF ``gid``."""
        esafs = self.esafs
        return esafs is None or gid in esafs

    @property
    def sessions(self) -> str | None:
        """Redis URL of the login service's sessions."""
        return self.session_redis_url or self.redis_url


def _convert(name: str, raw: str, hint: object) -> object:
    """Convert one environment string to the field's declared type."""
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    kinds.discard(type(None))
    if raw == "" and len(kinds) < (len(typing.get_args(hint)) or 1):
        return None  # an empty value unsets an optional field
    kind = kinds.pop() if len(kinds) == 1 else str
    try:
        if kind is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind in (int, float):
            return int(raw) if kind is int else float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings.from_env()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
