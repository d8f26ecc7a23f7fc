"""The supervisor: one Celery worker per ``UID:GID`` identity, started on demand.

Runs as root (``is-supervisor``), single-threaded, around one ``selectors`` loop over
its control socket (:mod:`queues.control`), the private sockets of workers being started
and a signal wake-up pipe. Workers are forked from a preloaded zygote
(:mod:`queues.forkserver`) and re-parented to this process (a child subreaper), so a
death is a SIGCHLD here and is reaped at once, and always before any later request is
answered: no answer names a dead worker live. ``ensure``/``epoch`` answers also list the
identity's workers that died or were stopped in the last minute, with when: from that
the bridge tells which requests a dead worker could have taken (:mod:`queues.pool`).
Workers idle for ``worker_idle_s`` are stopped, at most ``worker_max`` run (the least
recently used idle one makes room), and SIGTERM stops everything: workers get SIGTERM,
then SIGKILL after a grace period.

Not root (development): workers run as the invoking user whatever queue they serve,
and the log says so once at start.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from istasks.app import master_secret
from istasks.cache_budget import warn_about_cache_server
from istasks.errors import IsError
from istasks.logs import configure_logging
from istasks.settings import Settings, get_settings
from queues import control, proctitle
from queues.acl import AclManager, supervisor_tag
from queues.budget import PssSampler, share_for, workers_max_bytes
from queues.envelope import queue_key
from queues.forkserver import PRELOAD, ForkServer, WorkerSpec, set_child_subreaper
from queues.naming import Identity
from queues.orphans import adopted_orphans, kill_orphan
from queues.pool import decode_message, encode_message
from queues.workers import (
    Worker,
    describe_status,
    refusal,
    signal_worker,
    worker_environment,
)

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "istasks.worker:serve"
#: SIGTERM -> SIGKILL delay when stopping a worker (Celery's warm shutdown finishes tasks).
GRACE_S = 10.0
#: A worker asked about more recently than this is busy: the cap never evicts it. Above
#: the dispatcher's poll period plus the client cache TTL (pool.CACHE_TTL_S).
BUSY_S = 5.0
#: How often running workers' Redis users are checked (a restarted Redis loses them, and
#: its workers cannot reconnect until they are back). One ACL USERS call per server.
ACL_CHECK_S = 1.0
#: After any child exits, how long adopted orphans are looked for (queues.orphans): a
#: killed worker's indexer is re-parented here at once, its own children when it dies.
ORPHAN_SWEEP_S = 30.0
#: Least time between two looks at /proc while sweeping.
ORPHAN_CHECK_S = 0.5
#: How long, and how many per identity, workers that died or were stopped are listed in
#: ``ensure``/``epoch`` replies: the bridge polls every 0.25 s (queues.pool).
GONE_KEEP_S = 60.0
GONE_MAX = 8
_MAX_TICK_S = 1.0
#: Stop reason of a worker that asked to be recycled (past its hard memory limit).
RECYCLE_REASON = "memory"
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    """Starts, tracks and stops the per-identity workers; answers the control socket."""

    def __init__(
        self,
        settings: Settings,
        *,
        socket_path: str | None = None,
        client_group: int | None = None,
        entry: str = DEFAULT_ENTRY,
        preload: Sequence[str] = PRELOAD,
        grace_s: float = GRACE_S,
        busy_s: float = BUSY_S,
    ) -> None:
        self.settings = settings
        self.busy_s = busy_s
        self.socket_path = socket_path or settings.supervisor_socket
        self.client_group = client_group
        self.entry = entry
        self.grace_s = grace_s
        module = entry.partition(":")[0]
        self._preload = tuple(preload) if module in preload else (*preload, module)
        self._secret = master_secret(settings)
        self._root = os.geteuid() == 0
        broker, results, cache = settings.broker, settings.results, settings.cache
        if not (broker and results and cache):
            raise ValueError("the supervisor needs IS_REDIS_URL (or broker/result/cache URLs)")
        tag = supervisor_tag(settings.host, os.path.abspath(self.socket_path))
        self._acl = AclManager(broker, results, cache, tag=tag)
        self._sel = selectors.DefaultSelector()
        self._live: dict[Identity, Worker] = {}
        self._by_pid: dict[int, Worker] = {}
        self._early_exits: dict[int, int] = {}
        # Per identity: (epoch, time.monotonic()) of workers that died or were stopped.
        self._gone: dict[Identity, deque[tuple[int, float]]] = {}
        self._next_epoch = time.time_ns() // 1_000_000
        self._zygote: ForkServer | None = None
        self._control: control.ControlServer | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop_requested = False
        self._next_acl_check = 0.0
        self._orphan_sweep_until = 0.0
        self._next_orphan_check = 0.0
        self.recycled = 0
        self._pss = PssSampler()

    # -- lifecycle --------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT or :meth:`shutdown`; then stop every worker.

        Must run in the main thread of its own process (signals, child subreaper).
        """
        try:
            self._setup()
            while not self._stop_requested:
                self._run_once()
        finally:
            self._teardown()

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop (safe from a signal handler or thread)."""
        self._stop_requested = True
        self._wake_w.send(b"\0")

    def _setup(self) -> None:
        set_child_subreaper()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGCHLD, *_SHUTDOWN_SIGNALS):
            signal.signal(signum, _note_signal)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._zygote = self._start_zygote()
        self._acl.probe()
        s = self.settings
        warn_about_cache_server(s.cache, s.broker, s.cache_max_bytes)
        self._control = control.ControlServer(
            self.socket_path, self.client_group, self._sel, self._handle_line
        )
        log.info(
            "supervisor up socket=%s mode=%s acl=%s worker_max=%d worker_idle_s=%g",
            self.socket_path, "root" if self._root else "single-user", self._acl.status,
            self.settings.worker_max, self.settings.worker_idle_s,
        )  # fmt: skip
        if not self._root:
            log.warning(
                "not root: every worker runs as uid=%d gid=%d whatever queue it serves",
                os.getuid(), os.getgid(),
            )  # fmt: skip

    def _start_zygote(self) -> ForkServer:
        zygote = ForkServer(self._preload)
        self._sel.register(zygote, selectors.EVENT_READ, self._on_zygote_eof)
        return zygote

    def _run_once(self) -> None:
        for key, _events in self._sel.select(self._next_timeout_s()):
            callback: Callable[[], None] = key.data
            try:
                callback()
            except Exception:  # one bad event must not take every worker down with us
                log.exception("supervisor: event handler %r failed", callback)
        self._tick(time.monotonic())

    def _next_timeout_s(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._by_pid.values() if w.state == "stopping"]
        deadlines += [w.deadline for w in self._live.values() if not w.ready]
        deadlines += [w.last_used + self.settings.worker_idle_s for w in self._live.values()]
        return max(0.005, min([_MAX_TICK_S, *(d - now for d in deadlines)]))

    def _teardown(self) -> None:
        """Stop listening, stop every worker (SIGTERM, then SIGKILL), stop the zygote."""
        if self._control is not None:
            self._control.close()
        for worker in list(self._live.values()):
            self._stop(worker, "shutdown")
        hard_deadline = time.monotonic() + self.grace_s + 5.0
        while self._by_pid and time.monotonic() < hard_deadline:
            self._run_once()
        self._kill_orphans()  # what the last workers left running dies with us
        self._stop_zygote()
        self._acl.revoke_all()
        self._acl.close()
        self._pss.close()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, *_SHUTDOWN_SIGNALS):
            signal.signal(signum, signal.SIG_DFL)
        log.info("supervisor down, %d worker(s) left unreaped", len(self._by_pid))

    def _stop_zygote(self) -> None:
        if self._zygote is None:
            return
        zygote, self._zygote = self._zygote, None
        self._sel.unregister(zygote)
        zygote.close()
        deadline = time.monotonic() + 5.0
        try:
            while time.monotonic() < deadline:
                if os.waitpid(zygote.pid, os.WNOHANG)[0] == zygote.pid:
                    return
                time.sleep(0.01)
            os.kill(zygote.pid, signal.SIGKILL)
            os.waitpid(zygote.pid, 0)
        except (ChildProcessError, ProcessLookupError):
            return  # already reaped

    # -- signals and reaping ----------------------------------------------------------

    def _on_wake(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        numbers = set(data)
        if numbers & {0, *(int(s) for s in _SHUTDOWN_SIGNALS)} and not self._stop_requested:
            log.info("supervisor stopping (signal)")
            self._stop_requested = True
        self._reap()  # also on other wake-ups: a SIGCHLD byte may share the read

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        self._orphan_sweep_until = time.monotonic() + ORPHAN_SWEEP_S
        if self._zygote is not None and pid == self._zygote.pid:
            how = describe_status(status)
            log.warning("zygote pid=%d died (%s); restarted on next start", pid, how)
            self._sel.unregister(self._zygote)
            self._zygote.close()
            self._zygote = None
            return
        worker = self._by_pid.pop(pid, None)
        if worker is None:
            if len(self._early_exits) > 1000:  # unclaimed (e.g. pool children): forget
                self._early_exits.clear()
            self._early_exits[pid] = status  # its pid message may still be unread
            return
        how = describe_status(status)
        if worker.state == "stopping":
            log.info("worker reap queue=%s pid=%d uid=%d gid=%d reason=%s status=%s",
                     *worker.log_fields(), worker.reason, how)  # fmt: skip
        else:
            log.warning("worker death queue=%s pid=%d uid=%d gid=%d reason=%s",
                        *worker.log_fields(), how)  # fmt: skip
            self._note_gone(worker)
        # Forgotten before its waiters hear of it: whatever they ask next sees it gone.
        self._forget(worker)
        if worker.state != "stopping":
            self._fail_waiters(worker, f"worker for {worker.identity.queue} died ({how})")

    def _note_gone(self, worker: Worker) -> None:
        """Record that a worker that had an epoch (so may have been sent tasks) is gone:
        the bridge tells from the time whether it could have taken a given task."""
        if worker.epoch is None:
            return
        gone = self._gone.setdefault(worker.identity, deque(maxlen=GONE_MAX))
        gone.append((worker.epoch, time.monotonic()))

    def _prune_gone(self, now: float) -> None:
        for identity, gone in list(self._gone.items()):
            while gone and now - gone[0][1] > GONE_KEEP_S:
                gone.popleft()
            if not gone:
                del self._gone[identity]

    def _on_zygote_eof(self) -> None:
        self._reap()  # the zygote closed its end: it is exiting; reap it when it has

    def _forget(self, worker: Worker) -> None:
        """Drop a finished worker; revoke its Redis user unless a successor runs."""
        if self._live.get(worker.identity) is worker:
            del self._live[worker.identity]
        self._close_spawn(worker)
        if worker.identity not in self._live:
            self._acl.revoke(worker.identity)
        self._share_out()

    # -- control requests ---------------------------------------------------------------

    def _handle_line(self, client: control.Client, line: bytes) -> dict[str, Any] | None:
        """Answer one request now, or return None when the answer waits for a start.

        Exits are reaped first, so that a worker already dead is never reported live:
        a death is always noticed before any later answer (and start).
        """
        self._reap()
        try:
            request = decode_message(line)
            op = request.get("op")
            if op == "status":
                return self._status()
            uid, gid = int(request["uid"]), int(request["gid"])
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "kind": "request", "error": f"bad supervisor request: {exc}"}
        try:
            identity = Identity(uid, gid)
        except ValueError as exc:
            return {"ok": False, "kind": "identity", "error": f"refusing identity: {exc}"}
        if op == "epoch":
            return self._epoch(identity)
        if op == "ensure":
            return self._ensure(client, identity)
        return {"ok": False, "kind": "request", "error": f"unknown op {op!r}"}

    def _state(self, identity: Identity) -> dict[str, Any]:
        """The ``ensure``/``epoch`` answer: the live worker's epoch (None while none runs
        or it is starting), the workers gone lately with when, and our clock's time."""
        worker = self._live.get(identity)
        epoch = worker.epoch if worker is not None and worker.state == "running" else None
        gone = [list(item) for item in self._gone.get(identity, ())]
        return {"ok": True, "epoch": epoch, "gone": gone, "now": time.monotonic()}

    def _epoch(self, identity: Identity) -> dict[str, Any]:
        worker = self._live.get(identity)
        if worker is not None and worker.state == "running":
            worker.last_used = time.monotonic()  # a waiting request keeps its worker alive
        return self._state(identity)

    def _ensure(self, client: control.Client, identity: Identity) -> dict[str, Any] | None:
        now = time.monotonic()
        worker = self._live.get(identity)
        if worker is not None and worker.state == "running":
            worker.last_used = now
            return self._state(identity)
        if worker is None:
            refused = refusal(self.settings, identity)
            if refused is not None:
                log.warning("ensure refused queue=%s reason=%s", identity.queue, refused)
                return {"ok": False, "kind": "identity", "error": refused}
            if not self._make_room(now):
                text = f"all {self.settings.worker_max} workers are busy; try again shortly"
                return {"ok": False, "kind": "unavailable", "error": text}
            try:
                worker = self._start(identity, now)
            except (IsError, OSError, RuntimeError) as exc:
                log.warning("worker start failed queue=%s reason=%s", identity.queue, exc)
                self._acl.revoke(identity)
                return {"ok": False, "kind": "unavailable", "error": f"cannot start worker: {exc}"}
        worker.waiters.append(client)
        return None

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        stopping = [w for w in self._by_pid.values() if w.state == "stopping"]
        workers = [w.status_row(now) for w in [*self._live.values(), *stopping]]
        memory = self._memory_status()
        for row in workers:
            row["pss_bytes"] = memory["by_pid"].get(row["pid"])
        del memory["by_pid"]
        return {
            "ok": True, "pid": os.getpid(), "mode": "root" if self._root else "single-user",
            "acl": self._acl.status, "worker_max": self.settings.worker_max,
            "worker_idle_s": self.settings.worker_idle_s, "workers": workers, "memory": memory,
        }  # fmt: skip

    # -- starting ---------------------------------------------------------------------

    def _start(self, identity: Identity, now: float) -> Worker:
        """Fork a worker for ``identity`` and send it its spec; it answers on its socket."""
        urls = self._acl.grant(identity)
        share = share_for(self.settings, len(self._live) + 1)
        env = worker_environment(self.settings, urls)
        env["IS_LRU_MAX_BYTES"] = str(share.lru_max_bytes)  # its share from the start
        env["IS_JPEG_LRU_MAX_BYTES"] = str(share.jpeg_lru_max_bytes)
        env["IS_FRAME_LRU_MAX_BYTES"] = str(share.frame_lru_max_bytes)
        spec = WorkerSpec(
            queue=identity.queue,
            uid=identity.uid,
            gid=identity.gid,
            queue_key=queue_key(self._secret, identity.queue).decode(),
            entry=self.entry,
            env=env,
            supervisor_pid=os.getpid(),
            drop_privileges=self._root,
            concurrency=self.settings.worker_concurrency,
            cwd_candidates=[self.settings.data_root] if self.settings.data_root else [],
        )
        sock = self._spawn()
        try:
            sock.sendall(spec.to_json())
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        deadline = now + self.settings.worker_start_timeout_s
        run_as = None if self._root else (os.getuid(), os.getgid())
        worker = Worker(identity, now, now, deadline, spawn_sock=sock, run_as=run_as)
        self._live[identity] = worker
        self._sel.register(sock, selectors.EVENT_READ, functools.partial(self._on_spawn, worker))
        return worker

    def _spawn(self) -> socket.socket:
        """A new worker's socket; restarts the zygote once if it has died."""
        for attempt in (1, 2):
            if self._zygote is None:
                self._zygote = self._start_zygote()
            try:
                return self._zygote.spawn()
            except OSError:
                if attempt == 2:
                    raise
                self._sel.unregister(self._zygote)
                self._zygote.close()
                self._zygote = None
        raise AssertionError("unreachable")

    def _on_spawn(self, worker: Worker) -> None:
        assert worker.spawn_sock is not None
        try:
            data = worker.spawn_sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_spawn(worker)
            if worker.state == "starting":
                self._start_failed(worker, "worker exited during start")
            return
        worker.spawn_buffer += data
        while b"\n" in worker.spawn_buffer and worker.state != "stopping":
            line, _, worker.spawn_buffer = worker.spawn_buffer.partition(b"\n")
            self._on_spawn_message(worker, decode_message(line))

    def _on_spawn_message(self, worker: Worker, message: dict[str, Any]) -> None:
        if worker.pid is None and isinstance(message.get("pid"), int):
            worker.pid = int(message["pid"])
            self._by_pid[worker.pid] = worker
            if worker.pid in self._early_exits:
                self._on_exit(worker.pid, self._early_exits.pop(worker.pid))
                return
        if message.get("ready") is True:
            worker.ready = True
            ready_ms = (time.monotonic() - worker.started_at) * 1000
            log.debug("worker ready queue=%s pid=%d ready_ms=%.1f", worker.identity.queue,
                      worker.pid or 0, ready_ms)  # fmt: skip
        elif message.get("recycle") and worker.state == "running":
            self._recycle(worker, message)
        elif message.get("ok") is True:
            self._started(worker)
        elif message.get("ok") is False:
            self._start_failed(worker, str(message.get("error", "unknown error")))

    def _started(self, worker: Worker) -> None:
        worker.state = "running"
        worker.deadline = time.monotonic() + self.settings.worker_start_timeout_s  # to ready
        worker.epoch = self._next_epoch
        self._next_epoch += 1
        elapsed_ms = (time.monotonic() - worker.started_at) * 1000
        log.info("worker start queue=%s pid=%d uid=%d gid=%d epoch=%d reason=request start_ms=%.1f",
                 *worker.log_fields(), worker.epoch, elapsed_ms)  # fmt: skip
        self._answer_waiters(worker, self._state(worker.identity))
        self._share_out()

    def _start_failed(self, worker: Worker, reason: str) -> None:
        log.warning("worker start failed queue=%s pid=%d uid=%d gid=%d reason=%s",
                    *worker.log_fields(), reason)  # fmt: skip
        self._fail_waiters(worker, f"cannot start worker for {worker.identity.queue}: {reason}")
        self._close_spawn(worker)
        if worker.pid is not None and worker.pid in self._by_pid:
            worker.state, worker.reason = "stopping", "start failed"
            worker.deadline = time.monotonic()  # SIGKILL it on the next tick
            del self._live[worker.identity]
        else:
            self._forget(worker)

    def _fail_waiters(self, worker: Worker, text: str) -> None:
        self._answer_waiters(worker, {"ok": False, "kind": "unavailable", "error": text})

    def _answer_waiters(self, worker: Worker, message: dict[str, Any]) -> None:
        waiters, worker.waiters = worker.waiters, []
        if self._control is None or not waiters:
            return
        for client in waiters:
            self._control.reply(client, message)
        self._control.resume()

    def _close_spawn(self, worker: Worker) -> None:
        if worker.spawn_sock is not None:
            self._sel.unregister(worker.spawn_sock)
            worker.spawn_sock.close()
            worker.spawn_sock = None

    # -- stopping ---------------------------------------------------------------------

    def _stop(self, worker: Worker, reason: str, *, lost: bool = True) -> None:
        """SIGTERM (Celery's warm shutdown); SIGKILL follows after the grace period.
        ``lost=False``: the worker asked for it between requests (a recycle), so what it
        took it finishes and nothing it could have taken is lost (unless it is killed)."""
        if self._live.get(worker.identity) is worker:
            del self._live[worker.identity]
        if worker.state == "running" and lost:
            self._note_gone(worker)
        if worker.pid is None:  # forked but silent: closing its socket ends it
            self._fail_waiters(worker, f"worker for {worker.identity.queue} stopped ({reason})")
            self._forget(worker)
            return
        worker.state, worker.reason = "stopping", reason
        worker.deadline = time.monotonic() + self.grace_s
        self._fail_waiters(worker, f"worker for {worker.identity.queue} stopped ({reason})")
        log.info("worker stop queue=%s pid=%d uid=%d gid=%d reason=%s",
                 *worker.log_fields(), reason)  # fmt: skip
        signal_worker(worker.pid, signal.SIGTERM)
        self._share_out()

    # -- memory (queues.budget) ---------------------------------------------------------

    def _share_out(self) -> None:
        """Send every running worker its share of the host budget when it changed (the
        number of live workers did): shrinking as identities arrive, growing as they go."""
        share = share_for(self.settings, len(self._live))
        for worker in self._live.values():
            if worker.state != "running" or worker.spawn_sock is None or worker.share == share:
                continue
            try:
                worker.spawn_sock.send(encode_message(share.to_message()))
            except OSError:  # full (a stuck worker) or closed: try again on the next change
                continue
            worker.share = share

    def _recycle(self, worker: Worker, message: dict[str, Any]) -> None:
        """The worker is past its hard limit with its caches dropped and has no request
        running: stop it gracefully; the next request (queued ones included) starts its
        successor, which the bridge follows (queues.pool)."""
        log.warning("worker recycle queue=%s pid=%d uid=%d gid=%d pss=%s hard_max_bytes=%s",
                    *worker.log_fields(), message.get("pss"),
                    worker.share.hard_max_bytes if worker.share else None)  # fmt: skip
        self._stop(worker, RECYCLE_REASON, lost=False)
        self.recycled += 1

    def _memory_status(self) -> dict[str, Any]:
        """The host budget, the current share and each live worker's PSS."""
        share = share_for(self.settings, len(self._live))
        pss = self._pss.watch(w.pid for w in self._live.values() if w.pid is not None)
        return {
            "workers_max_bytes": workers_max_bytes(self.settings),
            "share": share.to_message()["memory"],
            "pss_bytes": sum(v for v in pss.values() if v is not None),
            "recycled": self.recycled,
            "by_pid": pss,
        }

    def _make_room(self, now: float) -> bool:
        """Below the cap, or stop the least recently used idle worker; False if all busy."""
        if len(self._live) < self.settings.worker_max:
            return True
        idle = [
            w for w in self._live.values()
            if w.state == "running" and now - w.last_used >= self.busy_s
        ]  # fmt: skip
        if not idle:
            return False
        self._stop(min(idle, key=lambda w: w.last_used), "lru")
        return True

    def _tick(self, now: float) -> None:
        if now >= self._next_acl_check and self._live:
            self._check_acl_users()
        self._prune_gone(now)
        for worker in list(self._live.values()):
            if worker.state == "starting" and now > worker.deadline:
                timeout_s = self.settings.worker_start_timeout_s
                self._start_failed(worker, f"not started within {timeout_s:g} s")
            elif worker.state == "running" and not worker.ready and now > worker.deadline:
                self._stop(worker, "not consuming its queue in time")
            elif worker.state == "running" and now - worker.last_used > self.settings.worker_idle_s:
                self._stop(worker, "idle")
        if self._next_orphan_check <= now < self._orphan_sweep_until:
            self._next_orphan_check = now + ORPHAN_CHECK_S
            self._kill_orphans()
        for worker in list(self._by_pid.values()):
            if worker.state == "stopping" and not worker.killed and now > worker.deadline:
                worker.killed = True
                log.warning("worker kill queue=%s pid=%d uid=%d gid=%d reason=%s (SIGKILL)",
                            *worker.log_fields(), worker.reason)  # fmt: skip
                assert worker.pid is not None
                if worker.reason == RECYCLE_REASON:
                    self._note_gone(worker)  # killed mid-request after all: may have lost it
                signal_worker(worker.pid, signal.SIGKILL)

    def _check_acl_users(self) -> None:
        """Re-create the Redis users a restarted Redis lost. A check that waits out its
        timeouts (Redis unreachable, not refusing) holds up this loop: the next one then
        comes after four times as long, so that such waits stay a fifth of the time."""
        started = time.monotonic()
        restored = self._acl.restore_missing()
        if restored:
            log.warning("redis lost worker users %s (restarted?): re-created", restored)
        finished = time.monotonic()
        self._next_acl_check = finished + max(ACL_CHECK_S, 4 * (finished - started))

    def _kill_orphans(self) -> None:
        """Kill what exited workers left running (an indexer in a session of its own),
        which nothing else would ever stop; they are then reaped as unknown exits."""
        if any(w.pid is None for w in self._live.values()):
            return  # a worker forked but not yet identified would look like an orphan
        known = set(self._by_pid)
        if self._zygote is not None:
            known.add(self._zygote.pid)
        for pid in adopted_orphans(os.getpid(), known):
            kill_orphan(pid)


def _note_signal(signum: int, frame: object) -> None:
    """Python-level handler: the wake-up fd carries the signal to the loop."""


def main(argv: Sequence[str] | None = None) -> int:
    """``is-supervisor``: run the supervisor until SIGTERM."""
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="is-supervisor", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default=settings.supervisor_socket, help="control socket")
    parser.add_argument("--group", help="group (name or gid) allowed to use the socket (bridge)")
    parser.add_argument("--entry", default=DEFAULT_ENTRY, help="worker function module:name")
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help="SIGTERM -> SIGKILL")
    parser.add_argument(
        "--busy-s", type=float, default=BUSY_S, help="asked about this recently: never evicted"
    )
    args = parser.parse_args(argv)
    proctitle.set_title(proctitle.SUPERVISOR)
    configure_logging(settings, "is-supervisor")
    try:
        supervisor = Supervisor(
            settings,
            socket_path=args.socket,
            client_group=control.resolve_group(args.group),
            entry=args.entry,
            grace_s=args.grace_s,
            busy_s=args.busy_s,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        supervisor.serve_forever()
    except (OSError, RuntimeError) as exc:  # socket in use, zygote failed, ...
        log.error("supervisor failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
