"""``isctl flower``: refuses to run unauthenticated, and the real Flower it starts
answers its API only with the configured credentials and sees a real worker."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from istasks.app import create_app
from istasks.settings import Settings, reset_settings
from ops.flower import MAX_TASKS, FlowerOptions, flower_argv, flower_env, main
from ops.redisserver import free_port
from ops.stack import Stack
from ops.status import collect_status
from queues.naming import Identity
from queues.pool import SupervisorClient
from tests.processes import terminate

AUTH = "admin:correct-horse"
PROJECT = Path(__file__).resolve().parent.parent


# -- configuration rules (no server needed) ---------------------------------------------


def test_argv_caps_memory_and_keeps_credentials_off_the_command_line() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", flower_basic_auth=AUTH)
    argv = flower_argv(settings, FlowerOptions(port=5999))
    assert argv[0] == "flower"
    assert f"--max_tasks={MAX_TASKS}" in argv and MAX_TASKS <= 10000
    assert "--address=127.0.0.1" in argv and "--port=5999" in argv
    assert f"--conf={os.devnull}" in argv  # never a flowerconfig.py from the cwd
    assert not any("correct-horse" in arg for arg in argv)
    assert "--read_only=True" not in argv
    env = flower_env(settings, {"FLOWER_UNAUTHENTICATED_API": "true", "PATH": "/bin"})
    assert env == {"FLOWER_BASIC_AUTH": AUTH, "PATH": "/bin"}


def test_unauthenticated_is_local_and_read_only() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    argv = flower_argv(settings, FlowerOptions(port=5999, unauthenticated=True))
    assert "--read_only=True" in argv
    assert flower_env(settings, {"FLOWER_BASIC_AUTH": "x:y"}) == {
        "FLOWER_UNAUTHENTICATED_API": "true"
    }
    with pytest.raises(ValueError, match="loopback"):
        flower_argv(settings, FlowerOptions(port=5999, address="0.0.0.0", unauthenticated=True))


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"IS_REDIS_URL": "redis://127.0.0.1:1/0"}, [], "without authentication"),
        ({"IS_REDIS_URL": "redis://127.0.0.1:1/0", "IS_FLOWER_BASIC_AUTH": "admin"}, [], "user:"),
        ({"IS_FLOWER_BASIC_AUTH": AUTH}, [], "no broker"),
        ({"IS_REDIS_URL": "redis://x:1/0"}, ["--unauthenticated", "--address", "::"], "loopback"),
    ],
)
def test_main_refuses_unsafe_configuration(
    env: dict[str, str],
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    assert main(args) == 2
    assert message in capsys.readouterr().err


# -- a real Flower -----------------------------------------------------------------------


def _get(url: str, auth: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _child_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IS_", "FLOWER_"))}
    env.update(IS_REDIS_URL=redis_url, **extra)
    return env


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        terminate(proc)


@contextmanager
def _flower(
    redis_url: str, tmp_path: Path, *args: str, auth: str | None = AUTH
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m ops.flower`` on a free port; its base URL once /healthcheck answers."""
    port = free_port()
    extra = {"IS_FLOWER_PORT": str(port)}
    if auth:
        extra["IS_FLOWER_BASIC_AUTH"] = auth
    log = tmp_path / "flower.log"
    command = [sys.executable, "-m", "ops.flower", *args]
    with _process(command, _child_env(redis_url, **extra), log) as proc:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Flower did not come up:\n{log.read_text()}")
            try:
                if _get(base + "/healthcheck")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield base, proc


def test_api_needs_the_configured_credentials(redis_url: str, tmp_path: Path) -> None:
    with _flower(redis_url, tmp_path) as (base, proc):
        assert _get(base + "/healthcheck") == (200, b"OK")
        assert _get(base + "/api/workers")[0] == 401
        assert _get(base + "/api/workers", auth="admin:wrong")[0] == 401
        status, body = _get(base + "/api/workers", auth=AUTH)
        assert status == 200 and json.loads(body) == {}
        assert _get(base + "/", auth=AUTH)[0] == 200  # the dashboard itself
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"correct-horse" not in cmdline  # `ps` shows no password


def test_unauthenticated_dev_mode_opens_the_api_read_only(redis_url: str, tmp_path: Path) -> None:
    with _flower(redis_url, tmp_path, "--unauthenticated", auth=None) as (base, _):
        status, body = _get(base + "/api/workers")
        assert status == 200 and json.loads(body) == {}
        status, _ = _get(base + "/api/worker/shutdown/is_1_1@nowhere", method="POST")
        assert status == 403


@pytest.mark.slow
def test_sees_a_real_worker_but_not_idle_queues(redis_url: str, tmp_path: Path) -> None:
    if not Path(__file__).resolve().parent.parent.joinpath("istasks", "worker.py").exists():
        pytest.skip("istasks/worker.py not written yet")
    node = f"is_1000_1000@{socket.gethostname()}"
    worker_env = _child_env(redis_url, IS_TASK_SECRET=os.urandom(16).hex())
    worker_cmd = [sys.executable, "-m", "istasks.worker", "--queue", "1000:1000"]
    with (
        _process(worker_cmd, worker_env, tmp_path / "worker.log") as worker,
        _flower(redis_url, tmp_path) as (base, _),
    ):
        from istasks.app import create_app

        app = create_app(Settings(redis_url=redis_url))
        app.send_task("is.jpeg", args=["token"], queue="2000:2000")  # nobody consumes it
        app.close()
        deadline = time.monotonic() + 90
        workers: dict[str, object] = {}
        while node not in workers:
            if worker.poll() is not None or time.monotonic() > deadline:
                log = (tmp_path / "worker.log").read_text()
                pytest.fail(f"{node} not in Flower's workers {list(workers)}:\n{log}")
            time.sleep(0.5)
            workers = json.loads(_get(base + "/api/workers?refresh=1", auth=AUTH)[1])
        status, body = _get(base + "/api/queues/length", auth=AUTH)
        assert status == 200
        flower_queues = {q["name"] for q in json.loads(body)["active_queues"]}
        assert "1000:1000" in flower_queues
        # Flower's blind spot (field notes 3.7), which `isctl status` covers:
        assert "2000:2000" not in flower_queues
        rows = collect_status(Settings(redis_url=redis_url, supervisor_socket="/nonexistent"))
        backlog = {row["queue"]: row["backlog"] for row in rows["queues"]}
        assert backlog["2000:2000"] == 1
        # Workers send no task events of their own (IS_TASK_EVENTS off): Flower turns
        # them on while it watches, so the tasks the worker runs show in its task list.
        app = create_app(Settings(redis_url=redis_url))
        deadline = time.monotonic() + 30
        tasks: dict[str, dict[str, object]] = {}
        while not tasks:
            assert time.monotonic() < deadline, "Flower never saw a task of the worker"
            app.send_task("is.jpeg", args=["not an envelope"], queue="1000:1000")
            time.sleep(1.0)
            tasks = json.loads(_get(base + "/api/tasks?workername=" + node, auth=AUTH)[1])
        app.close()
        assert {task["name"] for task in tasks.values()} == {"is.jpeg"}


def _send_first_task(settings: Settings, pool: SupervisorClient, identity: Identity) -> str:
    """Start ``identity``'s worker and at once send it its first task; that task's id."""
    pool.ensure(identity)  # returns once the new worker consumes its queue
    task_id = f"first-{identity.uid}-{os.urandom(4).hex()}"
    app = create_app(settings, identity)  # its results are stored under its identity
    try:
        result = app.send_task(
            "is.jpeg", args=["not an envelope"], queue=identity.queue, task_id=task_id
        )
        value = result.get(timeout=30)  # refused (no envelope), but run by the worker
    finally:
        app.close()
    assert "envelope" in str(value)
    return task_id


def _flower_task(base: str, task_id: str, timeout_s: float = 15.0) -> dict[str, Any] | None:
    """The task as Flower's API knows it, once its events arrived (None: never)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = _get(f"{base}/api/task/info/{task_id}", auth=AUTH)
        if status == 200:
            task: dict[str, Any] = json.loads(body)
            if task.get("state") == "SUCCESS":
                return task
        time.sleep(0.25)
    return None


@pytest.mark.slow
def test_a_new_identitys_first_task_shows_in_flower(tmp_path: Path) -> None:
    """With Flower in the deployment, a worker started after Flower sends task events
    from its first task: Flower's own enable-events broadcast reaches it only up to 5 s
    later, and a user's first views are exactly those seconds."""
    port = free_port()
    settings = Settings(flower_basic_auth=AUTH, worker_idle_s=300)
    with Stack.start(tmp_path / "run", settings, flower_port=port) as stack:
        assert stack.env["IS_TASK_EVENTS"] == "true"  # isctl up --flower: Flower listens
        base = f"http://127.0.0.1:{port}"
        _wait_for_healthcheck(base)
        env_settings = Settings.from_env(stack.env)
        pool = SupervisorClient(env_settings)
        try:
            # Flower's event receiver is up once it shows a task of a first worker.
            first = Identity(61001, 61001)
            deadline = time.monotonic() + 60
            while _flower_task(base, _send_first_task(env_settings, pool, first), 2.0) is None:
                assert time.monotonic() < deadline, "Flower never showed a task"
                pool.forget(first)
            # Then a new identity: its worker starts now, after Flower.
            new = Identity(61002, 61002)
            task_id = _send_first_task(env_settings, pool, new)
            task = _flower_task(base, task_id)
        finally:
            pool.close()
    assert task is not None, "the new worker's first task never reached Flower"
    node = f"is_{new.uid}_{new.gid}@{socket.gethostname()}"
    assert (task["name"], task["worker"]) == ("is.jpeg", node)
    assert task["received"] and task["started"] and task["succeeded"]  # all its events


def _wait_for_healthcheck(base: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _get(base + "/healthcheck")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "Flower did not come up"
        time.sleep(0.2)


def test_flower_deployments_enable_task_events() -> None:
    """The env template and compose run Flower, so their workers send task events."""
    env_lines = (PROJECT / "ops" / "is.env").read_text().splitlines()
    assert "IS_TASK_EVENTS=true" in env_lines
    compose = yaml.safe_load((PROJECT / "compose.yaml").read_text())
    assert "flower" in compose["services"]
    assert compose["x-is-env"]["IS_TASK_EVENTS"] == "true"
    assert compose["services"]["supervisor"]["environment"]["IS_TASK_EVENTS"] == "true"
    assert Settings().task_events is False  # where nobody listens, off


@pytest.mark.slow
def test_sees_every_hosts_worker_of_one_identity(redis_url: str, tmp_path: Path) -> None:
    """Several hosts on one broker (issue 14): Flower lists each host's worker of the
    identity under its own name, ``is_<uid>_<gid>@<host>``."""
    secret = os.urandom(16).hex()
    nodes = {host: f"is_1000_1000@{host}" for host in ("beamline-a", "beamline-b")}
    cmd = [sys.executable, "-m", "istasks.worker", "--queue", "1000:1000"]
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(
                _process(cmd, _child_env(redis_url, IS_TASK_SECRET=secret, IS_HOST_NAME=host),
                         tmp_path / f"worker-{host}.log")
            )
            for host in nodes
        ]  # fmt: skip
        base, _ = stack.enter_context(_flower(redis_url, tmp_path))
        deadline = time.monotonic() + 90
        seen: dict[str, object] = {}
        while not set(nodes.values()) <= set(seen):
            dead = [w for w in workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"Flower's workers {list(seen)}, wanted {list(nodes.values())}")
            time.sleep(0.5)
            seen = json.loads(_get(base + "/api/workers?refresh=1", auth=AUTH)[1])
