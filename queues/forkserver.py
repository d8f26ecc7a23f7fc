"""Pre-loaded fork server ("zygote") that starts per-identity workers fast and clean.

A plain ``celery worker`` spends most of its ~650 ms start importing Celery, numpy and
h5py. The zygote is a separate, freshly exec'd process that imports all of that once and
then does nothing but fork. It never reads a secret, opens no broker connection and runs
one thread, so forking it is safe, and whatever a child inherits from its memory is just
code. Each worker is forked twice (zygote -> short-lived middle -> worker) so that it is
re-parented to the supervisor (a child subreaper), which then reaps it and sees its exit
status directly. The worker's settings, queue key and Redis credentials travel over a
private socketpair straight from the supervisor to the worker, never through the zygote.

In the worker, :func:`become` switches irrevocably to the identity before any work is
done (see :func:`drop_privileges` for why supplementary groups are exactly ``[gid]``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import grp
import importlib
import json
import logging
import os
import pkgutil
import pwd
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from queues import proctitle

log = logging.getLogger(__name__)

#: Modules the zygote imports once. Besides speed this matters for correctness: after a
#: worker drops privileges it may be unable to read the interpreter's own library (e.g.
#: a Python installed under a 0700 home), so everything a worker imports lazily must
#: already be loaded. Missing optional modules are logged and skipped.
PRELOAD: tuple[str, ...] = (
    # the worker and everything it serves ("pkg.*": every module of the package, so
    # readers imported on first use, like Eiger's, are loaded too)
    "istasks.worker", "istasks.tasks", "istasks.service", "istasks.cache",
    "istasks.app", "istasks.settings", "istasks.replies", "istasks.indexer", "istasks.logs",
    "istasks.core.*", "numpy", "h5py", "hdf5plugin", "msgpack",
    # Pillow draws the label banner; its font code imports these on first use
    "PIL.Image", "PIL.ImageFile", "PIL.ImageDraw", "PIL.ImageFont",
    # celery's worker stack, normally imported lazily while it starts: its bootsteps are
    # loaded by dotted name (e.g. celery.app.log, celery.worker.consumer.delayed_delivery,
    # added in later Celery releases), so whole packages, not a list of their modules
    "celery.apps.worker", "celery.worker.*", "celery.app.*",
    "celery.concurrency.prefork", "celery.concurrency.solo", "celery.concurrency.thread",
    "celery.concurrency.asynpool", "celery.events", "celery.events.state",
    "celery.events.dispatcher",
    "celery.backends.redis", "celery.loaders.app", "celery.fixups.django",
    "celery.utils.dispatch.signal", "celery.bootsteps",
    "kombu.transport.redis", "kombu.transport.virtual", "kombu.serialization",
    "kombu.utils.json", "kombu.asynchronous", "kombu.asynchronous.hub", "kombu.pidbox",
    "billiard", "billiard.pool", "redis", "redis.asyncio", "redis.lock",
    # standard-library modules those import on first use
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "stringprep", "uuid",
    "concurrent.futures.thread", "concurrent.futures.process", "queue", "selectors",
    "logging.handlers", "logging.config", "json.decoder", "hashlib", "hmac", "secrets",
    "subprocess", "tempfile", "shutil", "zlib", "bz2", "lzma", "gzip", "base64", "locale",
    "ssl", "platform", "pickle", "copy", "tracemalloc", "ctypes.util", "multiprocessing",
    "multiprocessing.util", "multiprocessing.connection", "asyncio", "getpass",
)  # fmt: skip

#: Worker files are group-readable for the ESAF (index results), never world-readable.
WORKER_UMASK = 0o027
#: Longest wait for a worker's spec and for its re-parenting to the supervisor.
_HANDSHAKE_TIMEOUT_S = 10.0
_MAX_SPEC_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CONTROL_FD_ARG = "--control-fd"


class PrivilegeError(RuntimeError):
    """The worker could not become (or prove it became) its identity; it must not run."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker is told, sent over its private socket."""

    queue: str
    uid: int
    gid: int
    queue_key: str  # hex: this queue's envelope key only, never the master secret
    entry: str  # "module:function" with istasks.worker.serve's signature
    env: dict[str, str]
    supervisor_pid: int
    drop_privileges: bool
    concurrency: int | None = None
    cwd_candidates: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        """One JSON line."""
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(raw))


# -- privileges (run in the worker, as root, before any work) ---------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_child_subreaper() -> None:
    """Make orphaned descendants (our double-forked workers) children of this process."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def drop_privileges(uid: int, gid: int) -> None:
    """Switch irrevocably to ``uid``/``gid`` with supplementary groups exactly ``[gid]``.

    Supplementary groups are set before the uid changes, while still allowed: keeping
    root's groups was the original's bug (spec 3.6, 8.19), and ``initgroups(user)`` would
    add the user's *other* ESAF groups, letting one ESAF's session read another's data.
    The ESAF gid is the only group whose files the request may open.
    """
    if uid == 0 or gid == 0:
        raise PrivilegeError(f"refusing to run a worker as uid {uid} gid {gid}")
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    verify_identity(uid, gid)


def verify_identity(uid: int, gid: int) -> None:
    """Raise PrivilegeError unless all ids are exactly uid/gid and root cannot come back."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(f"ids are {os.getresuid()}/{os.getresgid()}, not {uid}/{gid}")
    if os.getgroups() != [gid]:
        raise PrivilegeError(f"supplementary groups are {os.getgroups()}, not [{gid}]")
    for regain in (os.setuid, os.setgid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError(f"{regain.__name__}(0) succeeded after dropping privileges")


def _account_dirs(uid: int, gid: int) -> list[str]:
    """Working-directory candidates: the ESAF account's home, then the user's (spec 3.5).

    The ESAF account (``e<esaf>``) is found as the user named like the gid's group whose
    primary group is that gid. Lookups may hit LDAP, so they run here, in the worker.
    """
    dirs: list[str] = []
    with contextlib.suppress(KeyError):
        account = pwd.getpwnam(grp.getgrgid(gid).gr_name)
        if account.pw_gid == gid:
            dirs.append(account.pw_dir)
    with contextlib.suppress(KeyError):
        dirs.append(pwd.getpwuid(uid).pw_dir)
    return dirs


def _user_env(uid: int, home: str) -> dict[str, str]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"HOME": home, "USER": name, "LOGNAME": name}


def become(spec: WorkerSpec) -> str:
    """Turn this fresh child into the identity's worker process; return its cwd."""
    os.umask(WORKER_UMASK)
    candidates = [*spec.cwd_candidates, *_account_dirs(spec.uid, spec.gid), "/"]
    if spec.drop_privileges:
        drop_privileges(spec.uid, spec.gid)
    elif os.geteuid() == 0:
        raise PrivilegeError("a root supervisor must drop privileges")
    # Cleared by the credential change, so set now: the worker dies with the supervisor.
    # SIGKILL, not SIGTERM: with the supervisor gone nobody would enforce the grace
    # period, and a worker stuck in a task would live on as an orphan.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Nothing the worker runs (the indexer included) may gain privileges via set-uid
    # or file-capability programs.
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if os.getppid() != spec.supervisor_pid:
        raise PrivilegeError("supervisor exited while the worker started")
    cwd = "/"
    for candidate in candidates:
        try:
            os.chdir(candidate)  # as the user: the kernel decides
        except OSError:
            continue
        cwd = candidate
        break
    os.environ.clear()
    os.environ.update(spec.env)
    os.environ.update(_user_env(os.getuid(), cwd))
    return cwd


# -- the worker process ------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _read_spec(sock: socket.socket) -> WorkerSpec:
    sock.settimeout(_HANDSHAKE_TIMEOUT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk or len(data) > _MAX_SPEC_BYTES:
            raise PrivilegeError("no worker spec from the supervisor")
        data += chunk
    return WorkerSpec.from_json(data)


def _await_reparent(supervisor_pid: int) -> None:
    """Wait until the middle process has exited and the supervisor is our parent."""
    deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_S
    while os.getppid() != supervisor_pid:
        if time.monotonic() > deadline:
            raise PrivilegeError("not re-parented to the supervisor (is it a subreaper?)")
        time.sleep(0.0005)


def _load_entry(entry: str) -> Callable[..., object]:
    module, _, name = entry.partition(":")
    function: Callable[..., object] = getattr(importlib.import_module(module), name)
    return function


def _worker_main(sock: socket.socket) -> NoReturn:
    """Body of a new worker: handshake, become the identity, serve until told to stop."""
    try:
        spec = _read_spec(sock)
        # Until Celery names it by its node (istasks.worker), not "is-forkserver".
        proctitle.set_title(proctitle.worker_title(f"is_{spec.uid}_{spec.gid} (starting)"))
        _send(sock, {"pid": os.getpid()})
        _await_reparent(spec.supervisor_pid)
        become(spec)
        entry = _load_entry(spec.entry)
        _send(sock, {"ok": True, "pid": os.getpid()})
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        os._exit(70)
    _report_ready(sock)
    _run_entry(entry, spec)


def _report_ready(sock: socket.socket) -> None:
    """Tell the supervisor once Celery consumes (a worker that never does is stopped);
    then listen on the socket for memory shares."""
    from celery import signals

    def ready(**_: object) -> None:
        with contextlib.suppress(OSError):
            _send(sock, {"ready": True})
        # Kept open: the supervisor sends this worker its memory share on it, and hears
        # on it when the worker asks to be recycled (queues.budget, istasks.memory).
        from istasks.memory import GOVERNOR

        GOVERNOR.connect(sock)

    signals.worker_ready.connect(ready, weak=False)


def _configure_logging(queue: str) -> None:
    """stderr (and syslog when asked) tagged with the queue, at the worker's own level."""
    from istasks.logs import configure_logging
    from istasks.settings import get_settings, reset_settings

    reset_settings()  # settings now come from the worker's own environment
    configure_logging(get_settings(), "is-worker", tag=queue)
    # Celery logs each task's argument and result at INFO: envelopes and JPEG bytes.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run_entry(entry: Callable[..., object], spec: WorkerSpec) -> NoReturn:
    status = 0
    try:
        _configure_logging(spec.queue)
        result = entry(spec.queue, spec.queue_key.encode(), concurrency=spec.concurrency)
        status = result if isinstance(result, int) else 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker for queue %s failed", spec.queue)
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(status)


# -- the zygote --------------------------------------------------------------------------


def _fork_worker(sock_fd: int, control: socket.socket) -> None:
    """Double-fork one worker so that the supervisor (subreaper) becomes its parent."""
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                control.close()
                os.setsid()  # own session: terminal signals to the supervisor skip it
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                _worker_main(socket.socket(fileno=sock_fd))
        finally:
            os._exit(0)
    os.close(sock_fd)
    os.waitpid(middle, 0)


def _module_names(name: str) -> list[str]:
    """``name``, or for ``pkg.*`` the package and all its submodules."""
    if not name.endswith(".*"):
        return [name]
    package = importlib.import_module(name[:-2])
    found = pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
    return [package.__name__, *(info.name for info in found)]


def _preload(modules: Sequence[str]) -> None:
    for pattern in modules:
        try:
            names = _module_names(pattern)
        except Exception as exc:
            log.warning("zygote: cannot preload %s: %s", pattern, exc)
            continue
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # optional or not written yet: the worker will say
                log.warning("zygote: cannot preload %s: %s", name, exc)


def zygote_main(argv: Sequence[str] | None = None) -> None:
    """Entry of the zygote process (``python -m queues.forkserver``)."""
    parser = argparse.ArgumentParser(prog="is-zygote")
    parser.add_argument(_CONTROL_FD_ARG, type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)
    proctitle.set_title(proctitle.FORKSERVER)  # not the --preload list, lines of it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.parent:
        sys.exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    control = socket.socket(fileno=args.control_fd)
    _preload([m for m in args.preload.split(",") if m])
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        log.warning("zygote: %d threads after preloading; forking may deadlock", threads)
    gc.collect()
    gc.freeze()  # keep preloaded objects out of later collections: pages stay shared
    control.sendall(b"R")
    while True:
        message, fds, _flags, _addr = socket.recv_fds(control, 16, 8)
        if not message:
            return
        for fd in fds:
            _fork_worker(fd, control)


class ForkServer:
    """Supervisor-side handle of a zygote process (started on construction)."""

    def __init__(self, preload: Sequence[str] = PRELOAD, *, ready_timeout_s: float = 60.0):
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        argv = [
            sys.executable, "-m", "queues.forkserver",
            _CONTROL_FD_ARG, str(theirs.fileno()), "--parent", str(os.getpid()),
            "--preload", ",".join(preload),
        ]  # fmt: skip
        self.pid = os.posix_spawn(
            sys.executable,
            argv,
            _zygote_env(),
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
        )
        theirs.close()
        self._control.settimeout(ready_timeout_s)
        try:
            ready = self._control.recv(1)
        except TimeoutError:
            ready = b""
        if ready != b"R":
            self.close()
            raise RuntimeError("the worker fork server did not start")
        self._control.settimeout(None)

    def fileno(self) -> int:
        """Control socket: readable (EOF) when the zygote has died."""
        return self._control.fileno()

    def spawn(self) -> socket.socket:
        """Fork a new worker; return the supervisor's end of its private socket."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self._control, [b"S"], [theirs.fileno()])
        finally:
            theirs.close()
        return mine

    def close(self) -> None:
        """Close the control socket; the zygote exits on EOF (the caller reaps it)."""
        self._control.close()


def _zygote_env() -> dict[str, str]:
    """A minimal environment: the zygote must not inherit the supervisor's secrets."""
    path = [p for p in sys.path if p and os.path.isdir(p)]
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(path),
        # One BLAS/OpenMP thread: the zygote must stay single-threaded to fork safely,
        # and workers parallelise by request, not inside numpy.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


if __name__ == "__main__":
    zygote_main()
