"""``is-bridge`` as users start it: configuration checks, serving, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from ops import client
from ops.devsession import isauth_for, sign_isauth, write_session
from ops.redisserver import free_port
from tests.wire_assert import assert_error_reply

if TYPE_CHECKING:
    from tests.accounts import Accounts, SessionKeys

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

ROOT = Path(__file__).resolve().parents[1]


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env.update({f"IS_{k.upper()}": v for k, v in values.items()})
    return env


def _run_bridge(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge.main", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "IS_SESSION_PUBLIC_KEY is not set"),
        ({"session_public_key": "relative.pem"}, "must be an absolute path"),
        ({"session_public_key": "/nonexistent/key.pem"}, "cannot read session public key"),
    ],
)
def test_refuses_to_start_without_a_usable_key(settings: dict[str, str], message: str) -> None:
    env = _env(redis_url="redis://127.0.0.1:1/0", task_secret="s", **settings)
    done = subprocess.run(
        [sys.executable, "-m", "bridge.main", "--bind", "tcp://127.0.0.1:*"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr


def _wait_until_serving(proc: subprocess.Popen[bytes]) -> None:
    """Read the log until the bridge says it serves; fail with the log if it exits."""
    assert proc.stderr is not None
    seen: list[str] = []
    for raw in proc.stderr:
        seen.append(raw.decode(errors="replace"))
        if "bridge serving on" in seen[-1]:
            return
    pytest.fail(f"is-bridge exited ({proc.wait()}): {''.join(seen)}")


@pytest.fixture
def running_bridge(
    redis_url: str, session_keys: SessionKeys, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = _env(
        redis_url=redis_url,
        task_secret="test-secret",
        session_public_key=str(session_keys.public_path),
        supervisor_socket=str(tmp_path / "no-supervisor.sock"),
        view_timeout_s="1",
        worker_start_timeout_s="0.5",
        uid_min="1",
        gid_min="1",
    )
    proc = _run_bridge(env, "--bind", endpoint)
    try:
        _wait_until_serving(proc)
        yield proc, endpoint
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_serves_and_stops_on_sigterm(
    running_bridge: tuple[subprocess.Popen[bytes], str],
    redis_url: str,
    session_keys: SessionKeys,
    accounts: Accounts,
) -> None:
    proc, endpoint = running_bridge
    reply = client.request(endpoint, {"type": "jpeg", "pid": "nobody"}, timeout_s=30.0)
    assert_error_reply(reply, "isMain.c main: Process nobody is not authorized (2)")
    # A valid session but no worker for the identity: answered by the deadline.
    text, sig = sign_isauth(
        session_keys.private_pem, isauth_for("pid1", accounts.shared_user().name, [])
    )
    with redis.Redis.from_url(redis_url) as store:
        write_session(store, "pid1", text, sig)
    started = time.monotonic()
    reply = client.request(endpoint, {"type": "jpeg", "pid": "pid1"}, timeout_s=30.0)
    assert_error_reply(reply, "(request ")
    assert time.monotonic() - started < 15.0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "outcome=refused " in log
    assert 'error="isMain.c main: Process nobody is not authorized (2)"' in log
    assert "pid=nobody" in log
    assert "bridge stopped" in log
