"""The host memory budget of all workers together (queues.budget, istasks.memory): the
share as identities come and go, the hard limit, the recycle that fails no request.

The share and the recycle run against the real supervisor and real workers (the
image-serving entry ``istasks.worker:serve``, forked and setuid as in production); the
governor's checks run in this process on real memory held by a real LRU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from bridge.metrics import BridgeMetrics, CacheUsageReader, SupervisorWorkerCount
from istasks.cache import ByteLRU
from istasks.memory import MemoryGovernor
from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.status import collect_status, format_status
from ops.testdata.eiger import write_eiger
from queues.budget import (
    MIB,
    MIN_CACHE_BYTES,
    WORKER_BASE_BYTES,
    MemoryShare,
    machine_memory_bytes,
    pss_bytes,
    share_for,
    workers_max_bytes,
)
from queues.naming import Identity
from queues.pool import SupervisorClient
from tests.processes import wait_for
from tests.supervisor_harness import ROOT, running_supervisor
from tests.wire_assert import assert_success_reply

GIB = 1024 * MIB


# -- the share ---------------------------------------------------------------------------


def test_share_shrinks_as_identities_arrive_and_respects_the_ceilings() -> None:
    settings = Settings(workers_max_bytes=8 * GIB)
    one, four, twenty = (share_for(settings, n) for n in (1, 4, 20))
    # One worker: capped by the configured LRU sizes; the hard limit is the whole budget.
    assert (one.lru_max_bytes, one.jpeg_lru_max_bytes) == (512 * MIB, 64 * MIB)
    assert one.hard_max_bytes == 8 * GIB
    assert four.hard_max_bytes == 2 * GIB and four.lru_max_bytes == 512 * MIB
    # Twenty: 409.6 MB each, less what a worker holds besides its caches, split
    # 512:160:64 between reduced images, decoded frames and JPEGs.
    caches = 8 * GIB // 20 - WORKER_BASE_BYTES
    assert twenty.lru_max_bytes == caches * 512 // 736
    assert twenty.frame_lru_max_bytes == caches * 160 // 736
    assert twenty.jpeg_lru_max_bytes == (caches - twenty.lru_max_bytes - twenty.frame_lru_max_bytes)
    assert twenty.hard_max_bytes * 20 <= 8 * GIB
    # However many: never below a few images of cache.
    crowd = share_for(settings, 1000)
    cached = crowd.lru_max_bytes + crowd.jpeg_lru_max_bytes + crowd.frame_lru_max_bytes
    assert cached == MIN_CACHE_BYTES


def test_default_budget_comes_from_the_machine() -> None:
    settings = Settings()
    assert workers_max_bytes(settings) == int(machine_memory_bytes() * 0.4)
    assert machine_memory_bytes() > 256 * MIB
    # A derived budget never puts the hard limit below what one worker needs.
    crowded = share_for(settings, 100_000)
    assert crowded.hard_max_bytes == WORKER_BASE_BYTES + 2 * MIN_CACHE_BYTES


def test_share_message_round_trip() -> None:
    share = share_for(Settings(workers_max_bytes=GIB), 3)
    assert MemoryShare.from_message(json.loads(json.dumps(share.to_message()))) == share
    assert MemoryShare.from_message({"memory": {"live": "x"}}) is None
    assert MemoryShare.from_message({"ready": True}) is None


def test_lru_resize_evicts_the_oldest_at_once() -> None:
    lru: ByteLRU[str] = ByteLRU(100)
    for key in "abcd":
        lru.put(key, key, 25)
    lru.get("a")
    lru.resize(50)
    assert (lru.get("b"), lru.get("c")) == (None, None)
    assert lru.get("a") == "a" and lru.get("d") == "d" and lru.nbytes == 50


def test_the_share_sizes_and_drops_the_frame_lru_too() -> None:
    # Issue 13's decoded-frame LRU (zoom tiles) is a cache like the other two: the share
    # sizes it and a drop empties it.
    lru, jpegs, frames = ByteLRU[bytes](GIB), ByteLRU[bytes](GIB), ByteLRU[bytes](GIB)
    for name in "abcd":
        frames.put(name, b"x", 40 * MIB)
    governor = MemoryGovernor()
    governor.attach(lru, jpegs, lambda: None, frames)
    governor.apply(MemoryShare(3, 100 * MIB, 10 * MIB, GIB, frame_lru_max_bytes=80 * MIB))
    assert frames.nbytes == 80 * MIB and len(frames) == 2
    governor.drop_caches()
    assert len(frames) == 0
    line = MemoryShare(3, 1, 2, 3).to_message()
    del line["memory"]["frame_lru_max_bytes"]  # a share from a supervisor before it
    assert MemoryShare.from_message(line) == MemoryShare(3, 1, 2, 3, 0)


# -- the hard limit, in this process -----------------------------------------------------


def _governor(hard_max_bytes: int) -> tuple[MemoryGovernor, ByteLRU[np.ndarray], socket.socket]:
    """A governor over a real LRU holding 200 MB of real pages, connected to a socket
    pair whose other end stands for the supervisor."""
    lru: ByteLRU[np.ndarray] = ByteLRU(GIB)
    big = np.ones(200 * MIB // 8)  # written: resident
    lru.put("big", big, big.nbytes)
    del big
    governor = MemoryGovernor()
    governor.attach(lru, ByteLRU(GIB), lambda: None)
    supervisor_end, worker_end = socket.socketpair()
    governor.connect(worker_end)
    governor.apply(MemoryShare(1, GIB, GIB, hard_max_bytes))
    return governor, lru, supervisor_end


def test_past_the_limit_the_caches_go_and_that_is_enough() -> None:
    before = pss_bytes()
    assert before is not None
    governor, lru, supervisor = _governor(before + 100 * MIB)  # over it by the 200 MB held
    with governor.request():
        pass
    assert len(lru) == 0 and governor.drops == 1 and not governor.recycle_asked
    assert (pss_bytes() or 0) < before + 100 * MIB
    supervisor.setblocking(False)
    with pytest.raises(BlockingIOError):
        supervisor.recv(100)  # nothing asked of the supervisor
    supervisor.close()


def test_still_over_with_caches_dropped_asks_once_to_be_recycled() -> None:
    governor, lru, supervisor = _governor(MIB)  # no process fits in 1 MiB
    inner_done = threading.Event()
    with governor.request():
        with governor.request():
            inner_done.set()
        assert governor.drops == 0  # a request still runs: nothing happens yet
    assert inner_done.is_set() and governor.drops == 1 and len(lru) == 0
    with governor.request():
        pass
    supervisor.settimeout(5)
    message = json.loads(supervisor.recv(1000).decode().splitlines()[0])
    assert message["recycle"] == "memory" and message["pss"] > MIB
    supervisor.setblocking(False)
    with pytest.raises(BlockingIOError):
        supervisor.recv(1000)  # asked once, not after every request
    supervisor.close()


def test_a_share_from_the_supervisor_resizes_the_caches() -> None:
    governor, lru, supervisor = _governor(100 * GIB)
    supervisor.sendall(json.dumps(MemoryShare(7, 50 * MIB, MIB, GIB).to_message()).encode())
    supervisor.sendall(b"\nnot json\n")
    wait_for(lambda: governor.share is not None and governor.share.live == 7, 5, "the share")
    assert lru.max_bytes == 50 * MIB and len(lru) == 0  # 200 MB no longer fit
    supervisor.close()


# -- with the real supervisor and workers ------------------------------------------------


def _shares_logged(log: str, identity: Identity) -> list[int]:
    """The live counts of every share the identity's worker applied, in order."""
    pattern = rf"\[{identity.uid}:{identity.gid}\] istasks\.memory: memory share: (\d+) live"
    return [int(n) for n in re.findall(pattern, log)]


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (setuid workers of several identities)")
def test_workers_share_the_host_budget_as_identities_come_and_go(redis_server: str) -> None:
    a, b, c = (Identity(58101 + n, 58101 + n) for n in range(3))
    env = {"IS_WORKERS_MAX_BYTES": str(3 * GIB)}
    with running_supervisor(redis_server, entry="istasks.worker:serve", env=env) as sup:
        sup.client.ensure(a)
        wait_for(lambda: _shares_logged(sup.log(), a) == [1], 30, "a alone: all of it")
        sup.client.ensure(b)
        sup.client.ensure(c)
        wait_for(lambda: _shares_logged(sup.log(), a)[-1:] == [3], 30, "a's share of 3")
        wait_for(lambda: _shares_logged(sup.log(), c)[-1:] == [3], 30, "c's share of 3")
        # PSS is read off the supervisor's loop, by a thread of its own: soon there.
        wait_for(lambda: all(w["pss_bytes"] for w in sup.client.status()["workers"]), 10, "pss")
        status = sup.client.status()
        memory, rows = status["memory"], status["workers"]
        assert memory["share"]["live"] == 3 and memory["share"]["hard_max_bytes"] == GIB
        assert all(row["pss_bytes"] > 0 for row in rows), rows
        assert memory["pss_bytes"] == sum(row["pss_bytes"] for row in rows)
        os.kill(sup.pids()[c.queue], signal.SIGKILL)  # c leaves: a and b grow again
        wait_for(lambda: _shares_logged(sup.log(), a)[-1:] == [2], 30, "a's share of 2")
        wait_for(lambda: _shares_logged(sup.log(), b)[-1:] == [2], 30, "b's share of 2")
        assert sup.client.status()["memory"]["share"]["live"] == 2


@pytest.fixture
def make_stack() -> Iterator[Callable[[int], tuple[Stack, Path, str]]]:
    """Factory: the whole service (supervisor, bridge) as ``isctl up`` runs it, with the
    given host budget, its dataset and a session."""
    started: list[tuple[Stack, Path]] = []

    def make(workers_max_bytes: int) -> tuple[Stack, Path, str]:
        data = Path(tempfile.mkdtemp(prefix="is-membudget-"))
        data.chmod(0o755)
        write_eiger(data, "x", nimages=4, frames_per_file=2, shape=(1062, 1028), seed=7)
        for item in data.iterdir():
            item.chmod(0o644)
        settings = Settings(
            workers_max_bytes=workers_max_bytes, view_timeout_s=30.0, worker_idle_s=300.0
        )
        stack = Stack.start(data / "run", settings, via_proxy=False)
        started.append((stack, data))
        return stack, data, stack.add_session([0], user=dev_user())

    yield make
    for stack, data in started:
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_worker_past_its_hard_limit_is_recycled_without_failing_a_request(
    make_stack: Callable[[int], tuple[Stack, Path, str]],
) -> None:
    # 32 MiB: every worker is past it once it has served a view, even with its caches
    # dropped (~50 MiB idle, ~70 MiB after a view: 64 MiB was a coin flip).
    stack, data, pid = make_stack(32 * MIB)
    results: list[Any] = []

    def client(n: int) -> None:
        for i in range(6):
            job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(data / "x_master.h5"),
                   "xsize": 300 + 97 * n + 13 * i, "frame": 1 + (n + i) % 4}  # fmt: skip
            try:
                results.append(request(stack.endpoint, job, timeout_s=40))
            except Exception as exc:  # a lost reply is a failure here
                results.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 18
    for reply in results:
        assert isinstance(reply, list), reply
        echo = json.loads(assert_success_reply(reply, 4)[0])
        assert "error" not in echo, echo
    supervisor = SupervisorClient(stack.settings, socket_path=stack.env["IS_SUPERVISOR_SOCKET"])
    try:
        assert supervisor.status()["memory"]["recycled"] >= 1
    finally:
        supervisor.close()
    logs = "".join(p.read_text(errors="replace") for p in (data / "run").glob("*.log"))
    assert "memory past the hard limit" in logs and "worker recycle" in logs
    assert "died while serving" not in logs and "sent again" not in logs


def test_status_and_metrics_show_the_budgets(
    make_stack: Callable[[int], tuple[Stack, Path, str]],
) -> None:
    """``isctl status`` and the bridge's metrics: the cache's bytes in Redis (budget,
    used, evictions) and each worker's PSS against the host budget."""
    stack, data, pid = make_stack(GIB)
    for xsize in (256, 300):
        job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(data / "x_master.h5"),
               "xsize": xsize, "frame": 1}  # fmt: skip
        assert_success_reply(request(stack.endpoint, job, timeout_s=40), 4)
    settings = Settings.from_env(stack.env)
    supervisor = SupervisorClient(settings)  # closed by the worker count below
    wait_for(lambda: supervisor.status()["memory"]["pss_bytes"] > 0, 10, "the worker's PSS")
    status = collect_status(settings)
    assert status["cache"]["max_bytes"] == settings.cache_max_bytes
    assert status["cache"]["entries"] == 2 and status["cache"]["used_bytes"] > 2 * 256 * 256
    memory = status["workers"]["supervisor"]["memory"]
    assert memory["workers_max_bytes"] == GIB and memory["pss_bytes"] > 0
    text = format_status(status)
    assert "cache (Redis, every ESAF):" in text and "used by 2 image(s), 0 evicted" in text
    assert "memory: workers' PSS" in text and "of 1024.0 MiB for 1 worker(s)" in text
    metrics = BridgeMetrics()
    usage = CacheUsageReader(settings.cache or "", settings.cache_max_bytes)
    count = SupervisorWorkerCount(supervisor)
    metrics.track_cache(usage)
    metrics.track_memory(count.status)
    try:
        scraped = generate_latest(metrics.registry).decode()
    finally:
        usage.close()
        count.close()
    assert "is_cache_redis_budget_bytes 1.073741824e+09" in scraped
    assert "is_cache_redis_images 2.0" in scraped
    assert "is_cache_redis_evictions_total 0.0" in scraped
    assert "is_workers_memory_budget_bytes 1.073741824e+09" in scraped
    assert re.search(r'is_worker_pss_bytes\{queue="\d+:\d+"\} [1-9]', scraped), scraped
