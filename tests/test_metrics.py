"""The bridge's Prometheus endpoint: requests by type and outcome, latency histogram,
in-flight gauge, cache outcomes and live workers, scraped over real HTTP.

First against an in-process bridge (scripted dispatch, so every outcome can be made),
then against the stack as ``isctl up`` starts it with ``IS_METRICS_PORT`` set.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import BridgeMetrics, MetricsEndpoint, SupervisorWorkerCount
from istasks.settings import Settings
from ops.client import request
from ops.redisserver import free_port
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from queues.pool import SupervisorClient
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:  # a plugin module: imported by pytest, not here (assert rewriting)
    from tests.bridge_harness import HarnessFactory

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of ``url``'s text exposition, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# -- in process -----------------------------------------------------------------------


@pytest.fixture
def metrics() -> Iterator[tuple[BridgeMetrics, str]]:
    """Metrics served on a free loopback port; yields them and their URL."""
    bridge_metrics = BridgeMetrics()
    endpoint = MetricsEndpoint(bridge_metrics, "127.0.0.1", free_port())
    yield bridge_metrics, endpoint.url
    endpoint.close()


def test_counts_every_outcome_by_type(
    bridges: HarnessFactory, metrics: tuple[BridgeMetrics, str]
) -> None:
    bridge_metrics, url = metrics
    bridge = bridges.start(
        metrics=bridge_metrics, view_timeout_s=0.3, worker_start_timeout_s=0.0, margin_s=0.2
    )
    pid = bridge.login("metrics-pid", esafs=[5])
    base = {"type": "jpeg", "pid": pid, "esaf": 5}
    assert_success_reply(bridge.request({**base, "test_cache": "computed"}), 4)
    assert_success_reply(bridge.request({**base, "test_cache": "lru"}), 4)
    assert_success_reply(bridge.request({**base, "type": "Spots", "test_cache": "redis"}), 4)
    assert_error_reply(bridge.request({**base, "test_script": "error"}), "scripted error")
    assert_error_reply(bridge.request({**base, "test_script": "never"}), "no reply within")
    assert_error_reply(bridge.request({**base, "pid": "unknown"}), "not authorized")
    assert_error_reply(bridge.request({**base, "type": "x" * 40}), "Unknown job type")
    samples = scrape(url)
    requests = {
        (dict(labels)["type"], dict(labels)["outcome"]): count
        for (name, labels), count in samples.items()
        if name == "is_requests_total" and count
    }
    assert requests == {
        ("jpeg", "ok"): 2, ("spots", "ok"): 1, ("jpeg", "error"): 1, ("jpeg", "timeout"): 1,
        ("jpeg", "refused"): 1, ("other", "bad_request"): 1,
    }  # fmt: skip
    assert value(samples, "is_requests_total", type="index", outcome="ok") == 0  # pre-created
    for result in ("computed", "lru", "redis"):
        assert value(samples, "is_cache_total", result=result) == 1
    jpeg_count = value(samples, "is_request_duration_seconds_count", type="jpeg")
    assert jpeg_count == 5
    assert value(samples, "is_request_duration_seconds_bucket", type="jpeg", le="+Inf") == 5
    # The timed-out request waited at least its 0.5 s deadline: not in the 0.25 s bucket.
    assert value(samples, "is_request_duration_seconds_bucket", type="jpeg", le="0.25") <= 4
    assert value(samples, "is_request_duration_seconds_sum", type="jpeg") >= 0.5
    assert value(samples, "is_requests_in_flight") == 0
    assert not any(name == "is_live_workers" for name, _ in samples)  # no supervisor


def test_in_flight_gauge_follows_open_requests(
    bridges: HarnessFactory, metrics: tuple[BridgeMetrics, str]
) -> None:
    bridge_metrics, url = metrics
    bridge = bridges.start(metrics=bridge_metrics)
    pid = bridge.login("in-flight-pid")
    dealer = bridge.dealer()
    try:
        job = b'{"type":"jpeg","pid":"%s","test_delay_s":30}' % pid.encode()
        for _ in range(2):
            dealer.send_multipart([b"", job])
        _wait_for(lambda: value(scrape(url), "is_requests_in_flight") == 2)
        bridge.server.stop(wait_s=10.0)  # answers both (shutting down) and stops
        for _ in range(2):
            assert dealer.poll(10_000, zmq.POLLIN)
            assert b"shutting down" in dealer.recv_multipart()[-1]
    finally:
        dealer.close()
    samples = scrape(url)
    assert value(samples, "is_requests_in_flight") == 0
    assert value(samples, "is_requests_total", type="jpeg", outcome="unavailable") == 2


def test_live_workers_absent_without_a_reachable_supervisor(tmp_path: Path) -> None:
    client = SupervisorClient(Settings(), socket_path=str(tmp_path / "none.sock"))
    count = SupervisorWorkerCount(client)
    try:
        assert count() is None
    finally:
        count.close()
    bridge_metrics = BridgeMetrics()
    bridge_metrics.track_workers(lambda: None)
    endpoint = MetricsEndpoint(bridge_metrics, "127.0.0.1", free_port())
    try:
        assert not any(name == "is_live_workers" for name, _ in scrape(endpoint.url))
    finally:
        endpoint.close()


# -- the whole stack ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """World-readable data (as root the workers run as an unprivileged account)."""
    path = Path(tempfile.mkdtemp(prefix="is-metrics-"))
    path.chmod(0o755)
    write_eiger(path, "m", nimages=2, frames_per_file=1, shape=(512, 514), seed=5)
    for item in path.iterdir():
        item.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(metrics_port=free_port(), worker_idle_s=300)
    with Stack.start(tmp_path_factory.mktemp("run"), settings) as running:
        yield running


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.slow
def test_stack_metrics(stack: Stack, data_dir: Path) -> None:
    url = f"http://127.0.0.1:{stack.settings.metrics_port}/metrics"
    before = scrape(url)
    pid = stack.add_session([0], user=dev_user())
    view: dict[str, Any] = {"type": "jpeg", "pid": pid, "esaf": 0, "xsize": 160,
                            "fn": str(data_dir / "m_master.h5")}  # fmt: skip
    assert_success_reply(request(stack.endpoint, view, timeout_s=30), 4)
    assert_success_reply(request(stack.endpoint, {**view, "contrast": 20}, timeout_s=30), 4)
    missing = {**view, "fn": str(data_dir / "gone_master.h5")}
    assert_success_reply(request(stack.endpoint, missing, timeout_s=30), 4)
    spots = {"type": "spots", "pid": pid, "esaf": 0}
    assert_error_reply(request(stack.endpoint, spots, timeout_s=30), "Missing filename")
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert delta("is_requests_total", type="jpeg", outcome="ok") == 2
    assert delta("is_requests_total", type="jpeg", outcome="blank") == 1
    assert delta("is_requests_total", type="spots", outcome="error") == 1
    assert delta("is_cache_total", result="computed") == 1
    assert delta("is_cache_total", result="lru") == 1
    assert delta("is_cache_total", result="redis") == 0
    assert delta("is_request_duration_seconds_count", type="jpeg") == 3
    assert delta("is_request_duration_seconds_bucket", type="jpeg", le="30.0") == 3
    assert delta("is_request_duration_seconds_sum", type="jpeg") > 0
    assert value(after, "is_requests_in_flight") == 0
    # One identity served: one live worker (the count is cached for 2 s).
    _wait_for(lambda: value(scrape(url), "is_live_workers") == 1)
    log = (stack.run_dir / "bridge.log").read_text()
    assert f"metrics on http://127.0.0.1:{stack.settings.metrics_port}/metrics" in log
