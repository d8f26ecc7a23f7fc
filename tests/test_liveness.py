"""Workers' liveness across hosts (queues.liveness) against a real Redis: heartbeats
written by real processes, read by a bridge's view, a process killed outright."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from istasks.keys import heartbeat_hosts_key, heartbeat_key, holder_alive_key
from istasks.settings import Settings
from queues.liveness import INTERVAL_S, POLL_TTL_S, TTL_S, Heartbeat, Liveness
from queues.naming import Identity
from tests.processes import terminate, wait_for

IDENTITY = Identity(4001, 5001)
REPO = Path(__file__).resolve().parent.parent

#: A worker host in a child process: beats for IDENTITY as host argv[2], with one task
#: listed as running, until killed.
BEATER = """
import sys, time
from queues.liveness import Heartbeat
from queues.naming import Identity
beat = Heartbeat(sys.argv[1], Identity(4001, 5001), sys.argv[2], "is_4001_5001@" + sys.argv[2],
                 lambda: ["task-on-" + sys.argv[2]])
beat.start()
print("beating", flush=True)
time.sleep(600)
"""


def _beater(url: str, host: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BEATER, url, host],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"beating\n"
    return proc


def test_a_host_killed_outright_is_seen_gone_within_the_ttl(redis_url: str) -> None:
    """Two hosts beat for one identity; one is SIGKILLed (no clean removal): a bridge
    sees it gone within TTL + a poll, knows what it was running, and the other live."""
    hosts = [_beater(redis_url, "hosta"), _beater(redis_url, "hostb")]
    view = Liveness(redis_url)
    try:
        wait_for(lambda: view.state(IDENTITY).hosts == ["hosta", "hostb"], 5.0, "both beating")
        sent_at = time.monotonic()
        hosts[1].send_signal(signal.SIGKILL)
        hosts[1].wait()
        killed_at = time.monotonic()
        wait_for(lambda: view.state(IDENTITY).hosts == ["hosta"], 5.0, "hostb gone")
        seen_s = time.monotonic() - killed_at
        assert seen_s <= TTL_S + POLL_TTL_S + 0.3, f"seen gone after {seen_s:.2f} s"
        state = view.state(IDENTITY)
        lost = state.lost_since("anything", sent_at, certain=False)
        assert lost is not None and lost.node == "is_4001_5001@hostb"
        # index: only the task its last beat listed as running
        assert state.lost_since("task-on-hostb", time.monotonic(), certain=True) == lost
        assert state.lost_since("task-on-hosta", sent_at, certain=True) is None
        # the bridge's own host is left to its supervisor
        assert state.lost_since("anything", sent_at, certain=False, other_than="hostb") is None
        # sent after the death was seen: that worker never saw it
        assert state.lost_since("later", time.monotonic(), certain=False) is None
        # the expired host left the membership set
        members = redis.Redis.from_url(redis_url).smembers(heartbeat_hosts_key(4001, 5001))
        assert members == {b"hosta"}
    finally:
        for proc in hosts:
            terminate(proc, signum=signal.SIGKILL)
            if proc.stdout is not None:
                proc.stdout.close()
        view.close()


def test_clean_stop_removes_the_beat_and_a_restart_counts_as_gone(redis_url: str) -> None:
    view = Liveness(redis_url, poll_ttl_s=0.0)
    first = Heartbeat(redis_url, IDENTITY, "hosta", "is_4001_5001@hosta")
    first.start()
    assert view.any_live(IDENTITY)
    key = heartbeat_key(4001, 5001, "hosta")
    ttl_ms = redis.Redis.from_url(redis_url).pttl(key)
    assert 0 < ttl_ms <= TTL_S * 1000
    # a new worker process on the same host within the TTL: the old one is gone
    second = Heartbeat(redis_url, IDENTITY, "hosta", "is_4001_5001@hosta")
    second.beat()
    state = view.state(IDENTITY)
    assert [b.boot for b in state.live] != [g.beat.boot for g in state.gone]
    assert len(state.gone) == 1 and state.hosts == ["hosta"]
    first._stopping.set()  # only the second beats from now on
    second.stop()
    assert not view.any_live(IDENTITY)
    assert not redis.Redis.from_url(redis_url).exists(key)
    first.stop()
    view.close()


def test_an_unreadable_redis_is_not_a_dead_worker(redis_url: str) -> None:
    beat = Heartbeat(redis_url, IDENTITY, "hosta", "n@hosta", interval_s=INTERVAL_S)
    beat.start()
    view = Liveness(redis_url, poll_ttl_s=0.0)
    try:
        assert view.any_live(IDENTITY)
        view._client = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens
        state = view.state(IDENTITY)
        assert state.hosts == ["hosta"] and not state.gone
    finally:
        beat.stop()
        view.close()


def test_settings_name_the_host_and_its_esafs() -> None:
    settings = Settings(host_name="beam line@A:1", host_esafs="6001, 6002")
    assert settings.host == "beam-line-A-1"
    assert settings.esafs == frozenset({6001, 6002})
    assert settings.serves_esaf(6001) and not settings.serves_esaf(7000)
    assert Settings().serves_esaf(7000) and Settings().esafs is None
    assert Settings().host  # the hostname


def test_the_beat_keeps_the_processs_lock_holder_alive(redis_url: str) -> None:
    """The cache-lock holder id of this process (istasks.cache) lives as long as the beat."""
    alive = holder_alive_key(5001, f"{os.getpid()}@{socket.gethostname()}")
    client = redis.Redis.from_url(redis_url)
    beat = Heartbeat(redis_url, IDENTITY, "hosta", "n@hosta", cache_url=redis_url)
    beat.start()
    assert 0 < client.pttl(alive) <= TTL_S * 1000
    beat.stop()
    assert not client.exists(alive)
