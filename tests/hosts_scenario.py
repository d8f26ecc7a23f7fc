"""Several hosts on one broker, run for real: the broker host's Redis and is-proxy, two
worker hosts (each a stack of supervisor + bridge, ops.stack), a load, one host killed.

``python -m tests.hosts_scenario --broker-ip IP --host NAME[=NETNS] ... --data DIR
--run DIR`` prints one JSON object of counts and times. It runs on the broker host: in
tests/test_hosts.py that is the broker's network namespace, each worker host a network
namespace of its own with its own UTS namespace (hostname), so that all traffic stays
inside the namespaces; without ``=NETNS`` a host is a set of processes on this machine
that calls itself NAME (``IS_HOST_NAME``), which needs no root.

Steps: every host serves the identity (both heartbeats seen); a view reduced on one host
is a Redis cache hit on the other; under a load of clients one host loses every process
(SIGKILL of everything in its namespace, or of its processes); the requests are counted
as answered, answered with an error, and lost; later requests all go to the survivor;
the lost host comes back and takes work again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import zmq

from istasks import keys
from istasks.redisconn import connect
from istasks.settings import Settings
from ops.devsession import ensure_keypair, isauth_for, sign_isauth, write_session
from ops.stack import Stack, dev_user

#: A request with no reply within this is counted lost (the view deadline is 10 s).
LOST_AFTER_S = 15.0
#: The identity's worker of every host is up within this.
WARM_S = 60.0


@dataclass
class Host:
    """One worker host: its name, its network namespace (or none) and its stack."""

    name: str
    netns: str | None
    run: Path
    stack: Stack | None = None

    @property
    def prefix(self) -> tuple[str, ...]:
        """Command prefix: into its namespaces with its hostname, or its name by setting."""
        if self.netns is None:
            return ()
        script = 'hostname "$0" && exec "$@"'
        return ("ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", script,
                self.name)  # fmt: skip

    def pids(self) -> list[int]:
        """Every process of this host."""
        if self.netns is not None:
            out = subprocess.run(
                ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
            ).stdout
            return [int(p) for p in out.split()]
        assert self.stack is not None
        roots = [c.process.pid for c in self.stack.components if c.process.poll() is None]
        return roots + _descendants(roots)


@dataclass
class Load:
    """Counts of one load run."""

    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    # Requests sent before the kill and answered after it: the longest wait after it.
    worst_after_kill_s: float = 0.0
    errors_after_kill: int = 0
    sent_after_settle: int = 0
    ok_after_settle: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    ok_sent_at: list[float] = field(default_factory=list)
    error_sent_at: list[float] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker-ip", default="127.0.0.1")
    parser.add_argument("--host", action="append", required=True, help="NAME or NAME=NETNS")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--load-s", type=float, default=12.0)
    parser.add_argument("--kill-at-s", type=float, default=4.0)
    parser.add_argument("--sentinel", action="store_true", help="Redis behind Sentinel")
    args = parser.parse_args(argv)
    hosts = []
    for spec in args.host:
        name, _, netns = spec.partition("=")
        hosts.append(Host(name, netns or None, args.run / name))
    result: dict[str, Any] = {}
    with _broker(args.broker_ip, args.run, sentinel=args.sentinel) as broker:
        result["broker_pids"] = broker.pids
        try:
            _run(args, hosts, broker, result=result)
        finally:
            for host in hosts:
                if host.stack is not None:
                    host.stack.stop(grace_s=5.0)
    print(json.dumps(result))
    return 0


def _run(
    args: argparse.Namespace, hosts: list[Host], broker: Broker, *, result: dict[str, Any]
) -> None:
    redis_url, frontend, backend = broker.url, broker.frontend, broker.backend
    private, public = ensure_keypair(args.run)
    secret = args.run / "task-secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    common = Settings(
        redis_url=redis_url, redis_sentinels=broker.sentinels,
        session_redis_url=broker.session_url,
    )  # fmt: skip
    admin = connect(redis_url, common)  # follows a promotion (Sentinel)
    pid = f"hosts-{secrets.token_hex(4)}"
    text, sig = sign_isauth(private.read_bytes(), isauth_for(pid, dev_user(), [0]))
    sessions = redis.Redis.from_url(broker.session_url or redis_url)
    write_session(sessions, pid, text, sig)
    sessions.close()

    def start(host: Host) -> None:
        settings = Settings(
            redis_url=redis_url, proxy_endpoint=backend, task_secret_file=str(secret),
            session_public_key=str(public), host_name=None if host.netns else host.name,
            view_timeout_s=10.0, worker_idle_s=300.0, log_level="INFO",
            redis_sentinels=broker.sentinels, session_redis_url=broker.session_url,
        )  # fmt: skip
        host.stack = Stack.start(host.run, settings, command_prefix=host.prefix)

    for host in hosts:
        start(host)
    job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(args.data / "x_master.h5")}
    names = sorted(h.name for h in hosts)

    # 1. every host serves the identity
    started = time.monotonic()
    identity = _warm(frontend, job, admin, names)
    result["identity"] = identity
    result["warm_s"] = round(time.monotonic() - started, 2)
    result["heartbeats"] = _beating(admin, identity)
    result["acl_users"] = sorted(
        name for name in map(_text, admin.acl_users()) if name.startswith("is_w_")
    )

    # 2. the cache is shared: one view, computed once, then Redis hits
    gid = int(identity.split(":")[1])
    before = _stats(admin, gid)
    view = {**job, "frame": 3, "xsize": 333}
    replies = [_request(frontend, view) for _ in range(8)]
    after = _stats(admin, gid)
    result["cache"] = {
        "ok": sum(r is not None and r[0] == b"" for r in replies),
        "computed": after["computed"] - before["computed"],
        "redis_hits": after["hits"] - before["hits"],
    }

    # 2b. CPU cost per request and component, under load: uncached views, then cached
    result["cpu"] = {
        "uncached": _measure(args, frontend, job, hosts, result["broker_pids"], base=600),
        "cached": _measure(args, frontend, job, hosts, result["broker_pids"], base=0),
    }

    # 3. one host loses every process under load
    victim = hosts[-1]
    watcher: list[threading.Thread] = []
    gone_at: list[float | None] = []

    def kill_host() -> int:
        killed = _kill_all(victim)
        gone = lambda: victim.name not in _beating(admin, identity)  # noqa: E731
        watcher.append(threading.Thread(target=lambda: gone_at.append(_wait(gone, 10.0))))
        watcher[0].start()
        return killed

    summary, kill_at = _loaded(args, frontend, job, kill_host, result)
    watcher[0].join()
    seen_gone_at = gone_at[0]
    result["heartbeat_gone_s"] = round(seen_gone_at - kill_at, 2) if seen_gone_at else None
    result["load"] = summary
    survivor_logs = [(h.run / "bridge.log") for h in hosts if h is not victim]
    result["retried"] = sum(
        p.read_text(errors="replace").count("sent again") for p in survivor_logs
    )
    assert victim.stack is not None
    victim.stack.components.clear()  # all dead: nothing to stop

    # 4. the lost host comes back and takes work again
    victim_log = victim.run / "bridge.log"
    answered_before = _count_answers(victim_log)
    start(victim)
    back_at = _wait(lambda: victim.name in _beating(admin, identity), 30.0, poke=(frontend, job))
    result["came_back"] = back_at is not None
    served = [_request(frontend, {**job, "frame": 1 + n % 4, "xsize": 150 + n}) for n in range(12)]
    result["after_return_ok"] = sum(r is not None and r[0] == b"" for r in served)
    result["victim_answers_after_return"] = _count_answers(victim_log) - answered_before

    # 5. only the supervisor of one host dies (and so its workers): its bridge lives on
    # and sends to the other host's worker instead of "worker supervisor unreachable"
    assert victim.stack is not None
    supervisor = next(c for c in victim.stack.components if c.name == "supervisor")

    def kill_supervisor() -> int:
        pids = [supervisor.process.pid, *_descendants([supervisor.process.pid])]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        supervisor.process.wait()
        return len(pids)

    answered_before = _count_answers(victim_log)
    summary, _ = _loaded(args, frontend, job, kill_supervisor, {}, base=150)
    result["supervisor_lost_load"] = summary
    result["victim_answers_without_supervisor"] = _count_answers(victim_log) - answered_before
    victim.stack.components.remove(supervisor)

    # 6. Redis failover: the primary is SIGKILLed under load, the sentinel promotes the
    # replica; nothing is restarted
    if broker.primary is not None:
        primary = broker.primary
        promoted: list[float] = []

        def kill_primary() -> int:
            primary.send_signal(signal.SIGKILL)
            watch = threading.Thread(
                target=lambda: promoted.append(_wait(broker.promoted, 20.0) or 0.0)
            )
            watch.start()
            watcher.append(watch)
            return 1

        watcher.clear()
        raw: list[Load] = []
        summary, kill_at = _loaded(
            args, frontend, job, kill_primary, {}, base=250, load_s=args.kill_at_s + 20, raw=raw
        )
        watcher[0].join()
        load = raw[0]
        at = promoted[0] if promoted and promoted[0] else None
        failover: dict[str, Any] = {"load": summary}
        if at is not None:
            failover["promoted_s"] = round(at - kill_at, 2)
            after = sorted(t for t in load.ok_sent_at if t >= at)
            failover["answering_again_s"] = round(after[0] - at, 2) if after else None
            settled = at + 10.0
            failover["errors_sent_10s_after_promotion"] = sum(
                t >= settled for t in load.error_sent_at
            )
            failover["ok_sent_10s_after_promotion"] = sum(t >= settled for t in load.ok_sent_at)
        result["failover"] = failover


def _loaded(
    args: argparse.Namespace,
    frontend: str,
    job: dict[str, Any],
    kill: Any,
    result: dict[str, Any],
    *,
    base: int = 200,
    load_s: float | None = None,
    raw: list[Load] | None = None,
) -> tuple[dict[str, Any], float]:
    """Clients send views for ``args.load_s``; ``kill()`` runs at ``args.kill_at_s``.
    The counts, and when the kill began (``raw`` gets the Load itself)."""
    load = Load()
    if raw is not None:
        raw.append(load)
    kill_at = time.monotonic() + args.kill_at_s
    times = (time.monotonic() + (load_s or args.load_s), kill_at, kill_at + 2.5)
    threads = [
        threading.Thread(
            target=_client,
            args=(frontend, job, n),
            kwargs={"times": times, "load": load, "base": base},
        )
        for n in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, kill_at - time.monotonic()))
    result["killed_processes"] = kill()
    result["kill_took_s"] = round(time.monotonic() - kill_at, 2)
    for thread in threads:
        thread.join()
    load.latencies_ms.sort()
    summary = asdict(load)
    summary["p50_ms"] = _pct(load.latencies_ms, 0.5)
    summary["p99_ms"] = _pct(load.latencies_ms, 0.99)
    for name in ("latencies_ms", "ok_sent_at", "error_sent_at"):
        del summary[name]
    return summary, kill_at


def _measure(
    args: argparse.Namespace,
    frontend: str,
    job: dict[str, Any],
    hosts: list[Host],
    broker: dict[str, int],
    *,
    base: int,
) -> dict[str, Any]:
    """CPU ms per answered request of each component over a 5 s load (nothing killed):
    distinct views (``base`` > 0: a new size each, so reduced once and encoded) or one
    view repeated by every client (``base`` 0: the workers' LRUs answer)."""

    def pids() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"redis": [broker["redis"]], "proxy": [broker["proxy"]]}
        for host in hosts:
            assert host.stack is not None
            for comp in host.stack.components:
                name = "workers" if comp.name == "supervisor" else comp.name
                out.setdefault(comp.name, []).append(comp.process.pid)
                if comp.name == "supervisor":  # its children: zygote and workers
                    out.setdefault(name, []).extend(_descendants([comp.process.pid]))
        return out

    before = {name: sum(map(_cpu_s, group)) for name, group in pids().items()}
    wall = time.monotonic()
    load = Load()
    end_at = time.monotonic() + 5.0
    far = end_at + 3600.0
    threads = [
        threading.Thread(
            target=_client,
            args=(frontend, job, n),
            kwargs={"times": (end_at, far, far), "load": load, "base": base},
        )
        for n in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - wall
    after = {name: sum(map(_cpu_s, group)) for name, group in pids().items()}
    answered = max(load.ok, 1)  # (ok_sent_at etc. are not reported here)
    per_request = {n: round((after[n] - before.get(n, 0.0)) * 1000 / answered, 3) for n in after}
    return {"requests": load.ok, "errors": len(load.errors), "per_s": round(load.ok / wall, 1),
            "cpu_ms_per_request": per_request,
            "p50_ms": _pct(sorted(load.latencies_ms), 0.5)}  # fmt: skip


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(
    frontend: str,
    job: dict[str, Any],
    n: int,
    *,
    times: tuple[float, float, float],
    load: Load,
    base: int,
) -> None:
    """One is.js-like client: one request at a time, each an uncached view, until
    ``times`` = (end, kill, settle)."""
    end_at, kill_at, settle_at = times
    count = 0
    while time.monotonic() < end_at:
        count += 1
        view = {**job, "frame": 1 + count % 4, "xsize": base + n * 97 + count}
        if base == 0:  # one view for everybody: cached
            view = {**job, "frame": 2, "xsize": 512}
        sent = time.monotonic()
        reply = _request(frontend, view, timeout_s=LOST_AFTER_S)
        done = time.monotonic()
        load.sent += 1
        if sent >= settle_at:
            load.sent_after_settle += 1
        if reply is None:
            load.lost += 1
            continue
        if reply[0] == b"":
            load.ok += 1
            load.ok_sent_at.append(sent)
            load.latencies_ms.append((done - sent) * 1000)
            if sent >= settle_at:
                load.ok_after_settle += 1
        else:
            load.errors.append(reply[0].decode(errors="replace")[:200])
            load.error_sent_at.append(sent)
            if done >= kill_at:
                load.errors_after_kill += 1
        if sent < kill_at <= done:
            load.worst_after_kill_s = max(load.worst_after_kill_s, done - kill_at)


def _request(endpoint: str, job: dict[str, Any], *, timeout_s: float = 30.0) -> list[bytes] | None:
    """One REQ round trip; None when no reply came within ``timeout_s``."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps(job).encode())
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply: list[bytes] = sock.recv_multipart()
        return reply
    finally:
        sock.close(linger=0)


def _warm(frontend: str, job: dict[str, Any], admin: redis.Redis, names: list[str]) -> str:
    """Send views until every host's worker beats; the identity ``uid:gid``."""
    deadline = time.monotonic() + WARM_S
    while time.monotonic() < deadline:
        reply = _request(frontend, {**job, "xsize": 256}, timeout_s=20.0)
        if reply is None or reply[0] != b"":
            raise RuntimeError(f"warm-up view failed: {reply!r:.300}")
        for key in admin.scan_iter(f"{keys.HEARTBEAT}:*"):
            parts = key.decode().split(":")
            if len(parts) == 4:  # the hosts set of one identity
                identity = f"{parts[2]}:{parts[3]}"
                if _beating(admin, identity) == names:
                    return identity
        time.sleep(0.1)
    raise RuntimeError(f"not every host beats after {WARM_S} s")


def _beating(admin: redis.Redis, identity: str) -> list[str]:
    """Hosts whose worker of ``identity`` has a live heartbeat."""
    uid, gid = (int(x) for x in identity.split(":"))
    hosts = sorted(h.decode() for h in admin.smembers(keys.heartbeat_hosts_key(uid, gid)))
    return [h for h in hosts if admin.exists(keys.heartbeat_key(uid, gid, h))]


def _stats(admin: redis.Redis, gid: int) -> dict[str, int]:
    names = ("computed", "hits")
    values = admin.mget([keys.stats_key(gid, n) for n in names])
    return {n: int(v or 0) for n, v in zip(names, values, strict=True)}


def _kill_all(host: Host) -> int:
    """SIGKILL every process of ``host`` until none is left; how many there were."""
    killed: set[int] = set()
    for _ in range(50):
        pids = [p for p in host.pids() if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    if host.stack is not None:
        for comp in host.stack.components:
            with contextlib.suppress(ChildProcessError):
                comp.process.wait(timeout=5)
    return len(killed)


def _descendants(roots: list[int]) -> list[int]:
    """Pids whose ancestry (ppid chain) leads to one of ``roots`` (a host without netns;
    the supervisor re-parents its workers to itself)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
                if state != "Z":  # dead already, waiting to be reaped
                    parents[int(entry.name)] = int(ppid)
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return sorted(found)


def _wait(
    predicate: Any, timeout_s: float, poke: tuple[str, dict[str, Any]] | None = None
) -> float | None:
    """time.monotonic() when ``predicate()`` held, None after ``timeout_s``; ``poke``
    sends a view now and then (a host's worker starts on its bridge's first request)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        if poke is not None:
            _request(poke[0], {**poke[1], "xsize": 180}, timeout_s=10.0)
        time.sleep(0.05)
    return None


def _count_answers(log: Path) -> int:
    """Requests a bridge answered with success, from its request log lines."""
    if not log.exists():
        return 0
    return log.read_text(errors="replace").count(" outcome=ok ")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


@dataclass
class Broker:
    """The broker host's endpoints and processes."""

    url: str
    frontend: str
    backend: str
    pids: dict[str, int]
    sentinels: str | None = None  # IS_REDIS_SENTINELS
    session_url: str | None = None  # a session store of its own (with Sentinel)
    primary: subprocess.Popen[bytes] | None = None
    replica_port: int = 0
    sentinel_port: int = 0
    ip: str = "127.0.0.1"

    def promoted(self) -> bool:
        """Whether the sentinel names the replica as the master now."""
        client = redis.Redis(host=self.ip, port=self.sentinel_port, socket_timeout=1.0)
        try:
            addr = client.execute_command("SENTINEL", "get-master-addr-by-name", "is")  # type: ignore[no-untyped-call]
            return bool(addr) and int(addr[1]) == self.replica_port
        except redis.RedisError:
            return False
        finally:
            client.close()


@contextlib.contextmanager
def _broker(ip: str, run: Path, *, sentinel: bool = False) -> Iterator[Broker]:
    """The broker host: a redis-server and an is-proxy bound to ``ip``; with
    ``sentinel``, also a replica, a sentinel and a session store of its own."""
    run.mkdir(parents=True, exist_ok=True)
    ports = [16379, 17001, 17002, 16380, 26379, 16381]
    if ip == "127.0.0.1":
        from ops.redisserver import free_port

        ports = [free_port() for _ in ports]
    port, front, back, replica_port, sentinel_port, session_port = ports
    # Reached from other hosts: a password, as any Redis off loopback needs.
    password = secrets.token_hex(16)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(run / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def redis_server(name: str, at: int, *extra: str) -> subprocess.Popen[bytes]:
        return spawn(name, ["redis-server", "--port", str(at), "--bind", ip, "--save", "",
                            "--appendonly", "no", "--requirepass", password,
                            "--masterauth", password, "--dir", str(run),
                            "--dbfilename", f"{name}.rdb", *extra])  # fmt: skip

    server = redis_server("redis", port)
    frontend, backend = f"tcp://{ip}:{front}", f"tcp://{ip}:{back}"
    argv = ["--frontend", frontend, "--backend", backend]
    code = f"from bridge.proxy import main; raise SystemExit(main({argv!r}))"
    proxy = spawn("proxy", [sys.executable, "-c", code])
    url = f"redis://:{password}@{ip}:{port}/0"
    broker = Broker(url, frontend, backend, {"redis": server.pid, "proxy": proxy.pid}, ip=ip)
    try:
        if _wait(lambda: _pings(url), 10.0) is None:
            raise RuntimeError("broker redis-server did not come up")
        if sentinel:
            redis_server("replica", replica_port, "--replicaof", ip, str(port))
            redis_server("sessions", session_port)
            conf = run / "sentinel.conf"
            conf.write_text(
                f"port {sentinel_port}\nbind {ip}\nprotected-mode no\ndir {run}\n"
                f"sentinel monitor is {ip} {port} 1\nsentinel auth-pass is {password}\n"
                "sentinel down-after-milliseconds is 1000\n"
                "sentinel failover-timeout is 5000\n"
            )
            spawn("sentinel", ["redis-server", str(conf), "--sentinel"])
            broker.sentinels = f"{ip}:{sentinel_port}"
            broker.session_url = f"redis://:{password}@{ip}:{session_port}/0"
            broker.primary, broker.replica_port = server, replica_port
            broker.sentinel_port = sentinel_port
            replica = f"redis://:{password}@{ip}:{replica_port}/0"
            for what in (replica, broker.session_url):
                if _wait(lambda u=what: _pings(u), 10.0) is None:  # type: ignore[misc]
                    raise RuntimeError(f"{what} did not come up")
            if _wait(lambda: _replicating(replica), 15.0) is None:
                raise RuntimeError("the replica did not sync")
        yield broker
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _replicating(url: str) -> bool:
    try:
        info = redis.Redis.from_url(url, socket_connect_timeout=0.5).info("replication")
    except redis.RedisError:
        return False
    return info.get("master_link_status") == "up"


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
