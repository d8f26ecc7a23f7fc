"""The bridge's Prometheus metrics and the ``/metrics`` endpoint (``IS_METRICS_PORT``).

Series: ``is_requests_total{type,outcome}``, ``is_request_duration_seconds{type}``,
``is_requests_in_flight``, ``is_cache_total{result}`` and, when a supervisor runs,
``is_live_workers``. Every label takes values from a fixed set (request types outside
jpeg/spots/index count as ``other``), so a client cannot grow the series. The endpoint
is unauthenticated and binds ``IS_METRICS_ADDRESS`` (loopback by default).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.outcome import OUTCOMES

if TYPE_CHECKING:
    from queues.pool import SupervisorClient

log = logging.getLogger(__name__)

REQUEST_TYPES = ("jpeg", "spots", "index", "other")
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
        self._expires = 0.0

    def __call__(self) -> int | None:
        with self._lock:
            if time.monotonic() < self._expires:
                return self._value
            try:
                status = self._asker.submit(self._client.status).result(WORKERS_WAIT_S)
                self._value = _live(status)
            except Exception as exc:  # supervisor down or slow: not a scrape failure
                log.debug("supervisor status for metrics failed: %s", exc)
                self._value = None
            self._expires = time.monotonic() + self._ttl_s
            return self._value

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
