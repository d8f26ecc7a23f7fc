"""Short load run (issue 6): the whole service under 16 concurrent is.js-style clients.

The same run as ``bench/bench_load.py`` (4 identities: real accounts as root, else 4
sessions of the current user; mixed warm and cold views and spots; one long index),
shortened to ~10 s on smaller frames. It asserts only what must hold at any speed:
every request answered exactly once and correctly, the long index answered. Latency
and memory are the benchmark's to report; the one cause of memory growth found under
load (per-request result subscriptions) has its own deterministic check here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from bench.bench_e2e import data_directory
from bench.bench_load import LoadConfig, measure
from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from tests.wire_assert import assert_success_reply

pytestmark = pytest.mark.slow

#: Views asked in the subscription test.
REQUESTS = 100


def test_no_reply_lost_or_duplicated_under_load() -> None:
    config = LoadConfig(duration_s=8, warmup_s=2, shape=(1062, 1028), nimages=24)
    report = measure(config)
    counts = report.counts
    assert counts.sent > config.clients  # every client got through more than one request
    assert counts.lost == 0, f"{counts.lost} of {counts.sent} requests never answered"
    assert counts.duplicated == 0, f"{counts.duplicated} replies to another request"
    assert counts.errors == 0, counts.error_samples
    assert set(counts.latencies_ms) == {"warm", "cold", "spots"}
    assert report.index.get("ok"), report.index


def test_requests_leave_no_result_subscriptions_behind(tmp_path: Path) -> None:
    """The bridge reads results through one pattern subscription; a request must not add
    a SUBSCRIBE/UNSUBSCRIBE pair of its own (regression: Celery's per-task result
    subscription left state in redis-py that was never released, ~280 B per request in
    the bridge, and with Redis down held each send ~20 s in its reconnect loop)."""
    data = data_directory("is-load-subs-")
    stack = Stack.start(tmp_path / "run", Settings(worker_idle_s=300), via_proxy=True)
    admin = redis.Redis.from_url(stack.redis_url)
    try:
        master = write_eiger(data, "s", nimages=1, frames_per_file=1, shape=(256, 256), seed=5)
        master.chmod(0o644)
        (data / "s_data_000001.h5").chmod(0o644)
        job = {"type": "jpeg", "pid": stack.add_session([0], user=dev_user()), "esaf": 0,
               "fn": str(master), "xsize": 64}  # fmt: skip
        assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
        before = _subscribe_calls(admin)
        for _ in range(REQUESTS):
            assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
        assert _subscribe_calls(admin) - before < REQUESTS // 10
    finally:
        admin.close()
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)


def _subscribe_calls(admin: redis.Redis) -> int:
    """SUBSCRIBE plus UNSUBSCRIBE commands the server has run so far."""
    stats = admin.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("subscribe", "unsubscribe")
    )
