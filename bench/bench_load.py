"""Load (issue 6): 16 is.js-style clients for 60 s over 4 identities, plus one long index.

The service runs as ``isctl up`` runs it (:class:`ops.stack.Stack`: own redis-server,
supervisor forking one worker per identity, bridge behind an is-proxy). As root the
identities are 4 real accounts (``tests.accounts.Accounts``: useradd, removed after);
otherwise 4 sessions of the current user, which all map to one identity (a row says so).

Each client is a thread with its own REQ socket (as is.js has), asking one request at a
time, drawn at random: warm views (frames whose reduced image is cached), cold views
(a frame and size never asked before: read, decompress, reduce) and spots. Every job
carries a unique ``tag`` that the reply echoes: a reply with another request's tag is
a duplicated or misrouted reply (a REQ socket hands a stale reply to the next request).
One more client sends a single ``index`` whose stand-in indexer runs for most of the run.

The reduced-image cache is a Redis of its own with a memory budget and LRU eviction, as
in production. Before the clock starts every identity's warm set is cached and its in-process LRU is
filled past its budget (``IS_LRU_MAX_BYTES``, set small), then the same load runs for a
warm-up (30 s) that counts for lost and duplicated replies but not for latency or memory:
the workers' RSS climbs to its high-water mark in the first ~50 s of load (allocator
arenas of their threads) and stays there. RSS of the bridge, proxy, supervisor and every
worker is sampled every few seconds; growth compares the last third of the measured
samples with the first third.

Run: ``.venv/bin/python -m bench load``; ``IS_BENCH_LOAD_S`` sets the duration (60 s).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import zmq

from bench.bench_e2e import data_directory, percentiles, start_stack, stop_stack, worker_pids
from istasks.settings import Settings
from ops.client import request
from ops.redisserver import start_redis
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger

if TYPE_CHECKING:  # imported when run: tests/test_load.py must not load it at collection,
    from tests.accounts import Accounts  # where pytest registers it as a plugin later

#: Environment variable with the run's length in seconds (a bench knob, not a setting).
DURATION_ENV = "IS_BENCH_LOAD_S"
DEFAULT_DURATION_S = 60.0
REPLY_TIMEOUT_S = 30.0
SAMPLE_S = 2.0
#: Warm views: these frames at this size, cached before the clock starts.
WARM_FRAMES = 4
WARM_XSIZE = 512
#: Per worker; small, so that the warm-up fills it and the run shows real growth only.
LRU_BUDGET_BYTES = 32 * 2**20
#: Share of each request kind (the rest of the draw is spots).
WARM_SHARE = 0.6
COLD_SHARE = 0.25
#: The reduced-image cache runs apart, as in production (ops/redis/cache.conf): ~250
#: cold 4 MB views a minute would otherwise grow one Redis without bound for an hour.
CACHE_REDIS_ARGS = ("--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru")
#: Growth over the run (after its first quarter) that still counts as flat.
MEMORY_GROWTH_TARGET_PCT = 5.0

INDEXER = """#!/bin/bash
# Stand-in for rapd.index: runs for a fixed time, then answers.
while [ $# -gt 0 ]; do
  case "$1" in --json-fd) J=$2; shift;; esac
  shift
done
sleep {seconds:g}
echo '{{"spacegroup":"P1"}}' >&$J
"""


@dataclass(frozen=True)
class LoadConfig:
    """One load run: its size and its data."""

    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = 30.0  # the same load first, not measured (allocators settle)
    clients: int = 16
    identities: int = 4
    shape: tuple[int, int] = (2167, 2070)  # Eiger 4M
    nimages: int = 32
    index_share: float = 0.75  # of the run the long index takes


@dataclass
class Counts:
    """What the clients saw (merged under ``lock``)."""

    sent: int = 0
    measured: int = 0  # answered requests sent after the warm-up
    lost: int = 0
    duplicated: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, other: Counts) -> None:
        with self.lock:
            self.sent += other.sent
            self.measured += other.measured
            self.lost += other.lost
            self.duplicated += other.duplicated
            self.errors += other.errors
            self.error_samples += other.error_samples[: 5 - len(self.error_samples)]
            for kind, samples in other.latencies_ms.items():
                self.latencies_ms.setdefault(kind, []).extend(samples)


@dataclass
class User:
    """One identity's session and its supply of never-asked (frame, xsize) pairs."""

    pid: str
    cold: Iterator[tuple[int, int]]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_cold(self) -> tuple[int, int]:
        with self.lock:
            return next(self.cold)


@dataclass
class Scene:
    """The running stack, its dataset and the users asking."""

    stack: Stack
    master: Path
    users: list[User]
    config: LoadConfig
    real_accounts: bool

    def job(self, user: User, kind: str, rng: random.Random, tag: str) -> dict[str, Any]:
        """A request of ``kind`` ("warm", "cold", "spots") by ``user``."""
        base = {"pid": user.pid, "esaf": 0, "fn": str(self.master), "tag": tag}
        if kind == "cold":
            frame, xsize = user.next_cold()
            return {**base, "type": "jpeg", "frame": frame, "xsize": xsize}
        frame = rng.randint(1, WARM_FRAMES)
        if kind == "spots":
            return {**base, "type": "spots", "frame": frame}
        # A random contrast: the reduced image is cached, the JPEG is rendered anew.
        return {**base, "type": "jpeg", "frame": frame, "xsize": WARM_XSIZE,
                "contrast": rng.randint(50, 500)}  # fmt: skip


def cold_views(config: LoadConfig) -> Iterator[tuple[int, int]]:
    """(frame, xsize) pairs never asked before: frames past the warm set, sizes 1000, 998..."""
    frames = range(WARM_FRAMES + 1, config.nimages + 1)
    for xsize in range(1000, 64, -2):
        for frame in frames:
            yield frame, xsize


# -- clients -----------------------------------------------------------------------------


@dataclass
class ClientSpec:
    """One client thread: who it asks as, until when, and its random draw."""

    scene: Scene
    user: User
    name: str
    measure_from: float  # time.monotonic(): latencies count from here
    stop_at: float
    seed: int


def client_loop(spec: ClientSpec, totals: Counts) -> None:
    """One REQ socket, one request at a time until ``stop_at`` (is.js's pattern)."""
    rng = random.Random(spec.seed)
    counts = Counts()
    sock: zmq.Socket[Any] | None = None
    for n in itertools.count():
        if time.monotonic() >= spec.stop_at:
            break
        sock = sock or req_socket(spec.scene.stack.endpoint)
        draw = rng.random()
        kind = (
            "warm" if draw < WARM_SHARE else "cold" if draw < WARM_SHARE + COLD_SHARE else "spots"
        )
        tag = f"{spec.name}-{n}"
        measured = time.monotonic() >= spec.measure_from
        reply, elapsed_ms = exchange(sock, spec.scene.job(spec.user, kind, rng, tag))
        counts.sent += 1
        if reply is None:
            counts.lost += 1
            sock.close(linger=0)
            sock = None  # a REQ socket that timed out is stuck: is.js reconnects
            continue
        if _judge(reply, kind, tag, counts) and measured:
            counts.measured += 1
            counts.latencies_ms.setdefault(kind, []).append(elapsed_ms)
    if sock is not None:
        sock.close(linger=0)
    totals.merge(counts)


def req_socket(endpoint: str) -> zmq.Socket[Any]:
    """A REQ socket to ``endpoint``, kept for many requests as is.js keeps its own."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def exchange(sock: zmq.Socket[Any], job: dict[str, Any]) -> tuple[list[bytes] | None, float]:
    """(reply frames or None after REPLY_TIMEOUT_S, round trip in ms)."""
    started = time.perf_counter()
    sock.send(json.dumps(job).encode())
    if not sock.poll(int(REPLY_TIMEOUT_S * 1000), zmq.POLLIN):
        return None, 0.0
    reply: list[bytes] = sock.recv_multipart()
    return reply, (time.perf_counter() - started) * 1000


def _judge(reply: list[bytes], kind: str, tag: str, counts: Counts) -> bool:
    """Count one reply; True when it is the right, complete answer to this request."""
    if len(reply) == 1 or reply[0] != b"":
        counts.errors += 1
        counts.error_samples.append(reply[0][:200].decode(errors="replace"))
        return False
    echo = json.loads(reply[1])
    if echo.get("tag") != tag:
        counts.duplicated += 1  # another request's reply: a duplicate or a misroute
        return False
    if len(reply) != (3 if kind == "spots" else 4) or "error" in echo:
        counts.errors += 1
        counts.error_samples.append(str(echo.get("error", f"{len(reply)} frames"))[:200])
        return False
    return True


def index_client(scene: Scene, stop_at: float, result: dict[str, Any]) -> None:
    """The one long ``index``: its reply and how long it took."""
    job = {"type": "index", "pid": scene.users[0].pid, "esaf": 0,
           "fn1": str(scene.master), "tag": "long-index"}  # fmt: skip
    started = time.monotonic()
    timeout_s = stop_at - started + REPLY_TIMEOUT_S + 30
    try:
        frames = request(scene.stack.endpoint, job, timeout_s=timeout_s)
    except TimeoutError:
        result.update(ok=False, seconds=time.monotonic() - started, reply="lost")
        return
    ok = len(frames) == 3 and frames[0] == b"" and json.loads(frames[1])["tag"] == "long-index"
    result.update(ok=ok, seconds=time.monotonic() - started, reply=frames[-1][:200])


# -- memory --------------------------------------------------------------------------------


class MemorySampler:
    """RSS (MiB) of every service process every :data:`SAMPLE_S`, from start to stop."""

    def __init__(self, stack: Stack, redis_urls: dict[str, str]) -> None:
        self.stack = stack
        self.redis_urls = redis_urls  # name -> URL of each Redis server (used_memory)
        self.samples: list[tuple[float, dict[str, float]]] = []  # (seconds, name -> MiB)
        self.redis_mb: list[dict[str, float]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take a last sample and end."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        admins = {name: redis.Redis.from_url(url) for name, url in self.redis_urls.items()}
        started = time.monotonic()
        try:
            while True:
                self.samples.append((time.monotonic() - started, self._rss()))
                self.redis_mb.append(
                    {n: int(r.info("memory")["used_memory"]) / 2**20 for n, r in admins.items()}
                )
                if self._stopping.wait(SAMPLE_S):
                    return
        finally:
            for admin in admins.values():
                admin.close()

    def _rss(self) -> dict[str, float]:
        pids = {c.name: c.process.pid for c in self.stack.components if c.name != "flower"}
        pids |= {f"worker {queue}": pid for queue, pid in worker_pids(self.stack).items()}
        return {name: rss_mb(pid) for name, pid in pids.items()}


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_rows(sampler: MemorySampler, warmup_s: float) -> list[dict[str, Any]]:
    """Growth (mean of the last third of the samples against the first third) and slope
    of the service's total RSS after the warm-up, and each process's first and last RSS."""
    steady = [(t, s) for t, s in sampler.samples if t >= warmup_s] or sampler.samples
    totals = [(t, sum(s.values())) for t, s in steady]
    k = max(1, len(totals) // 3)
    first = sum(v for _, v in totals[:k]) / k
    last = sum(v for _, v in totals[-k:]) / k
    names = sorted(steady[-1][1])
    rows = [
        {"name": f"memory growth, {len(names)} processes (after the warm-up)",
         "target": MEMORY_GROWTH_TARGET_PCT, "measured": (last - first) / first * 100,
         "unit": "%"},
        {"name": "memory slope, service total", "target": "",
         "measured": _slope_per_min(totals), "unit": "MiB/min"},
    ]  # fmt: skip
    for name in names:
        begin = steady[0][1].get(name, 0.0)
        rows.append({"name": f"RSS {name} (first {begin:.0f} MiB)", "target": "",
                     "measured": steady[-1][1].get(name, 0.0), "unit": "MiB"})  # fmt: skip
    for name in sampler.redis_urls:
        first_mb, last_mb = sampler.redis_mb[0][name], sampler.redis_mb[-1][name]
        rows.append({"name": f"used_memory {name} (first {first_mb:.0f} MiB)", "target": "",
                     "measured": last_mb, "unit": "MiB"})  # fmt: skip
    return rows


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) in MiB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60 if var else 0.0


# -- the run -------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """Everything one run measured."""

    config: LoadConfig
    counts: Counts
    elapsed_s: float
    index: dict[str, Any]
    sampler: MemorySampler
    real_accounts: bool


def prepare(scene: Scene) -> None:
    """Start every worker, cache the warm set and spots, fill each LRU past its budget."""
    rng = random.Random(0)
    largest_reduced_bytes = 4 * 1000 * 1000  # cold views are <= 1000 px, 4-byte pixels
    fill = 2 * LRU_BUDGET_BYTES // largest_reduced_bytes
    for user in scene.users:
        jobs = [{**scene.job(user, "warm", rng, "prep"), "frame": f} for f in range(1, 5)]
        jobs += [{**scene.job(user, "spots", rng, "prep"), "frame": f} for f in range(1, 5)]
        jobs += [scene.job(user, "cold", rng, "prep") for _ in range(fill)]
        for job in jobs:
            frames = request(scene.stack.endpoint, job, timeout_s=REPLY_TIMEOUT_S)
            if frames[0] != b"":
                raise RuntimeError(f"warm-up request failed: {frames[0][:200]!r}")


def run_load(scene: Scene, redis_urls: dict[str, str]) -> LoadReport:
    """The clients, the long index and the memory sampler, for ``duration_s``."""
    config = scene.config
    counts = Counts()
    sampler = MemorySampler(scene.stack, redis_urls)
    index: dict[str, Any] = {}
    measure_from = time.monotonic() + config.warmup_s
    stop_at = measure_from + config.duration_s
    specs = [ClientSpec(scene, scene.users[n % len(scene.users)], f"c{n}", measure_from,
                        stop_at, n) for n in range(config.clients)]  # fmt: skip
    threads = [threading.Thread(target=client_loop, args=(spec, counts)) for spec in specs]
    sampler.start()
    for thread in threads:
        thread.start()
    time.sleep(config.warmup_s)
    index_thread = threading.Thread(target=index_client, args=(scene, stop_at, index))
    index_thread.start()
    for thread in [*threads, index_thread]:
        thread.join()
    elapsed_s = time.monotonic() - measure_from
    sampler.stop()
    return LoadReport(config, counts, elapsed_s, index, sampler, scene.real_accounts)


def open_users(stack: Stack, config: LoadConfig, accounts: Accounts) -> tuple[list[User], bool]:
    """One session per identity: new accounts as root, else the current user's sessions."""
    if accounts.can_create:
        names = [accounts.user().name for _ in range(config.identities)]
    else:
        names = [dev_user()] * config.identities
    users = [User(stack.add_session([0], user=name), cold_views(config)) for name in names]
    return users, accounts.can_create


def write_data(directory: Path, config: LoadConfig) -> Path:
    """The dataset and the stand-in indexer, world-readable (workers run as the users)."""
    master = write_eiger(directory, "load", nimages=config.nimages, frames_per_file=8,
                         shape=config.shape, seed=11)  # fmt: skip
    indexer = directory / "index.sh"
    indexer.write_text(INDEXER.format(seconds=config.duration_s * config.index_share))
    for item in directory.iterdir():
        item.chmod(0o755 if item == indexer else 0o644)
    return master


def measure(config: LoadConfig) -> LoadReport:
    """Start the service, prepare, run, stop; the report (raises if a component died)."""
    from tests.accounts import Accounts

    data = data_directory("is-bench-load-")
    accounts = Accounts()
    stack: Stack | None = None
    cache = start_redis(extra_args=CACHE_REDIS_ARGS)
    try:
        master = write_data(data, config)
        settings = Settings(
            cache_url=cache.url,
            indexer_command=str(data / "index.sh"),
            index_timeout_s=config.duration_s + 60,
            lru_max_bytes=LRU_BUDGET_BYTES,
            worker_idle_s=600,
            view_timeout_s=REPLY_TIMEOUT_S - 5,
        )
        stack = start_stack(settings)
        users, real = open_users(stack, config, accounts)
        scene = Scene(stack, master, users, config, real)
        prepare(scene)
        redis_urls = {"redis (broker, results, sessions)": stack.redis_url,
                      f"cache redis ({' '.join(CACHE_REDIS_ARGS)})": cache.url}  # fmt: skip
        report = run_load(scene, redis_urls)
        if dead := stack.dead():
            raise RuntimeError(f"components died during the load run: {dead}")
        return report
    finally:
        if stack is not None:
            stop_stack(stack)  # first: userdel refuses accounts with running processes
        accounts.cleanup()
        cache.stop()
        shutil.rmtree(data, ignore_errors=True)


def report_rows(report: LoadReport) -> list[dict[str, Any]]:
    """The table: requests, losses, latencies by kind, throughput, memory."""
    c, config = report.counts, report.config
    who = (f"{config.identities} accounts" if report.real_accounts
           else f"1 account, {config.identities} sessions (not root)")  # fmt: skip
    label = (f"load {config.clients} clients x {config.duration_s:g} s "
             f"(+{config.warmup_s:g} s warm-up), {who}")  # fmt: skip
    rows: list[dict[str, Any]] = [
        {"name": f"{label}: requests (all)", "target": "", "measured": c.sent,
         "unit": "requests"},
        {"name": "load: lost replies", "target": 0, "measured": c.lost, "unit": "replies"},
        {"name": "load: duplicated or misrouted replies", "target": 0,
         "measured": c.duplicated, "unit": "replies"},
        {"name": "load: error replies" + (f" (e.g. {c.error_samples[0]!r:.80})"
                                          if c.error_samples else ""),
         "target": 0, "measured": c.errors, "unit": "replies"},
        {"name": "load: throughput (after the warm-up)", "target": "",
         "measured": c.measured / report.elapsed_s, "unit": "replies/s", "better": "higher"},
    ]  # fmt: skip
    for kind in ("warm", "cold", "spots"):
        samples = c.latencies_ms.get(kind, [])
        if samples:
            p50, p99 = percentiles(samples)
            rows.append({"name": f"load: {kind} p50 (n={len(samples)})", "target": "",
                         "measured": p50, "unit": "ms"})  # fmt: skip
            rows.append({"name": f"load: {kind} p99", "target": "", "measured": p99,
                         "unit": "ms"})  # fmt: skip
    rows.append(index_row(report))
    return rows + memory_rows(report.sampler, config.warmup_s)


def index_row(report: LoadReport) -> dict[str, Any]:
    """How long the one long index took, and whether its reply was right."""
    index, config = report.index, report.config
    indexer_s = config.duration_s * config.index_share
    outcome = "ok" if index.get("ok") else f"NOT ok: {index.get('reply')!r:.80}"
    return {"name": f"load: long index ({indexer_s:g} s indexer), reply {outcome}",
            "target": "", "measured": index.get("seconds", float("nan")), "unit": "s"}  # fmt: skip


def duration_from_env() -> float:
    """``IS_BENCH_LOAD_S`` (seconds), default :data:`DEFAULT_DURATION_S`."""
    raw = os.environ.get(DURATION_ENV, "")
    return float(raw) if raw else DEFAULT_DURATION_S


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    return report_rows(measure(LoadConfig(duration_s=duration_from_env())))


if __name__ == "__main__":
    for result in run():
        print(result)
