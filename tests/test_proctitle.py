"""What ``ps``, ``top`` and ``systemctl status`` show of the service's processes, read
from /proc and from the real ``ps`` of a stack started as ``isctl up`` starts it (real
supervisor, fork server, a worker forked for a request, bridge)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from istasks.app import create_app
from istasks.settings import Settings
from ops.client import request
from ops.prefetch import resolve_identity
from ops.stack import Stack, dev_user
from queues import proctitle
from queues.pool import SupervisorClient
from tests.wire_assert import assert_success_reply

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack.start(tmp_path_factory.mktemp("run"), Settings(worker_idle_s=300)) as running:
        yield running


def _cmdline(pid: int) -> str:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _ps(pid: int) -> str:
    if shutil.which("ps") is None:
        return _cmdline(pid)  # what ps would read
    args = ["ps", "-o", "args=", "-p", str(pid)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _component(stack: Stack, name: str) -> int:
    return next(c.process.pid for c in stack.components if c.name == name)


def test_every_process_says_what_it_is(stack: Stack) -> None:
    settings = Settings.from_env(stack.env)
    identity = resolve_identity(settings, 0, dev_user())
    pid = stack.add_session([0], user=dev_user())
    job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": "", "xsize": 64}
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)  # a worker served it
    client = SupervisorClient(settings)
    try:
        rows = client.status()["workers"]
    finally:
        client.close()
    worker = next(row["pid"] for row in rows if row["queue"] == identity.queue)
    node = f"is_{identity.uid}_{identity.gid}@{socket.gethostname()}"

    assert _ps(worker) == f"is-worker {node}" == proctitle.worker_title(node)
    assert _comm(worker) == f"is-worker {node}"[:15]  # top's COMMAND column
    supervisor = _component(stack, "supervisor")
    assert _ps(supervisor) == "is-supervisor"
    zygotes = [p for p in _children(supervisor) if _cmdline(p) == "is-forkserver"]
    assert len(zygotes) == 1, [_cmdline(p) for p in _children(supervisor)]
    assert worker in _children(supervisor)  # double-forked, re-parented to the supervisor
    assert _ps(_component(stack, "bridge")) == "is-bridge"
    # No Flower in this deployment: the worker was started without task events.
    assert _worker_conf(settings, node)["worker_send_task_events"] is False


def _worker_conf(settings: Settings, node: str) -> dict[str, Any]:
    """The worker's Celery configuration, asked over remote control as Flower asks."""
    app = create_app(settings)
    try:
        replies = app.control.inspect(destination=[node], timeout=10).conf(with_defaults=False)
    finally:
        app.close()
    assert replies and node in replies, f"no conf reply from {node}"
    conf: dict[str, Any] = replies[node]
    return conf
