"""compose.yaml built and run on a real container engine, replayed like the service itself.

`make compose-check` runs this file (root, several minutes; not part of `make test`,
where it skips): scripts/compose-engine.sh has installed and started the engine and
scripts/compose-base.sh made the base images from the Debian mirror. Here, as an operator
would: the test accounts are created on the host first (the supervisor and the bridge see
the host's passwd and group files, bind-mounted at `up`), the compatibility kit's data is
written owned by the ESAF account, the images are built with the Compose tool, the stack
comes up under a project name of its own with every port on 127.0.0.1, and
``compare_golden.py --strict`` replays the golden replies through the bridge's published
port. From the host's /proc: the worker that served them runs as the user's UID and the
ESAF's GID with exactly that one group, no capability, no new privileges, inside the
supervisor's container, and sees the data through a read-only mount. Teardown leaves no
container, network or volume of the project (the images stay, as build cache).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ops.devsession import generate_keypair
from tests.compat_kit import COMPAT_DIR, replay, replay_cases, write_golden_data

if TYPE_CHECKING:
    from tests.accounts import Account, Accounts

pytest_plugins = ("tests.accounts",)

ROOT = Path(__file__).resolve().parent.parent
ENABLED = os.environ.get("IS_COMPOSE_CHECK") == "1"
BASE_IMAGE = os.environ.get("IS_BASE_IMAGE", "is-base:bookworm")
REDIS_IMAGE = os.environ.get("IS_REDIS_IMAGE", "is-redis:bookworm")
IS_GID = 999  # group "is" of the image (Dockerfile)
BUILD_TIMEOUT_S = 3600
HEALTH_TIMEOUT_S = 300
REPLAY_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.timeout(BUILD_TIMEOUT_S + HEALTH_TIMEOUT_S + REPLAY_TIMEOUT_S),
    pytest.mark.skipif(not ENABLED, reason="the compose deployment: `make compose-check`"),
]


def _compose_command() -> list[str]:
    """Debian's docker-compose (1.29), or the Compose plugin where a client has it."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if done.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no Compose tool: run scripts/compose-engine.sh")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


@dataclass
class Deployment:
    """A running compose project and what the replay needs to reach it."""

    project: str
    compose: list[str]
    env: dict[str, str]
    bridge_port: int
    flower_port: int
    redis_port: int
    flower_auth: str
    private_key: Path
    data: Path

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def container(self, service: str) -> dict[str, Any]:
        (cid,) = self.run("ps", "-q", service).stdout.split()
        info: dict[str, Any] = json.loads(_docker("inspect", cid))[0]
        return info

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = [
            *_docker("ps", "-aq", "--filter", label).split(),
            *_docker("network", "ls", "-q", "--filter", label).split(),
            *_docker("volume", "ls", "-q", "--filter", label).split(),
        ]
        return found


@pytest.fixture(scope="module")
def kit() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the compose check needs root (engine, accounts, setuid workers)")
    if not (COMPAT_DIR / "compare_golden.py").is_file():
        pytest.skip(f"no compatibility kit at {COMPAT_DIR}")
    for image in (BASE_IMAGE, REDIS_IMAGE):
        found = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        )
        if found.returncode:
            pytest.fail(f"no image {image}: run scripts/compose-base.sh")
    return COMPAT_DIR


@pytest.fixture(scope="module")
def identity(kit: Path, accounts: Accounts) -> tuple[Account, int, Account]:
    """(session user, esaf, ESAF account ``e<esaf>``), created on the host before `up`."""
    esaf, owner = accounts.esaf()
    return accounts.shared_user(), esaf, owner


@pytest.fixture(scope="module")
def deployment(
    kit: Path, identity: tuple[Account, int, Account], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    _, _, owner = identity
    top = tmp_path_factory.mktemp("compose")
    top.chmod(0o755)
    data = top / "data"
    write_golden_data(kit, data, owner.uid, owner.gid, REPLAY_TIMEOUT_S)
    secret_dir = top / "secrets"
    private_key, public_key = generate_keypair(top / "keys")
    secret_dir.mkdir()
    shutil.copy(public_key, secret_dir / "session-public.pem")
    (secret_dir / "task-secret").write_text(secrets.token_hex(32) + "\n")
    for name in ("session-public.pem", "task-secret"):  # root (supervisor) and group is
        os.chown(secret_dir / name, 0, IS_GID)
        os.chmod(secret_dir / name, 0o640)

    project = f"ischeck{secrets.token_hex(4)}"
    flower_auth = f"check:{secrets.token_hex(8)}"
    bridge_port, flower_port, redis_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IS_", "COMPOSE_", "PYTEST"))}
    env.update(
        COMPOSE_PROJECT_NAME=project,
        IS_BASE_IMAGE=BASE_IMAGE,
        IS_REDIS_IMAGE=REDIS_IMAGE,
        IS_DATA_DIR=str(data),
        IS_DATA_MOUNT=str(data),  # the replay names files by their host path, as is.js does
        IS_SECRETS_DIR=str(secret_dir),
        IS_BRIDGE_PORT=str(bridge_port),
        IS_FLOWER_HOST_PORT=str(flower_port),
        IS_GATEWAY_HOST_PORT=str(_free_port()),  # the gateway's, never a busy 8090
        IS_CHECK_REDIS_PORT=str(redis_port),
        IS_FLOWER_BASIC_AUTH=flower_auth,
        IS_SESSION_REDIS_URL="redis://redis-broker:6380/0",
    )
    compose = [*_compose_command(), "-f", "compose.yaml", "-f", "docker/compose.check.yaml"]
    deployment = Deployment(
        project, compose, env, bridge_port, flower_port, redis_port, flower_auth, private_key, data
    )
    try:
        built = deployment.run("build", timeout=BUILD_TIMEOUT_S)
        assert built.returncode == 0, (
            f"build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
        )
        up = deployment.run("up", "-d", "--no-build", timeout=HEALTH_TIMEOUT_S)
        assert up.returncode == 0, f"up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        _wait_healthy(deployment)
        yield deployment
    finally:
        if deployment.leftovers():  # a failure before test_teardown_leaves_nothing
            print(deployment.run("logs", "--no-color", "--tail", "60", timeout=120).stdout[-12000:])
            deployment.run("down", "--volumes", "--remove-orphans", "--timeout", "30")
        shutil.rmtree(top, ignore_errors=True)


def _wait_healthy(deployment: Deployment) -> None:
    services = ["redis-broker", "redis-cache", "supervisor", "bridge", "flower"]
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {s: deployment.container(s)["State"]["Health"]["Status"] for s in services}
        if all(state == "healthy" for state in states.values()):
            return
        time.sleep(2)
    logs = deployment.run("logs", "--no-color", "--tail", "40").stdout
    pytest.fail(f"not healthy after {HEALTH_TIMEOUT_S} s: {states}\n{logs[-6000:]}")


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _descendants(root: int) -> list[int]:
    """Every process under ``root`` (host pids), from each process's PPid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_status(int(entry.name))["PPid"])
            except (OSError, KeyError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_ports_are_published_on_loopback_only(deployment: Deployment) -> None:
    published = {}
    for service in ("redis-broker", "redis-cache", "supervisor", "bridge", "flower"):
        ports = deployment.container(service)["NetworkSettings"]["Ports"] or {}
        for bindings in ports.values():
            for binding in bindings or []:
                published[(service, int(binding["HostPort"]))] = binding["HostIp"]
    assert published == {
        ("bridge", deployment.bridge_port): "127.0.0.1",
        ("flower", deployment.flower_port): "127.0.0.1",
        ("redis-broker", deployment.redis_port): "127.0.0.1",  # the check's overlay only
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{deployment.flower_port}/api/workers",
        headers={"Authorization": "Basic " + b64encode(deployment.flower_auth.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{deployment.flower_port}/api/workers", timeout=10)
    refused.value.close()
    assert refused.value.code == 401


def test_golden_replay_and_worker_identity(
    kit: Path,
    deployment: Deployment,
    identity: tuple[Account, int, Account],
    tmp_path: Path,
) -> None:
    user, esaf, owner = identity
    report = tmp_path / "replay.json"
    done = replay(
        kit,
        endpoint=f"tcp://127.0.0.1:{deployment.bridge_port}",
        data=deployment.data,
        redis=f"127.0.0.1:{deployment.redis_port}",
        key=deployment.private_key,
        user=user.name,
        esaf=esaf,
        report=report,
        timeout_s=REPLAY_TIMEOUT_S,
    )
    print(done.stdout)
    cases = replay_cases(report)
    assert cases, f"the replay ran no case:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    failing = [c["id"] for c in cases if c.get("status") != "MATCH"]
    assert not failing, f"cases not MATCH: {failing}\n{done.stdout}"
    assert done.returncode == 0, f"replay failed:\n{done.stdout[-3000:]}"

    # The worker that served them, seen from the host (workers stay up for the idle time).
    supervisor = deployment.container("supervisor")
    under = _descendants(int(supervisor["State"]["Pid"]))
    workers = [pid for pid in under if _status(pid)["Uid"].split() == [str(user.uid)] * 4]
    assert workers, f"no process of uid {user.uid} under the supervisor's container"
    for pid in workers:
        status = _status(pid)
        assert status["Gid"].split() == [str(owner.gid)] * 4, status["Gid"]
        assert status["Groups"].split() == [str(owner.gid)], status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert supervisor["Id"] in Path(f"/proc/{pid}/cgroup").read_text()
        mounts = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
        (data,) = [m for m in mounts if m[4] == str(deployment.data)]
        assert "ro" in data[5].split(","), data
    # Everything else in that container is the supervisor's (root); one identity served.
    others = [p for p in under if p not in workers and _status(p)["Uid"].split()[0] != "0"]
    assert not others, [(p, _status(p)["Uid"]) for p in others]


def test_runtime_image_is_small_and_has_no_compiler(deployment: Deployment) -> None:
    image = deployment.container("bridge")["Config"]["Image"]
    found = _docker(
        "run", "--rm", "--entrypoint", "sh", image, "-c", "command -v cc gcc c++ make || true"
    )
    assert found.strip() == "", f"build tools in the runtime image: {found}"
    for name in (image, BASE_IMAGE, REDIS_IMAGE):
        size = int(_docker("image", "inspect", "--format", "{{.Size}}", name))
        print(f"image {name}: {size / 1e6:.0f} MB")
    assert int(_docker("image", "inspect", "--format", "{{.Size}}", image)) < 500e6


def test_teardown_leaves_nothing(deployment: Deployment) -> None:
    """Runs last (file order): the services' logs are clean, then down leaves no container,
    network or volume of the project."""
    logs = deployment.run("logs", "--no-color", timeout=120).stdout
    print(logs[-8000:])
    assert "Traceback" not in logs, logs[-8000:]
    down = deployment.run("down", "--volumes", "--remove-orphans", "--timeout", "30")
    assert down.returncode == 0, down.stderr
    assert deployment.leftovers() == []
