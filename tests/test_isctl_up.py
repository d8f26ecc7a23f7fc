"""``make run`` = ``isctl up``: it starts the service, prints one command that fetches a
view the way is.js does, and stops everything (its Redis too) on Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from bridge.proxy import Proxy
from istasks.settings import Settings
from ops.client import request
from ops.devsession import generate_keypair, isauth_for, sign_isauth, write_session
from ops.stack import Stack, StackConfigError, dev_user
from tests.wire_assert import assert_error_reply, assert_success_reply

pytestmark = pytest.mark.slow

ISCTL = [sys.executable, "-c", "import sys; from ops.cli import main; sys.exit(main())"]


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_the_printed_command_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    up = subprocess.Popen(
        [*ISCTL, "up", "--run-dir", str(tmp_path / "run")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert up.stdout is not None
    command = viewer = ""
    deadline = time.monotonic() + 60
    while not command and time.monotonic() < deadline:
        line = up.stdout.readline()
        assert line, "isctl up exited before printing the fetch command"
        if " get --endpoint " in line:
            command = line.strip()
        if "viewer (dev session) on " in line:
            viewer = line.split(" on ", 1)[1].strip()
    children = _children_of(up.pid)
    assert len(children) >= 4  # redis-server, supervisor, bridge, gateway
    _open_the_printed_viewer(viewer)
    argv = shlex.split(command)
    argv[-1] = str(tmp_path / "view.jpg")  # the -o target
    got = subprocess.run(
        [*ISCTL, *argv[1:]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("job: {") and '"wval_used"' in got.stdout
    image = Image.open(io.BytesIO((tmp_path / "view.jpg").read_bytes()))
    assert image.size == (1024, 1024)
    up.send_signal(signal.SIGINT)
    up.send_signal(signal.SIGINT)  # impatient users press it twice
    assert up.wait(timeout=30) == 0
    up.stdout.close()
    time.sleep(0.5)
    assert [pid for pid in children if _alive(pid)] == []


def _open_the_printed_viewer(url: str) -> None:
    """The viewer URL isctl up prints works as a browser uses it: page, then the pid of
    the fragment traded for the session cookie, then a view of the demo dataset."""
    base, _, fragment = url.partition("/#")
    given = dict(urllib.parse.parse_qsl(fragment))
    assert {"pid", "esaf", "fn"} <= set(given), url
    with httpx.Client(base_url=base, timeout=60) as browser:
        assert "viewer.js" in browser.get("/").text
        assert browser.post("/api/v1/session", json={"pid": given["pid"]}).status_code == 200
        view = browser.get(
            f"/api/v1/esaf/{given['esaf']}/view", params={"fn": given["fn"], "frame": 2}
        )
        assert view.status_code == 200 and view.headers["content-type"] == "image/jpeg"


# -- settings the user gave are honoured, never replaced by dev values ---------------------


def _clean_env(**given: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env.update(given)
    return env


def _up_lines(up: subprocess.Popen[str], until: str = "Ctrl-C stops everything") -> list[str]:
    """isctl up's output lines until ``until`` (it is then serving)."""
    assert up.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        assert line, "isctl up exited early:\n" + "".join(lines)
        lines.append(line)
        if until in line:
            return lines
    raise AssertionError("isctl up did not come up:\n" + "".join(lines))


def _stop(up: subprocess.Popen[str]) -> None:
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    assert up.stdout is not None
    up.stdout.close()


@pytest.fixture
def isctl_up(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Started ``isctl up`` processes, interrupted at the end if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for up in started:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=30)


def _start_up(
    started: list[subprocess.Popen[str]], run_dir: Path, env: dict[str, str]
) -> subprocess.Popen[str]:
    up = subprocess.Popen(
        [*ISCTL, "up", "--run-dir", str(run_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started.append(up)
    return up


def _field(lines: list[str], pattern: str) -> str:
    for line in lines:
        if match := re.search(pattern, line):
            return match[1]
    raise AssertionError(f"{pattern!r} not in:\n{''.join(lines)}")


def _sign_and_fetch(
    redis_url: str, private_pem: bytes, endpoint: str, master: str, pid: str
) -> list[bytes]:
    text, sig = sign_isauth(private_pem, isauth_for(pid, dev_user(), [0]))
    with redis.Redis.from_url(redis_url) as client:
        write_session(client, pid, text, sig)
    job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": master, "frame": 2, "xsize": 64}
    return request(endpoint, job, timeout_s=60)


def test_up_uses_the_users_session_key_and_prints_no_command_it_cannot_sign(
    tmp_path: Path, isctl_up: list[subprocess.Popen[str]]
) -> None:
    private, public = generate_keypair(tmp_path / "login-service")
    up = _start_up(isctl_up, tmp_path / "run", _clean_env(IS_SESSION_PUBLIC_KEY=str(public)))
    lines = _up_lines(up)
    output = "".join(lines)
    assert " get --endpoint " not in output  # no command that could only be refused
    assert f"IS_SESSION_PUBLIC_KEY={public}" in output and "cannot sign" in output
    endpoint = _field(lines, r"bridge (tcp://\S+),")
    redis_url = _field(lines, r"redis (redis://\S+),")
    master = _field(lines, r"demo dataset: (\S+) ")
    # The bridge trusts the user's key: a session signed with its private half is served,
    reply = _sign_and_fetch(redis_url, private.read_bytes(), endpoint, master, "login-1")
    assert json.loads(assert_success_reply(reply, 4)[1])["frame"] == 2
    # and one signed with the dev key isctl up would have made is refused.
    dev_private, _ = generate_keypair(tmp_path / "dev")
    reply = _sign_and_fetch(redis_url, dev_private.read_bytes(), endpoint, master, "dev-1")
    assert_error_reply(reply, "Process dev-1 is not authorized (4)")
    _stop(up)


def test_up_signs_with_the_run_dirs_key_when_it_is_the_users(
    tmp_path: Path, isctl_up: list[subprocess.Popen[str]]
) -> None:
    # IS_SESSION_PUBLIC_KEY pointing at the dev key pair of an earlier run: signable.
    _, public = generate_keypair(tmp_path / "run")
    up = _start_up(isctl_up, tmp_path / "run", _clean_env(IS_SESSION_PUBLIC_KEY=str(public)))
    command = next(line for line in _up_lines(up) if " get --endpoint " in line)
    argv = shlex.split(command)
    argv[-1] = str(tmp_path / "view.jpg")
    got = subprocess.run([*ISCTL, *argv[1:]], env=_clean_env(), capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert got.returncode == 0, got.stderr
    _stop(up)


def test_up_connects_the_bridge_to_the_users_proxy(
    tmp_path: Path, isctl_up: list[subprocess.Popen[str]]
) -> None:
    proxy = Proxy("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    proxy.start()
    try:
        env = _clean_env(IS_PROXY_ENDPOINT=proxy.backend)
        lines = _up_lines(_start_up(isctl_up, tmp_path / "run", env))
        output = "".join(lines)
        assert f"bridge connected to the is_proxy at {proxy.backend}" in output
        assert " get --endpoint " not in output  # isctl up cannot know the frontend
        pid = _field(lines, r"dev session (\S+) ")
        master = _field(lines, r"demo dataset (\S+)\. ")
        job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": master, "frame": 2, "xsize": 64}
        assert_success_reply(request(proxy.frontend, job, timeout_s=60), 4)
        _stop(isctl_up[0])
    finally:
        proxy.stop()


def test_up_refuses_a_proxy_and_a_bind_endpoint_together(tmp_path: Path) -> None:
    env = _clean_env(IS_PROXY_ENDPOINT="tcp://127.0.0.1:9", IS_BIND_ENDPOINT="tcp://127.0.0.1:*")
    done = subprocess.run([*ISCTL, "up", "--run-dir", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "IS_PROXY_ENDPOINT=tcp://127.0.0.1:9 and IS_BIND_ENDPOINT" in done.stderr
    assert "unset one" in done.stderr


def test_stack_refuses_its_own_proxy_over_the_users(tmp_path: Path) -> None:
    with pytest.raises(StackConfigError, match="starts its own is-proxy"):
        Stack.start(tmp_path, Settings(proxy_endpoint="tcp://127.0.0.1:9"), via_proxy=True)
    assert not any(tmp_path.iterdir())  # refused before anything was started or written


def test_stack_passes_the_users_settings_to_its_children(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "login-service")
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    settings = Settings(
        session_public_key=str(public),
        task_secret_file=str(secret),
        supervisor_socket=str(tmp_path / "sup.sock"),
        view_timeout_s=7.0,
    )
    with Stack.start(tmp_path / "run", settings, supervisor=False) as stack:
        assert stack.env["IS_SESSION_PUBLIC_KEY"] == str(public)
        assert stack.env["IS_TASK_SECRET_FILE"] == str(secret)
        assert stack.env["IS_SUPERVISOR_SOCKET"] == str(tmp_path / "sup.sock")
        assert stack.env["IS_VIEW_TIMEOUT_S"] == "7.0"
        assert not (tmp_path / "run" / "task-secret").exists()
        assert stack.signing_key is None
        with pytest.raises(StackConfigError, match="cannot sign a dev session"):
            stack.add_session([0])
