"""Helpers of the supervisor tests: test accounts, a supervisor process, probe tasks.

The supervisor always runs as its own process (``python -m queues.supervisor``), as users
start it: it installs signal handlers and becomes a child subreaper, which must not
happen to the pytest process.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from istasks.app import create_app
from istasks.settings import Settings
from queues.naming import Identity
from queues.pool import SupervisorClient
from tests.processes import wait_for

ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parent.parent
PROBE_ENTRY = "tests.supervisor_worker:serve"
SECRET = "supervisor-test-secret"
root_only = [
    pytest.mark.root,
    pytest.mark.skipif(not ROOT, reason="needs root (setuid workers)"),
]
_FIRST_ID = 59000


@dataclass(frozen=True)
class Account:
    """A test user whose primary group stands for one ESAF."""

    name: str
    uid: int
    group: str
    gid: int

    @property
    def identity(self) -> Identity:
        """The account's worker identity (its uid, its ESAF gid)."""
        return Identity(self.uid, self.gid)


def _free_id(start: int, taken: set[int]) -> int:
    candidate = start
    while candidate in taken:
        candidate += 1
    taken.add(candidate)
    return candidate


def _remove(name: str) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        subprocess.run(["userdel", name], check=True, capture_output=True)
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        subprocess.run(["groupdel", name], check=True, capture_output=True)


def create_accounts(count: int, *, first: int = 1, home: str = "/nonexistent") -> list[Account]:
    """``count`` users ``istsup_<n>``, each with its own primary group ``istsup_<n>``."""
    names = [f"istsup_{n}" for n in range(first, first + count)]
    for name in names:
        _remove(name)  # left over by an interrupted run
    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    accounts = []
    for name in names:
        gid = _free_id(_FIRST_ID, taken)
        uid = _free_id(_FIRST_ID, taken)
        subprocess.run(["groupadd", "-g", str(gid), name], check=True, capture_output=True)
        subprocess.run(
            ["useradd", "-M", "-N", "-u", str(uid), "-g", name, "-d", home,
             "-s", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )  # fmt: skip
        accounts.append(Account(name, uid, name, gid))
    return accounts


def remove_accounts(accounts: list[Account]) -> None:
    """Delete the test users and their groups."""
    for account in accounts:
        _remove(account.name)


def shared_tempdir() -> str:
    """A directory every test user may enter (pytest's tmp_path is 0700 under root)."""
    path = tempfile.mkdtemp(prefix="is-sup-")
    os.chmod(path, 0o755)
    return path


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:\tZ") for line in status)
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: reaped while we read
        return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc/<pid>/task/<pid>/children``)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def proc_status(pid: int) -> dict[str, str]:
    """The Uid, Gid and Groups lines of ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as status:
        lines = [line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line]
    return {k: v for k, v in lines if k in {"Uid", "Gid", "Groups"}}


class SupervisorProcess:
    """``python -m queues.supervisor`` on a private socket, with its log captured."""

    def __init__(
        self,
        redis_url: str,
        *,
        entry: str = PROBE_ENTRY,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        python: str = sys.executable,
        user: Account | None = None,
    ) -> None:
        self.dir = shared_tempdir()
        self.socket_path = os.path.join(self.dir, "run", "supervisor.sock")
        self.log_path = os.path.join(self.dir, "supervisor.log")
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(PROJECT),
            "IS_REDIS_URL": redis_url,
            "IS_TASK_SECRET": SECRET,
            "IS_LOG_LEVEL": "INFO",
            "IS_WORKER_CONCURRENCY": "2",
            **(env or {}),
        }
        argv = [python, "-m", "queues.supervisor", "--socket", self.socket_path,
                "--entry", entry, "--grace-s", "3", *args]  # fmt: skip
        self.user = user
        self._final_log: str | None = None
        if user is not None:
            os.chown(self.dir, user.uid, user.gid)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
                user=user.uid if user else None, group=user.gid if user else None,
                extra_groups=[] if user else None,
            )  # fmt: skip
        self.client = SupervisorClient(Settings(), socket_path=self.socket_path, cache_ttl_s=0)
        try:
            wait_for(self._answers, 60, f"the supervisor on {self.socket_path}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"supervisor exited {self.process.returncode}:\n{self.log()}")
        try:
            return bool(self.client.status()["ok"])
        except Exception:
            return False

    def log(self) -> str:
        """Everything the supervisor (and its workers) wrote so far."""
        if self._final_log is not None:
            return self._final_log
        return Path(self.log_path).read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """queue -> pid of every worker the supervisor reports."""
        return {w["queue"]: w["pid"] for w in self.client.status()["workers"]}

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the supervisor and wait for it; its exit status. Keeps the log in
        memory and removes the working directory."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            if self._final_log is None:
                self._final_log = self.log()
                shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_supervisor(redis_url: str, **kwargs: Any) -> Iterator[SupervisorProcess]:
    """A supervisor for the duration of a ``with`` block."""
    supervisor = SupervisorProcess(redis_url, **kwargs)
    try:
        yield supervisor
    finally:
        supervisor.stop()


def probe_app(redis_url: str) -> Celery:
    """An admin-side app that sends probe tasks and reads their results."""
    return create_app(Settings(redis_url=redis_url))


def probe(app: Celery, identity: Identity, task: str, *args: Any, timeout_s: float = 30) -> Any:
    """Run probe task ``task`` on the identity's worker and return its result (read
    under the identity's own result prefix, where its worker stores it)."""
    sent = app.send_task(task, args=list(args), queue=identity.queue)
    return identity_result(app, identity, sent.id, timeout_s)


def identity_result(app: Celery, identity: Identity, task_id: str, timeout_s: float) -> Any:
    """The result of task ``task_id`` as ``identity``'s worker stored it."""
    reader = create_app(Settings(redis_url=str(app.conf.result_backend)), identity)
    try:
        return reader.AsyncResult(task_id).get(timeout=timeout_s)
    finally:
        reader.close()
