"""``isctl status``: backlog of per-identity queues no worker consumes (invisible to
Flower), read from a real Redis filled by a real Celery app; workers from a real
supervisor or its Redis registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from istasks import keys
from istasks.app import create_app
from istasks.settings import Settings, reset_settings
from ops.redisserver import free_port
from ops.status import collect_status, format_status, main
from queues.liveness import Heartbeat
from queues.naming import Identity
from tests.processes import terminate


def _settings(redis_url: str, tmp_path: Path) -> Settings:
    # A socket path that does not exist: no supervisor unless a test starts one there.
    return Settings(redis_url=redis_url, supervisor_socket=str(tmp_path / "supervisor.sock"))


def _send(settings: Settings, queue: str, count: int, priority: int | None = None) -> None:
    """Publish ``count`` tasks exactly as the bridge does: by name, to the identity queue."""
    app = create_app(settings)
    try:
        for _ in range(count):
            app.send_task("is.jpeg", args=["token"], queue=queue, priority=priority)
    finally:
        app.close()


def _row(status: dict[str, object], queue: str) -> dict[str, object]:
    rows = status["queues"]
    assert isinstance(rows, list)
    (row,) = [r for r in rows if r["queue"] == queue]
    assert isinstance(row, dict)
    return row


def test_backlog_of_queues_without_workers(redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path)
    _send(settings, "1000:1000", 2)
    _send(settings, "1000:1000", 1, priority=5)  # kombu's step 3 sub-list
    _send(settings, "1001:2000:prefetch", 4, priority=9)
    status = collect_status(settings)
    assert "error" not in status
    interactive = _row(status, "1000:1000")
    assert interactive["backlog"] == 3
    assert interactive["by_priority"] == {0: 2, 3: 1}
    assert (interactive["uid"], interactive["gid"], interactive["prefetch"]) == (1000, 1000, False)
    prefetch = _row(status, "1001:2000:prefetch")
    assert prefetch["backlog"] == 4 and prefetch["by_priority"] == {9: 4}
    assert prefetch["prefetch"] is True
    assert [r["queue"] for r in status["queues"]] == ["1000:1000", "1001:2000:prefetch"]
    assert status["workers"]["source"] is None
    text = format_status(status)
    assert "1000:1000" in text and "1001:2000:prefetch" in text
    assert "0:2 3:1" in text and "9:4" in text
    assert "workers: unknown" in text


def test_queue_seen_without_its_binding(redis_url: str, tmp_path: Path) -> None:
    """Waiting messages count even when kombu's binding set is gone (e.g. evicted)."""
    settings = _settings(redis_url, tmp_path)
    _send(settings, "1002:3000", 2)
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match="_kombu.binding*"):
            client.delete(key)
    finally:
        client.close()
    assert _row(collect_status(settings), "1002:3000")["backlog"] == 2


def test_drained_queue_shows_zero_and_other_queues_listed(redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path)
    _send(settings, "1003:1003", 1)
    _send(settings, "celery", 1)  # not an identity queue: listed apart
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete("1003:1003")
    finally:
        client.close()
    status = collect_status(settings)
    assert _row(status, "1003:1003")["backlog"] == 0
    assert [(r["queue"], r["backlog"]) for r in status["other_queues"]] == [("celery", 1)]


def test_registry_entries_are_shown(redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(keys.WORKERS, "1000:1000", json.dumps({"pid": 4242, "epoch": 7}))
    finally:
        client.close()
    status = collect_status(settings)
    workers = status["workers"]
    assert workers["source"] == "registry"
    assert workers["registry"][0]["member"] == "1000:1000"
    assert "4242" in format_status(status)


def test_every_hosts_workers_are_shown(redis_url: str, tmp_path: Path) -> None:
    """Several hosts: each host's worker of an identity, from its heartbeat."""
    settings = _settings(redis_url, tmp_path)
    _send(settings, "1000:1000", 1)
    beats = [
        Heartbeat(redis_url, Identity(1000, 1000), host, f"is_1000_1000@{host}", lambda: ["t1"])
        for host in ("beamline-a", "beamline-b")
    ]
    for beat in beats:
        beat.start()
    try:
        status = collect_status(settings)
    finally:
        for beat in beats:
            beat.stop()
    assert [(r["host"], r["running"]) for r in status["hosts"]] == [
        ("beamline-a", 1), ("beamline-b", 1)
    ]  # fmt: skip
    assert _row(status, "1000:1000")["hosts"] == ["beamline-a", "beamline-b"]
    text = format_status(status)
    assert "is_1000_1000@beamline-a" in text and "is_1000_1000@beamline-b" in text
    assert collect_status(settings)["hosts"] == []  # stopped: gone at once


def test_unreachable_broker_is_reported_not_raised(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    status = collect_status(_settings(url, tmp_path))
    assert "broker unreachable" in status["error"]
    text = format_status(status)
    assert "error: broker unreachable" in text
    assert "hunter2" not in text  # the password never reaches the screen


def test_no_broker_configured(tmp_path: Path) -> None:
    status = collect_status(Settings(supervisor_socket=str(tmp_path / "none")))
    assert "IS_REDIS_URL" in status["error"]


def test_main_prints_json(
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IS_REDIS_URL", redis_url)
    monkeypatch.setenv("IS_SUPERVISOR_SOCKET", str(tmp_path / "none.sock"))
    reset_settings()
    _send(_settings(redis_url, tmp_path), "1000:1000", 1)
    assert main(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queues"][0]["queue"] == "1000:1000"
    assert printed["queues"][0]["by_priority"] == {"0": 1}


@pytest.fixture
def supervisor(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A real supervisor (``python -m queues.supervisor``) on a private socket."""
    pytest.importorskip("queues.supervisor")
    sock = tmp_path / "supervisor.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env.update(IS_REDIS_URL=redis_url, IS_TASK_SECRET=os.urandom(16).hex())
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "queues.supervisor", "--socket", str(sock)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"supervisor did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield str(sock)
    finally:
        terminate(proc)


@pytest.mark.slow
def test_live_workers_from_the_supervisor(redis_url: str, tmp_path: Path, supervisor: str) -> None:
    from queues.pool import SupervisorClient

    settings = Settings(redis_url=redis_url, supervisor_socket=supervisor)
    _send(settings, "1005:1005", 1)  # waits: its identity has no worker
    _send(settings, "1000:1000", 1)  # declared before its worker starts: no race
    client = SupervisorClient(settings)
    try:
        client.ensure(Identity(1000, 1000))
    finally:
        client.close()
    status = collect_status(settings)
    workers = status["workers"]
    assert workers["source"] == "supervisor"
    assert [w["queue"] for w in workers["supervisor"]["workers"]] == ["1000:1000"]
    assert _row(status, "1000:1000")["worker"] in ("running", "starting")
    assert _row(status, "1005:1005")["worker"] == "none"
    assert _row(status, "1005:1005")["backlog"] == 1
    text = format_status(status)
    assert "workers (supervisor):" in text and "1 worker(s)" in text
