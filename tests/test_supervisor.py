"""Supervisor lifecycle against real processes: start on demand, idempotent ensure,
death noticed and restarted, idle reaping, the LRU cap, refusals, clean shutdown.

These run as any user: as root the workers switch to the numeric test identities, as a
normal user they run as that user (single-user mode, tested explicitly at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from bridge.dispatch import CeleryDispatcher
from istasks.errors import IdentityError, WorkerUnavailable
from istasks.settings import Settings
from queues.envelope import seal
from queues.naming import Identity
from queues.pool import SupervisorClient
from tests.supervisor_harness import (
    PROJECT,
    ROOT,
    SECRET,
    Account,
    SupervisorProcess,
    children,
    create_accounts,
    probe,
    probe_app,
    proc_status,
    process_gone,
    remove_accounts,
    running_supervisor,
    shared_tempdir,
    wait_for,
)

A = Identity(5001, 6001)
B = Identity(5002, 6002)
C = Identity(5003, 6003)
#: Identities whose tasks must reach one particular supervisor's worker: no other
#: supervisor of this module (the shared one lives on) ever consumes their queues.
D = Identity(5004, 6004)
E = Identity(5005, 6005)


@pytest.fixture(scope="module")
def supervisor(redis_server: str) -> Iterator[SupervisorProcess]:
    """One supervisor shared by the tests that do not change its settings."""
    env = {"IS_UID_MAX": "60000", "IS_GID_MIN": "2000"}
    with running_supervisor(redis_server, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def app(redis_server: str) -> Celery:
    """Admin-side Celery app sending probe tasks."""
    return probe_app(redis_server)


def test_first_ensure_starts_a_worker_that_serves_its_queue(
    supervisor: SupervisorProcess, app: Celery
) -> None:
    epoch = supervisor.client.ensure(A)
    me = probe(app, A, "probe.whoami")
    assert me["pid"] == supervisor.pids()[A.queue]
    assert supervisor.client.epoch(A) == epoch
    assert f"worker start queue={A.queue} pid={me['pid']}" in supervisor.log()


def test_ensure_is_idempotent(supervisor: SupervisorProcess) -> None:
    first = supervisor.client.ensure(A)
    other_client = SupervisorClient(Settings(), socket_path=supervisor.socket_path)
    try:
        assert [other_client.ensure(A) for _ in range(5)] == [first] * 5
    finally:
        other_client.close()
    workers = [w for w in supervisor.client.status()["workers"] if w["queue"] == A.queue]
    assert len(workers) == 1 and workers[0]["state"] == "running"
    assert supervisor.log().count(f"worker start queue={A.queue} ") == 1
    if ROOT:  # one process in the whole system runs as A's uid
        assert _processes_of_uid(A.uid) == [workers[0]["pid"]]


def _processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not process_gone(int(entry)):
            try:
                if proc_status(int(entry))["Uid"].split()[0] == str(uid):
                    found.append(int(entry))
            except (FileNotFoundError, KeyError):
                continue
    return found


def test_killed_worker_is_noticed_and_restarted(supervisor: SupervisorProcess, app: Celery) -> None:
    old_epoch = supervisor.client.ensure(B)
    old_pid = supervisor.pids()[B.queue]
    os.kill(old_pid, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: supervisor.client.epoch(B) is None, 2.0, "epoch None after SIGKILL")
    assert time.monotonic() - started < 2.0
    assert f"worker death queue={B.queue} pid={old_pid}" in supervisor.log()
    assert "signal 9 (SIGKILL)" in supervisor.log()
    new_epoch = supervisor.client.ensure(B)
    assert new_epoch != old_epoch
    assert probe(app, B, "probe.whoami")["pid"] != old_pid


def test_cached_epoch_until_forgotten(supervisor: SupervisorProcess) -> None:
    client = SupervisorClient(Settings(), socket_path=supervisor.socket_path, cache_ttl_s=60)
    try:
        epoch = client.ensure(C)
        os.kill(supervisor.pids()[C.queue], signal.SIGKILL)
        wait_for(lambda: supervisor.client.epoch(C) is None, 2.0, "death")
        assert client.epoch(C) == epoch  # served from the cache, no round trip
        client.forget(C)
        assert client.epoch(C) is None
    finally:
        client.close()


def test_a_death_is_noticed_before_any_later_answer(supervisor: SupervisorProcess) -> None:
    """Asked the moment a killed worker has exited, the supervisor never names it live,
    and lists it as gone, with when it noticed (on our clock), for the bridge to tell
    the requests it could have taken (issue 19)."""
    client = SupervisorClient(Settings(), socket_path=supervisor.socket_path, cache_ttl_s=0)
    try:
        for _ in range(10):
            epoch = client.ensure(C)
            pid = supervisor.pids()[C.queue]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while not process_gone(pid):  # no sleep: ask the moment it has exited
                assert time.monotonic() - killed < 5.0, "the killed worker still runs"
            state = client.state(C)
            assert state.epoch is None
            (gone,) = [g for g in state.gone if g.epoch == epoch]
            assert gone.at_s is not None and killed <= gone.at_s <= time.monotonic()
            assert client.ensure(C) not in {g.epoch for g in state.gone}
    finally:
        client.close()


@contextlib.contextmanager
def _dispatcher(redis_server: str, supervisor: SupervisorProcess) -> Iterator[CeleryDispatcher]:
    """The bridge's dispatcher with this supervisor's pool."""
    settings = Settings(redis_url=redis_server, task_secret=SECRET, view_timeout_s=30)
    client = SupervisorClient(settings, socket_path=supervisor.socket_path)
    dispatcher = CeleryDispatcher(probe_app(redis_server), settings, client)
    try:
        yield dispatcher
    finally:
        dispatcher.close()
        client.close()


def test_view_in_flight_is_served_by_the_next_worker_when_its_worker_dies(
    supervisor: SupervisorProcess, redis_server: str
) -> None:
    """A view is idempotent: when its worker dies mid-task, it is sent again to the new
    worker, and the client gets the view within 5 s of the death (issue 19)."""
    marks = shared_tempdir()
    os.chmod(marks, 0o1777)  # the worker runs as A
    started = os.path.join(marks, "started")
    try:
        with _dispatcher(redis_server, supervisor) as dispatcher:
            job = {"type": "jpeg", "sleep_s": 20, "sleep_once": started}
            future = dispatcher.submit(A, "jpeg", job, "rid-again")
            wait_for(lambda: os.path.exists(started), 10.0, "the view to run")
            os.kill(supervisor.pids()[A.queue], signal.SIGKILL)
            killed = time.monotonic()
            frames = future.result(timeout=10)
        assert time.monotonic() - killed < 5.0
        assert frames == [b"", b"{}", b"{}", b"\xff\xd8"]
    finally:
        shutil.rmtree(marks, ignore_errors=True)


def test_request_in_flight_fails_fast_when_its_worker_dies(
    supervisor: SupervisorProcess, redis_server: str
) -> None:
    """The view is sent again once; when the new worker dies too, the one error comes
    within 5 s of that death."""
    with _dispatcher(redis_server, supervisor) as dispatcher:
        future = dispatcher.submit(A, "jpeg", {"type": "jpeg", "sleep_s": 20}, "rid-1")
        time.sleep(1.0)  # the task is running
        first = supervisor.pids()[A.queue]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: supervisor.pids().get(A.queue) not in {None, first}, 5.0, "a new worker")
        time.sleep(1.0)  # the view sent again is running there
        os.kill(supervisor.pids()[A.queue], signal.SIGKILL)
        killed = time.monotonic()
        frames = future.result(timeout=10)
    assert time.monotonic() - killed < 5.0
    assert frames == [b"bridge: worker for 5001:6001 died while serving jpeg (request rid-1)"]


@pytest.mark.parametrize(
    ("identity", "reason"),
    [
        (Identity(0, 6001), "uid 0"),
        (Identity(5001, 0), "gid 0"),
        (Identity(999, 6001), "uid 999 is outside"),
        (Identity(60001, 6001), "uid 60001 is outside"),
        (Identity(5001, 1999), "gid 1999 is outside"),
    ],
)
def test_refused_identities(supervisor: SupervisorProcess, identity: Identity, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        supervisor.client.ensure(identity)
    assert identity.queue not in supervisor.pids()


def test_protocol_errors_get_an_answer(supervisor: SupervisorProcess) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(supervisor.socket_path)
        reader = sock.makefile("rb")
        for line in (b"not json\n", b'{"op": "nope", "uid": 5001, "gid": 6001}\n', b"[1]\n"):
            sock.sendall(line)
            reply = json.loads(reader.readline())
            assert reply["ok"] is False and reply["error"]
        sock.sendall(b'{"op": "status"}\n')
        assert json.loads(reader.readline())["ok"] is True


def test_client_without_supervisor() -> None:
    client = SupervisorClient(Settings(), socket_path="/nonexistent/is/supervisor.sock")
    assert client.epoch(A) is None
    with pytest.raises(WorkerUnavailable, match="supervisor unreachable"):
        client.ensure(A)


def test_idle_workers_are_reaped(redis_server: str) -> None:
    with running_supervisor(redis_server, env={"IS_WORKER_IDLE_S": "1"}) as sup:
        sup.client.ensure(A)
        pid = sup.pids()[A.queue]
        wait_for(lambda: not sup.client.status()["workers"], 10, "idle reaping")
        assert process_gone(pid)
        assert f"worker reap queue={A.queue} pid={pid}" in sup.log()
        assert "reason=idle status=exit 0" in sup.log()


def test_cap_stops_least_recently_used_idle_worker(redis_server: str) -> None:
    env = {"IS_WORKER_MAX": "2"}
    with running_supervisor(redis_server, env=env, args=("--busy-s", "0.5")) as sup:
        sup.client.ensure(A)
        sup.client.ensure(B)
        time.sleep(0.6)
        sup.client.ensure(A)  # A used again: B is now the least recently used
        evicted = sup.pids()[B.queue]
        sup.client.ensure(C)
        running = {w["queue"] for w in sup.client.status()["workers"] if w["state"] == "running"}
        assert running == {A.queue, C.queue}
        assert f"worker stop queue={B.queue} pid={evicted} uid={B.uid} gid={B.gid} reason=lru" in (
            sup.log()
        )
        wait_for(lambda: process_gone(evicted), 10, "the evicted worker to exit")


def test_cap_refuses_when_every_worker_is_busy(redis_server: str) -> None:
    with running_supervisor(redis_server, env={"IS_WORKER_MAX": "1"}) as sup:
        sup.client.ensure(A)
        with pytest.raises(WorkerUnavailable, match="busy"):
            sup.client.ensure(B)


def test_sigterm_stops_every_worker(redis_server: str) -> None:
    sup = SupervisorProcess(redis_server)
    sup.client.ensure(A)
    sup.client.ensure(B)
    workers = list(sup.pids().values())
    pids = children(sup.process.pid)  # the zygote and the workers (re-parented to it)
    assert set(workers) < set(pids)
    assert sup.stop(signal.SIGTERM) == 0
    assert all(process_gone(pid) for pid in pids)
    assert "supervisor down, 0 worker(s) left unreaped" in sup.log()
    assert not os.path.exists(sup.socket_path)


def test_worker_stuck_in_a_task_is_killed_after_the_grace_period(
    redis_server: str, app: Celery
) -> None:
    sup = SupervisorProcess(redis_server)  # --grace-s 3
    sup.client.ensure(D)
    pid = sup.pids()[D.queue]
    token = seal(SECRET.encode(), D.queue, {"job": {"sleep_s": 60}, "rid": "stuck"})
    app.send_task("is.jpeg", args=[token], queue=D.queue)
    time.sleep(1.0)  # the task is running; Celery's warm shutdown would wait for it
    stopping = time.monotonic()
    assert sup.stop(signal.SIGTERM) == 0
    assert time.monotonic() - stopping < 10
    assert process_gone(pid)
    assert f"worker kill queue={D.queue} pid={pid}" in sup.log()
    assert "reason=shutdown status=signal 9 (SIGKILL)" in sup.log()


def test_dead_zygote_is_restarted(redis_server: str) -> None:
    with running_supervisor(redis_server) as sup:
        sup.client.ensure(A)
        (zygote,) = set(children(sup.process.pid)) - set(sup.pids().values())
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: f"zygote pid={zygote} died" in sup.log(), 5, "the zygote's death")
        sup.client.ensure(B)
        assert B.queue in sup.pids()
        assert sup.client.epoch(A) is not None  # running workers do not need the zygote


def test_worker_that_cannot_start_gives_a_clear_error(redis_server: str) -> None:
    with running_supervisor(redis_server, entry="tests.no_such_module:serve") as sup:
        with pytest.raises(WorkerUnavailable, match=r"No module named 'tests\.no_such_module'"):
            sup.client.ensure(A)
        assert sup.client.epoch(A) is None
        assert "worker start failed queue=5001:6001" in sup.log()


def test_worker_that_never_consumes_is_stopped(redis_server: str) -> None:
    entry = "tests.supervisor_worker:serve_never_ready"
    env = {"IS_WORKER_START_TIMEOUT_S": "1"}
    with running_supervisor(redis_server, entry=entry, env=env) as sup:
        epoch = sup.client.ensure(D)  # the process started and dropped privileges ...
        assert sup.client.epoch(D) == epoch
        pid = sup.pids()[D.queue]
        # ... but a request sent to it would hang: it is stopped, its epoch goes
        wait_for(lambda: sup.client.epoch(D) is None, 5, "the stuck worker to be stopped")
        assert "reason=not consuming its queue in time" in sup.log()
        wait_for(lambda: process_gone(pid), 10, "the stuck worker to exit")


def test_workers_die_with_a_killed_supervisor(redis_server: str) -> None:
    sup = SupervisorProcess(redis_server)
    sup.client.ensure(A)
    pid = sup.pids()[A.queue]
    sup.stop(signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 15, "the orphaned worker to exit (PDEATHSIG)")


# -- single-user mode ----------------------------------------------------------------


def _python_for(account: Account) -> str | None:
    """An interpreter the account may run (the venv's may live under root's 0700 home)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe_run = [candidate, "-c", "import queues.supervisor, tests.supervisor_worker"]
        try:
            done = subprocess.run(
                probe_run, check=False, user=account.uid, group=account.gid, extra_groups=[],
                env={"PYTHONPATH": _site_path()}, cwd=PROJECT, capture_output=True, timeout=60,
            )  # fmt: skip
        except OSError:
            continue
        if done.returncode == 0:
            return candidate
    return None


def _site_path() -> str:
    return os.pathsep.join([str(PROJECT), sysconfig.get_paths()["purelib"]])


@pytest.fixture(scope="module")
def plain_user() -> Iterator[Account | None]:
    """As root, a throw-away account to run the supervisor without privileges."""
    if not ROOT:
        yield None
        return
    accounts = create_accounts(1)
    try:
        yield accounts[0]
    finally:
        remove_accounts(accounts)


def test_single_user_mode_runs_workers_as_the_invoking_user(
    redis_server: str, app: Celery, plain_user: Account | None
) -> None:
    kwargs: dict[str, object] = {}
    expected_uid = os.getuid()
    if plain_user is not None:
        python = _python_for(plain_user)
        if python is None:
            pytest.skip("no Python the unprivileged test user can run with our packages")
        kwargs = {"python": python, "user": plain_user, "env": {"PYTHONPATH": _site_path()}}
        expected_uid = plain_user.uid
    with running_supervisor(redis_server, **kwargs) as sup:
        sup.client.ensure(E)
        me = probe(app, E, "probe.whoami")
        assert me["ids"][0] == [expected_uid] * 3
        assert sup.client.status()["mode"] == "single-user"
        log = sup.log()
    assert f"not root: every worker runs as uid={expected_uid}" in log
    assert log.count("not root:") == 1


PRELOAD_THEN_WORK = """
import sys
from pathlib import Path
import numpy as np
import tifffile
from ops.testdata.cbf import write_cbf
from ops.testdata.eiger import write_eiger
from ops.testdata.marccd import write_marccd

data = Path(sys.argv[1])
files = [write_eiger(data, "e", nimages=1, frames_per_file=1, shape=(64, 66)),
         write_cbf(data / "p.cbf", shape=(64, 66)), write_marccd(data / "m.mccd", size=64)]
files.append(data / "t.tif")
tifffile.imwrite(files[-1], np.ones((64, 64), np.uint16))

from queues import forkserver
forkserver._preload(forkserver.PRELOAD)

class NoMoreImports:
    # What a worker meets after dropping privileges where it cannot read the installed
    # packages (a checkout or Python in a 0700 directory): nothing new can be imported.
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"not preloaded: {name}")

sys.meta_path.insert(0, NoMoreImports())
from istasks.app import create_app
from istasks.core.params import ContrastParams, LabelParams, ViewParams
from istasks.core.readers import open_reader
from istasks.core.view import reduce_frame, render_blank, render_jpeg
from istasks.settings import Settings
from istasks.worker import WakingThreadPool
from queues.naming import Identity

identity = Identity(4001, 5001)
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", task_secret="x"), identity)
app.Worker(hostname="is_4001_5001@test", queues=[identity.queue, identity.prefetch_queue],
           pool_cls=WakingThreadPool, concurrency=1, quiet=True,
           without_mingle=True, without_gossip=True)
label = LabelParams(text="x_1", height=16)
for path in files:
    reader = open_reader(str(path))
    reduced = reduce_frame(reader.read_frame(1), ViewParams(frame=1, xsize=32))
    render_jpeg(reduced, ContrastParams(), label)
    reader.close()
render_blank(64, label)
print("served")
"""


def test_preload_covers_what_a_worker_imports(tmp_path: Path) -> None:
    """Everything a worker imports after setuid must be in the fork server's preload: a
    worker that cannot read the installed packages (checkout or Python in a 0700
    directory) died at start when Celery's bootsteps celery.app.log and the consumer's
    delayed_delivery were missing, and failed views with labels (PIL.ImageFile). Here a
    worker is built and every reader format is reduced and rendered with a label after
    the preload, with every further import refused."""
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD_THEN_WORK, str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "served", done.stderr[-3000:]
