"""Root only: workers really switch to the user's uid and the ESAF's gid, and the kernel,
not our code, keeps one ESAF's files from another's worker."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from ops.testdata.marccd import write_marccd
from queues.envelope import queue_key, seal
from queues.naming import Identity
from tests.supervisor_harness import (
    SECRET,
    Account,
    SupervisorProcess,
    create_accounts,
    identity_result,
    probe,
    probe_app,
    proc_status,
    remove_accounts,
    root_only,
    running_supervisor,
    shared_tempdir,
)

pytestmark = root_only


@pytest.fixture(scope="module")
def accounts() -> Iterator[list[Account]]:
    """Two users, each in its own ESAF group: A = accounts[0], B = accounts[1]."""
    created = create_accounts(2)
    try:
        yield created
    finally:
        remove_accounts(created)


@pytest.fixture(scope="module")
def data(accounts: list[Account]) -> Iterator[Path]:
    """A data root with one file per ESAF: mode 0640, group = the ESAF."""
    root = Path(shared_tempdir())
    for account in accounts:
        path = root / f"{account.group}.bin"
        path.write_bytes(b"frame data of " + account.group.encode())
        os.chown(path, 0, account.gid)
        path.chmod(0o640)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def supervisor(redis_server: str, data: Path) -> Iterator[SupervisorProcess]:
    """Supervisor running the probe worker, data root as the workers' cwd."""
    with running_supervisor(redis_server, env={"IS_DATA_ROOT": str(data)}) as running:
        yield running


@pytest.fixture(scope="module")
def app(redis_server: str) -> Celery:
    """Admin-side Celery app."""
    return probe_app(redis_server)


def test_worker_runs_exactly_as_its_identity(
    supervisor: SupervisorProcess, app: Celery, accounts: list[Account], data: Path
) -> None:
    a = accounts[0]
    supervisor.client.ensure(a.identity)
    pid = supervisor.pids()[a.identity.queue]
    status = proc_status(pid)  # read by us, from outside the worker
    assert status["Uid"].split() == [str(a.uid)] * 4  # real, effective, saved, filesystem
    assert status["Gid"].split() == [str(a.gid)] * 4
    assert status["Groups"].split() == [str(a.gid)]  # never root's groups
    me = probe(app, a.identity, "probe.whoami")
    assert me["pid"] == pid
    assert me["status"]["NoNewPrivs"] == "1" and me["status"]["Umask"] == "0027"
    assert me["cwd"] == str(data)
    assert me["env"]["USER"] == a.name and me["env"]["HOME"] == str(data)


def test_worker_gets_only_its_own_key_and_redis_user(
    supervisor: SupervisorProcess, app: Celery, accounts: list[Account]
) -> None:
    a = accounts[0]
    supervisor.client.ensure(a.identity)
    me = probe(app, a.identity, "probe.whoami")
    assert me["key"] == queue_key(SECRET.encode(), a.identity.queue).decode()
    env = me["env"]
    for secret in ("IS_TASK_SECRET", "IS_TASK_SECRET_FILE", "IS_REDIS_URL", "IS_QUEUE_KEY"):
        assert secret not in env
    assert SECRET not in json.dumps(env)
    assert env["IS_BROKER_URL"].startswith("redis://is_w_")
    assert f"redis://is_w_{a.uid}_{a.gid}%40" in env["IS_CACHE_URL"]  # ...@<host>.<hash>


def test_kernel_refuses_another_esafs_file(
    supervisor: SupervisorProcess, app: Celery, accounts: list[Account], data: Path
) -> None:
    a, b = accounts
    for account in accounts:
        supervisor.client.ensure(account.identity)
    a_file, b_file = (str(data / f"{x.group}.bin") for x in (a, b))
    assert probe(app, a.identity, "probe.read", a_file)["bytes"] > 0
    assert probe(app, b.identity, "probe.read", a_file) == {"errno": errno.EACCES}
    assert probe(app, b.identity, "probe.read", b_file)["bytes"] > 0
    # the user of A in another ESAF's worker (identity A-user:B-gid) reads B, not A
    mixed = Identity(a.uid, b.gid)
    supervisor.client.ensure(mixed)
    assert probe(app, mixed, "probe.read", a_file) == {"errno": errno.EACCES}
    assert probe(app, mixed, "probe.read", b_file)["bytes"] > 0


def test_real_worker_serves_only_its_esafs_images(
    redis_server: str, app: Celery, accounts: list[Account], data: Path
) -> None:
    a, b = accounts
    image = write_marccd(data / "a.tif", size=256)
    os.chown(image, 0, a.gid)
    image.chmod(0o640)
    job = {"type": "jpeg", "fn": str(image), "frame": 1, "xsize": 128, "tag": "t"}
    # uids no other test's worker consumes (any uid works: no passwd entry is needed)
    in_a, in_b = Identity(58001, a.gid), Identity(58002, b.gid)
    replies = {}
    with running_supervisor(redis_server, entry="istasks.worker:serve") as sup:
        for identity in (in_a, in_b):
            sup.client.ensure(identity)
            token = seal(SECRET.encode(), identity.queue, {"job": job, "rid": "r"})
            sent = app.send_task("is.jpeg", args=[token], queue=identity.queue)
            result = identity_result(app, identity, sent.id, 60)
            assert "frames" in result, result
            replies[identity] = result["frames"]
    job_a, _meta_a, jpeg_a = replies[in_a]
    assert "error" not in json.loads(job_a) and jpeg_a[:2] == b"\xff\xd8"
    job_b = json.loads(replies[in_b][0])
    assert "Permission denied" in job_b["error"]  # the blank fallback, and why


def _connect_as(account: Account, path: str) -> bytes:
    """Connect to ``path`` from a child switched to ``account``; what it read back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no imports beyond what is loaded; always _exit
        try:
            os.setgroups([account.gid])
            os.setgid(account.gid)
            os.setuid(account.uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(b'{"op": "status"}\n')
                answer = sock.recv(65536)
            os.write(write_end, b"answer:" + answer)
        except OSError as exc:
            os.write(write_end, f"error:{exc.errno}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        output = reader.read()
    os.waitpid(pid, 0)
    return output


def test_control_socket_admits_only_the_bridge_group(
    redis_server: str, accounts: list[Account]
) -> None:
    a, b = accounts
    with running_supervisor(redis_server, args=("--group", b.group)) as sup:
        run_dir = os.path.dirname(sup.socket_path)
        assert oct(os.stat(run_dir).st_mode & 0o777) == "0o750"
        assert oct(os.stat(sup.socket_path).st_mode & 0o777) == "0o660"
        assert _connect_as(b, sup.socket_path).startswith(b'answer:{"ok":true')
        assert _connect_as(a, sup.socket_path) == f"error:{errno.EACCES}".encode()
        # Even with the filesystem opened up by mistake, peer credentials keep A out.
        os.chmod(run_dir, 0o755)
        os.chmod(sup.socket_path, 0o666)
        hung_up = {b"answer:", *(f"error:{e}".encode() for e in (errno.ECONNRESET, errno.EPIPE))}
        assert _connect_as(a, sup.socket_path) in hung_up
        assert "refused control connection from pid=" in sup.log()
        assert f"uid={a.uid}" in sup.log()


def test_worker_starts_in_the_esaf_accounts_home(
    redis_server: str, app: Celery, accounts: list[Account]
) -> None:
    """Spec 3.5: the ESAF account (named like the ESAF's group) gives the directory."""
    top = shared_tempdir()
    home = Path(top) / "esaf"
    (esaf,) = create_accounts(1, first=9, home=str(home))
    try:
        home.mkdir(mode=0o750)
        os.chown(home, esaf.uid, esaf.gid)
        member = Identity(accounts[1].uid, esaf.gid)  # user B working in that ESAF
        with running_supervisor(redis_server) as sup:
            sup.client.ensure(member)
            assert probe(app, member, "probe.whoami")["cwd"] == str(home)
    finally:
        remove_accounts([esaf])
        shutil.rmtree(top)
