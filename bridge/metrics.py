"""The bridge's Prometheus metrics and the ``/metrics`` endpoint (``IS_METRICS_PORT``).

Series: ``is_requests_total{type,outcome}``, ``is_request_duration_seconds{type}``,
``is_requests_in_flight``, ``is_cache_total{result}``; when a supervisor runs,
``is_live_workers`` and the host memory budget (``is_workers_memory_budget_bytes``, the
workers' PSS in all, ``is_worker_pss_bytes{queue}`` per live worker, at most
``IS_WORKER_MAX`` series, ``is_workers_recycled_total``); and the cache's budget in
Redis (``is_cache_redis_budget_bytes``, ``..._used_bytes``, ``is_cache_redis_images``,
``is_cache_redis_evictions_total``). Every label takes values from a fixed set (request
types outside jpeg/spots/index count as ``other``; queues only of live workers), so a
client cannot grow the series. The endpoint
is unauthenticated and binds ``IS_METRICS_ADDRESS`` (loopback by default).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.outcome import OUTCOMES
from istasks.cache_budget import CacheUsage, cache_usage
from istasks.redisconn import connect

if TYPE_CHECKING:
    from queues.pool import SupervisorClient

log = logging.getLogger(__name__)

REQUEST_TYPES = ("jpeg", "spots", "index", "pixel", "other")
#: Cache outcomes counted (a request that made no lookup is not a cache event).
CACHE_COUNTED = ("jpeg", "lru", "redis", "computed")
#: A cached jpeg answers in ~5 ms; a view may take up to view_timeout_s (20 s) and an
#: index job minutes (those land in +Inf).
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The supervisor is asked at most this often, however often Prometheus scrapes.
WORKERS_TTL_S = 2.0
#: Longest a scrape waits for the supervisor before using the last count.
WORKERS_WAIT_S = 1.0


class BridgeMetrics:
    """The bridge's series in their own registry (several bridges may share a process in
    tests); :meth:`observe` is called once per answered request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "is_requests", "Requests answered, by type and outcome.",
            ["type", "outcome"], registry=self.registry,
        )  # fmt: skip
        self._duration = Histogram(
            "is_request_duration_seconds", "Time from receiving a request to answering it.",
            ["type"], buckets=DURATION_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self._in_flight = Gauge(
            "is_requests_in_flight", "Requests accepted and not yet answered.",
            registry=self.registry,
        )  # fmt: skip
        self._cache = Counter(
            "is_cache", "How workers found the reduced image of a view request.",
            ["result"], registry=self.registry,
        )  # fmt: skip
        for kind in REQUEST_TYPES:  # every series exists from the start, at zero
            self._duration.labels(kind)
            for outcome in OUTCOMES:
                self._requests.labels(kind, outcome)
        for result in CACHE_COUNTED:
            self._cache.labels(result)

    def observe(self, kind: str, outcome: str, duration_s: float, cache: str) -> None:
        """Count one answered request (``kind``: its type as sent, any case)."""
        label = kind.lower() if kind.lower() in REQUEST_TYPES else "other"
        self._requests.labels(label, outcome if outcome in OUTCOMES else "error").inc()
        self._duration.labels(label).observe(duration_s)
        if cache in CACHE_COUNTED:
            self._cache.labels(cache).inc()

    def track_in_flight(self, count: Callable[[], int]) -> None:
        """Read the in-flight gauge from ``count`` at each scrape."""
        self._in_flight.set_function(count)

    def track_workers(self, count: Callable[[], int | None]) -> None:
        """Export ``is_live_workers`` from ``count`` (None: unknown, series left out)."""
        self.registry.register(_LiveWorkers(count))

    def track_memory(self, status: Callable[[], dict[str, Any] | None]) -> None:
        """Export the host memory budget from the supervisor's (cached) status."""
        self.registry.register(_WorkerMemory(status))

    def track_cache(self, usage: Callable[[], CacheUsage | None]) -> None:
        """Export the cache's Redis budget from ``usage`` (None: unknown, left out)."""
        self.registry.register(_CacheBudget(usage))


class _LiveWorkers(Collector):
    """``is_live_workers`` computed at scrape time."""

    def __init__(self, count: Callable[[], int | None]) -> None:
        self._count = count

    def collect(self) -> Iterable[Metric]:
        value = self._count()
        if value is not None:
            yield GaugeMetricFamily("is_live_workers", "Workers the supervisor runs.", value)

    def describe(self) -> Iterable[Metric]:
        return iter(())  # collect() asks the supervisor: never at registration


class _WorkerMemory(Collector):
    """The supervisor's memory budget and each live worker's PSS, at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        memory = status.get("memory") if status else None
        if not status or not isinstance(memory, dict):
            return
        yield GaugeMetricFamily("is_workers_memory_budget_bytes",
                                "Memory all workers of the host may use together.",
                                memory.get("workers_max_bytes", 0))  # fmt: skip
        yield GaugeMetricFamily("is_workers_pss_bytes", "PSS of all live workers together.",
                                memory.get("pss_bytes", 0))  # fmt: skip
        per = GaugeMetricFamily("is_worker_pss_bytes", "PSS of one live worker.", labels=["queue"])
        for row in status.get("workers") or []:
            if isinstance(row, dict) and isinstance(row.get("pss_bytes"), int):
                per.add_metric([str(row.get("queue"))], row["pss_bytes"])
        yield per
        yield CounterMetricFamily("is_workers_recycled",
                                  "Workers recycled past their hard memory limit.",
                                  memory.get("recycled", 0))  # fmt: skip

    def describe(self) -> Iterable[Metric]:
        return iter(())


class _CacheBudget(Collector):
    """The reduced-image cache's budget in Redis, at scrape time."""

    def __init__(self, usage: Callable[[], CacheUsage | None]) -> None:
        self._usage = usage

    def collect(self) -> Iterable[Metric]:
        usage = self._usage()
        if usage is None:
            return
        budget = "Byte budget of reduced images in Redis."
        yield GaugeMetricFamily("is_cache_redis_budget_bytes", budget, usage.max_bytes)
        used = "Bytes of reduced images in Redis."
        yield GaugeMetricFamily("is_cache_redis_used_bytes", used, usage.used_bytes)
        yield GaugeMetricFamily("is_cache_redis_images", "Reduced images in Redis.", usage.entries)
        yield CounterMetricFamily("is_cache_redis_evictions",
                                  "Images evicted to stay within the budget.",
                                  usage.evictions)  # fmt: skip

    def describe(self) -> Iterable[Metric]:
        return iter(())


class CacheUsageReader:
    """The cache budget read from Redis at most once per ``ttl_s``; None when unreachable."""

    def __init__(self, url: str, max_bytes: int, ttl_s: float = WORKERS_TTL_S) -> None:
        self._client = connect(
            url, socket_timeout=WORKERS_WAIT_S, socket_connect_timeout=WORKERS_WAIT_S
        )
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._value: CacheUsage | None = None
        self._expires = 0.0

    def __call__(self) -> CacheUsage | None:
        with self._lock:
            if time.monotonic() >= self._expires:
                try:
                    self._value = cache_usage(self._client, self._max_bytes)
                except (redis.RedisError, OSError) as exc:
                    log.debug("cache usage for metrics failed: %s", exc)
                    self._value = None
                self._expires = time.monotonic() + self._ttl_s
            return self._value

    def close(self) -> None:
        """Release the Redis connection."""
        self._client.close()


class SupervisorWorkerCount:
    """Number of live workers from the supervisor's status, cached for ``ttl_s``.

    Asked from one thread of its own, so the client keeps one connection however many
    scrape threads the HTTP server starts; a slow supervisor costs a scrape at most
    WORKERS_WAIT_S and then the last known count.
    """

    def __init__(self, client: SupervisorClient, ttl_s: float = WORKERS_TTL_S) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._asker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="is-metrics")
        self._lock = threading.Lock()
        self._value: int | None = None
        self._status: dict[str, Any] | None = None
        self._expires = 0.0

    def __call__(self) -> int | None:
        with self._lock:
            self._refresh()
            return self._value

    def status(self) -> dict[str, Any] | None:
        """The supervisor's last status reply (same cache as the count)."""
        with self._lock:
            self._refresh()
            return self._status

    def _refresh(self) -> None:
        if time.monotonic() < self._expires:
            return
        try:
            status = self._asker.submit(self._client.status).result(WORKERS_WAIT_S)
            self._value, self._status = _live(status), status
        except Exception as exc:  # supervisor down or slow: not a scrape failure
            log.debug("supervisor status for metrics failed: %s", exc)
            self._value, self._status = None, None
        self._expires = time.monotonic() + self._ttl_s

    def close(self) -> None:
        """Stop the asking thread and close the client's connection."""
        self._asker.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _live(status: dict[str, Any]) -> int | None:
    """Workers starting or running (not those being stopped) in a status reply."""
    workers = status.get("workers")
    if not status.get("ok") or not isinstance(workers, list):
        return None
    return sum(1 for w in workers if isinstance(w, dict) and w.get("state") != "stopping")


class MetricsEndpoint:
    """``/metrics`` over HTTP on ``address:port`` from a daemon thread."""

    def __init__(self, metrics: BridgeMetrics, address: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, address, metrics.registry)
        host = f"[{address}]" if ":" in address else address
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        log.info("metrics on %s", self.url)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
