"""An in-process bridge for the bridge tests: real sockets, real Redis, real RSA keys.

Only the dispatch step is scripted (:class:`ScriptedDispatcher`); the end-to-end tests
with real Celery workers live elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq

from bridge.metrics import BridgeMetrics
from bridge.outcome import Reply
from bridge.server import BridgeServer
from bridge.sessions import SeenSessions, SessionVerifier, load_public_key, session_redis
from istasks.jobs import dumps
from istasks.replies import error_frames, success_frames
from istasks.settings import Settings
from ops import client
from ops.devsession import isauth_for, sign_isauth, write_session
from ops.redisserver import start_redis
from queues.identity import IdentityResolver, IdRange
from queues.naming import Identity
from tests.accounts import Account, Accounts, SessionKeys

ANY_ID = IdRange(1, 2**32 - 2)


class ScriptedDispatcher:
    """Test stand-in for CeleryDispatcher, driven by fields of the job.

    ``test_script``: "echo" (default: reply ``"", job, identity queue, kind``), "error"
    (one error frame), "never" (the future never resolves), "raise" (submit raises),
    "garbage" (resolves with a non-reply). ``test_delay_s`` delays the answer;
    ``test_cache`` makes it a :class:`~bridge.outcome.Reply` with that cache outcome and
    a worker time of 1.5 ms, as the Celery dispatcher reports them.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Identity, str, dict[str, Any], str]] = []
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    def submit(
        self, identity: Identity, kind: str, job: dict[str, Any], request_id: str
    ) -> concurrent.futures.Future[list[bytes]]:
        with self._lock:
            self.calls.append((identity, kind, job, request_id))
        future: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
        script = job.get("test_script", "echo")
        if script == "raise":
            raise RuntimeError("scripted failure with a secret traceback")
        if script == "never":
            return future
        frames: Any = {
            "echo": success_frames(dumps(job).encode(), identity.queue.encode(), kind.encode()),
            "error": error_frames("scripted error"),
            "garbage": ["not bytes"],
        }[script]
        if "test_cache" in job:
            frames = Reply(frames, cache=job["test_cache"], worker_ms=1.5)
        timer = threading.Timer(float(job.get("test_delay_s", 0.0)), future.set_result, [frames])
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()
        return future

    def close(self) -> None:
        with self._lock:
            for timer in self._timers:
                timer.cancel()


@dataclass
class BridgeHarness:
    """A running bridge plus what tests need to talk to it."""

    server: BridgeServer
    dispatcher: ScriptedDispatcher
    sessions: SessionVerifier
    redis: redis.Redis
    keys: SessionKeys
    user: Account
    endpoint: str
    pids: list[str] = field(default_factory=list)

    def login(self, pid: str, esafs: list[int] | None = None, user: str | None = None) -> str:
        """Write a validly signed session for ``pid``."""
        isauth = isauth_for(pid, user or self.user.name, esafs or [])
        text, sig = sign_isauth(self.keys.private_pem, isauth)
        write_session(self.redis, pid, text, sig)
        return pid

    def request(self, job: dict[str, Any], *, timeout_s: float = 10.0) -> list[bytes]:
        """One REQ round trip to the bridge."""
        return client.request(self.endpoint, job, timeout_s=timeout_s)

    def dealer(self) -> zmq.Socket[Any]:
        """A raw DEALER connected to the bridge (for hand-made envelopes)."""
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock


def bridge_settings(redis_url: str, keys: SessionKeys, **overrides: Any) -> Settings:
    """Settings of a standalone test bridge on a free loopback port."""
    values: dict[str, Any] = {
        "bind_endpoint": "tcp://127.0.0.1:*",
        "session_redis_url": redis_url,
        "session_public_key": str(keys.public_path),
        "view_timeout_s": 20.0,
        "worker_start_timeout_s": 1.0,
        "uid_min": 1,
        "gid_min": 1,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class HarnessFactory:
    """Starts bridges for one test and stops them afterwards."""

    redis_url: str
    keys: SessionKeys
    accounts: Accounts
    running: list[BridgeHarness] = field(default_factory=list)

    def start(
        self,
        *,
        policy: str = "user",
        margin_s: float = 5.0,
        grace_s: float = 2.0,
        metrics: BridgeMetrics | None = None,
        **overrides: Any,
    ) -> BridgeHarness:
        settings = bridge_settings(self.redis_url, self.keys, **overrides)
        # Verified-session markers in the test Redis, as bridges on several hosts share them.
        seen = SeenSessions(session_redis(settings.broker or self.redis_url))
        sessions = SessionVerifier(
            session_redis(settings.sessions),
            load_public_key(settings.session_public_key),
            seen=seen,
        )
        identities = IdentityResolver(policy, uids=ANY_ID, gids=ANY_ID)
        dispatcher = ScriptedDispatcher()
        server = BridgeServer(
            settings,
            dispatcher,
            sessions,
            identities,
            deadline_margin_s=margin_s,
            shutdown_grace_s=grace_s,
            metrics=metrics,
        )
        server.start()
        harness = BridgeHarness(
            server=server,
            dispatcher=dispatcher,
            sessions=sessions,
            redis=redis.Redis.from_url(self.redis_url),
            keys=self.keys,
            user=self.accounts.shared_user(),
            endpoint=server.endpoint,
        )
        self.running.append(harness)
        return harness

    def stop_all(self) -> None:
        for harness in self.running:
            harness.server.stop(wait_s=10.0)
            harness.dispatcher.close()
            harness.sessions.close()
            harness.redis.close()


@pytest.fixture
def bridges(
    redis_url: str, session_keys: SessionKeys, accounts: Accounts
) -> Iterator[HarnessFactory]:
    """Factory of in-process bridges, stopped after the test."""
    factory = HarnessFactory(redis_url, session_keys, accounts)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def bridge(bridges: HarnessFactory) -> BridgeHarness:
    """One in-process bridge with default settings."""
    return bridges.start()


class OwnRedis:
    """A redis-server of the test's own, to stop and restart on the same port."""

    def __init__(self) -> None:
        self.process = start_redis()
        self.port = self.process.port
        self.url = self.process.url

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> None:
        self.process.stop()
        self.process = start_redis(self.port)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A private redis-server the test may stop and restart."""
    server = OwnRedis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short directory for ipc:// sockets (their paths must stay under ~100 bytes,
    which pytest's tmp_path does not guarantee)."""
    path = Path(tempfile.mkdtemp(prefix="isb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
