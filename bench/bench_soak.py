"""Soak (issue 15): memory stays bounded on a host however many users are active.

16 identities (accounts made here as root, removed after; otherwise sessions of the
current user, which map to one identity, and a row says so), one is.js-style client each,
view Eiger2 16M datasets (12 copies of one dataset x 4 frames: each copy is a new file
version, hence new cache keys) at 6 sizes (384-1500 px), a third of them zoom tiles, each
with a new contrast, for ``IS_BENCH_SOAK_S`` seconds (600). Every 5 s it samples the
Redis servers' ``used_memory``, the cache budget's bytes (istasks.cache_budget) and the
workers' PSS in all (the supervisor's status). It reports the failures (target 0), p99
per minute, and the highest Redis memory and worker PSS against their budgets, and writes
a PNG chart of memory and latency over time per layout (``bench/results/soak-*.png``).

Two layouts (``IS_BENCH_SOAK_LAYOUT``: ``one``, ``two`` or ``both``, the default): one
redis-server without ``maxmemory`` for everything (a site's existing Redis: only the
service's own cache budget bounds it), and the two instances of ``ops/redis`` (broker
``noeviction``, cache ``allkeys-lru``; their sizes scaled to this run's budgets).
Not part of ``make bench`` (minutes): ``python -m bench soak``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import zmq

from bench.bench_e2e import data_directory, start_stack, stop_stack
from istasks.cache_budget import cache_usage
from istasks.settings import Settings
from ops.redisserver import RedisProcess, start_redis
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger2_16m
from queues.pool import SupervisorClient

if TYPE_CHECKING:
    from tests.accounts import Accounts

DURATION_ENV = "IS_BENCH_SOAK_S"
LAYOUT_ENV = "IS_BENCH_SOAK_LAYOUT"
IDENTITIES_ENV = "IS_BENCH_SOAK_IDENTITIES"
DEFAULT_DURATION_S = 600.0
MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_S = 5.0
REPLY_TIMEOUT_S = 30.0
DATASETS = 12
FRAMES = 4
SIZES = (384, 512, 768, 1024, 1280, 1500)
ZOOM_SHARE = 1 / 3
#: The budgets under test: the cache's bytes in Redis (all ESAFs) and all workers' memory.
CACHE_MAX_BYTES = 256 * MIB
#: 320 MiB a worker: its base (queues.budget.WORKER_BASE_BYTES, one 16M request's working
#: set included) and 64 MiB of caches.
WORKERS_MAX_BYTES = 16 * 320 * MIB
#: Redis holds more than the cache's images: queues, results, sessions, the budget's
#: index, and the buffers of writes in flight (up to 16 workers each sending a 9 MB
#: 1500 px image at once).
REDIS_OVERHEAD_BYTES = 128 * MIB
#: ops/redis/broker.conf and cache.conf, the cache scaled to this run (its 4 GB would
#: never be reached in minutes: here the instance's own LRU and ours both act).
BROKER_ARGS = ("--maxmemory", "1gb", "--maxmemory-policy", "noeviction")
CACHE_ARGS = ("--maxmemory", "384mb", "--maxmemory-policy", "allkeys-lru")


@dataclass
class Samples:
    """What the run saw, over time (seconds since the start)."""

    latencies: list[tuple[float, float]] = field(default_factory=list)  # (t, ms)
    failures: list[tuple[float, str]] = field(default_factory=list)
    memory: list[dict[str, float]] = field(default_factory=list)  # t, redis MiB, pss MiB...
    recycled: int = 0
    evictions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def run() -> list[dict[str, Any]]:
    """Rows for ``python -m bench soak`` (see the module docstring)."""
    duration_s = float(os.environ.get(DURATION_ENV, DEFAULT_DURATION_S))
    identities = int(os.environ.get(IDENTITIES_ENV, "16"))
    layout = os.environ.get(LAYOUT_ENV, "both")
    layouts = ["one", "two"] if layout == "both" else [layout]
    data = data_directory("is-bench-soak-")
    try:
        masters = write_datasets(data)
        rows: list[dict[str, Any]] = []
        for name in layouts:
            rows += soak(name, masters, duration_s, identities)
        return rows
    finally:
        shutil.rmtree(data, ignore_errors=True)


def write_datasets(data: Path) -> list[Path]:
    """One 16M dataset of 4 frames, copied: each copy is a dataset of its own to the cache."""
    first = write_eiger2_16m(data / "ds00", "soak", nimages=FRAMES, frames_per_file=FRAMES, seed=5)
    for n in range(1, DATASETS):
        shutil.copytree(first.parent, data / f"ds{n:02d}")
    for item in data.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)
    return [data / f"ds{n:02d}" / first.name for n in range(DATASETS)]


def soak(layout: str, masters: list[Path], duration_s: float, identities: int) -> list[dict]:
    """One layout: start its Redis servers and the service, run the clients, report."""
    from tests.accounts import Accounts

    servers: list[RedisProcess] = []
    accounts = Accounts()
    stack: Stack | None = None
    try:
        if layout == "one":
            servers.append(start_redis())  # no maxmemory: a site's shared Redis
            urls = {"redis (everything, no maxmemory)": servers[0].url}
            settings = Settings(redis_url=servers[0].url)
        else:
            servers += [start_redis(extra_args=BROKER_ARGS), start_redis(extra_args=CACHE_ARGS)]
            urls = {"broker redis (noeviction)": servers[0].url,
                    "cache redis (allkeys-lru 384mb)": servers[1].url}  # fmt: skip
            settings = Settings(redis_url=servers[0].url, cache_url=servers[1].url)
        settings = dataclasses.replace(
            settings, cache_max_bytes=CACHE_MAX_BYTES, workers_max_bytes=WORKERS_MAX_BYTES,
            worker_idle_s=900.0, worker_max=max(64, identities),
            view_timeout_s=REPLY_TIMEOUT_S - 5,
        )  # fmt: skip
        stack = start_stack(settings)
        pids, real = open_sessions(stack, identities, accounts)
        samples = drive(stack, settings, masters, pids, urls=urls, duration_s=duration_s)
        if dead := stack.dead():
            raise RuntimeError(f"components died during the soak: {dead}")
        chart = RESULTS / f"soak-{layout}.png"
        draw_chart(samples, urls, chart, layout)
        who = f"{identities} accounts" if real else f"1 account, {identities} sessions (not root)"
        return report(layout, samples, urls, who=who, chart=chart)
    finally:
        if stack is not None:
            stop_stack(stack)  # first: userdel refuses accounts with running processes
        accounts.cleanup()
        for server in servers:
            server.stop()


def open_sessions(stack: Stack, identities: int, accounts: Accounts) -> tuple[list[str], bool]:
    """One session per identity: new accounts as root, else the current user's."""
    names = [accounts.user().name if accounts.can_create else dev_user() for _ in range(identities)]
    return [stack.add_session([0], user=name) for name in names], accounts.can_create


@dataclass
class Soak:
    """One layout's run: the service, its data and sessions, its Redis servers, the clock."""

    stack: Stack
    settings: Settings
    masters: list[Path]
    urls: dict[str, str]  # name -> URL of each Redis server
    started: float
    stop_at: float
    samples: Samples = field(default_factory=Samples)


def drive(
    stack: Stack, settings: Settings, masters: list[Path], pids: list[str], *,
    urls: dict[str, str], duration_s: float,
) -> Samples:  # fmt: skip
    """The clients and the sampler, for ``duration_s``."""
    started = time.monotonic()
    soak = Soak(stack, settings, masters, urls, started, started + duration_s)
    threads = [
        threading.Thread(target=client, args=(soak, pid, n), daemon=True)  # die with a ^C
        for n, pid in enumerate(pids)
    ]
    threads.append(threading.Thread(target=sample_memory, args=(soak,), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return soak.samples


def view(masters: list[Path], pid: str, rng: random.Random, tag: str) -> dict[str, Any]:
    """A mixed view: any dataset and frame, one of 6 sizes, a third zoom tiles, a new
    contrast each time."""
    job: dict[str, Any] = {
        "type": "jpeg", "pid": pid, "esaf": 0, "tag": tag, "fn": str(rng.choice(masters)),
        "frame": rng.randint(1, FRAMES), "xsize": rng.choice(SIZES),
        "contrast": rng.randint(20, 2000),
    }  # fmt: skip
    if rng.random() < ZOOM_SHARE:
        zoom = rng.choice((2, 4))
        job |= {"zoom": zoom, "segcol": rng.randrange(zoom) / zoom,
                "segrow": rng.randrange(zoom) / zoom}  # fmt: skip
    return job


def client(soak: Soak, pid: str, n: int) -> None:
    """One REQ socket, one request at a time (is.js's pattern)."""
    rng = random.Random(n)
    sock: zmq.Socket[Any] | None = None
    count = 0
    while time.monotonic() < soak.stop_at:
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(soak.stack.endpoint)
        count += 1
        tag = f"c{n}-{count}"
        sent = time.monotonic()
        sock.send(json.dumps(view(soak.masters, pid, rng, tag)).encode())
        if sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            failure = judge(sock.recv_multipart(), tag)
        else:
            failure = "lost"
            sock.close(linger=0)
            sock = None  # a REQ socket that timed out is stuck: is.js reconnects
        now = time.monotonic()
        with soak.samples.lock:
            if failure is None:
                soak.samples.latencies.append((now - soak.started, (now - sent) * 1000))
            else:
                soak.samples.failures.append((now - soak.started, failure))
    if sock is not None:
        sock.close(linger=0)


def judge(reply: list[bytes], tag: str) -> str | None:
    """None for the right, complete view; else what was wrong."""
    if len(reply) != 4 or reply[0] != b"":
        return reply[0][:200].decode(errors="replace") if reply else "empty"
    echo = json.loads(reply[1])
    if echo.get("tag") != tag:
        return "another request's reply"
    if "error" in echo or not reply[2]:
        return f"blank: {echo.get('error')}"[:200]
    return None


def sample_memory(soak: Soak) -> None:
    """Redis used_memory per server, the cache budget's bytes, the workers' PSS."""
    admins = {name: redis.Redis.from_url(url) for name, url in soak.urls.items()}
    cache = redis.Redis.from_url(soak.settings.cache or "")
    stack = soak.stack
    supervisor = SupervisorClient(stack.settings, socket_path=stack.env["IS_SUPERVISOR_SOCKET"])
    try:
        while True:
            point = {"t": time.monotonic() - soak.started}
            for name, admin in admins.items():
                point[name] = int(admin.info("memory")["used_memory"]) / MIB
            usage = cache_usage(cache, CACHE_MAX_BYTES)
            point["cache budget used"] = usage.used_bytes / MIB
            memory = supervisor.status()["memory"]
            point["workers' PSS"] = memory["pss_bytes"] / MIB
            with soak.samples.lock:
                soak.samples.memory.append(point)
                soak.samples.recycled, soak.samples.evictions = memory["recycled"], usage.evictions
            if time.monotonic() >= soak.stop_at:
                return
            time.sleep(SAMPLE_S)
    finally:
        for admin in [*admins.values(), cache]:
            admin.close()
        supervisor.close()


def per_minute_p99(samples: Samples) -> list[tuple[int, int, float]]:
    """(minute, n, p99 ms) of the successful views of each minute."""
    minutes: dict[int, list[float]] = {}
    for t, ms in samples.latencies:
        minutes.setdefault(int(t // 60), []).append(ms)
    out = []
    for minute, values in sorted(minutes.items()):
        values.sort()
        out.append((minute, len(values), values[min(len(values) - 1, int(len(values) * 0.99))]))
    return out


def report(
    layout: str, samples: Samples, urls: dict[str, str], *, who: str, chart: Path
) -> list[dict[str, Any]]:
    """The table rows of one layout (``who``: the accounts behind the identities)."""
    tag = f"soak [{layout} redis] "
    total = len(samples.latencies) + len(samples.failures)
    rows: list[dict[str, Any]] = [
        {"name": f"{tag}views, {who}, chart {chart.name}", "target": "", "measured": total,
         "unit": "requests"},
        {"name": f"{tag}failed views (lost, error or blank)"
                 + (f", e.g. {samples.failures[0][1]}" if samples.failures else ""),
         "target": 0, "measured": len(samples.failures), "unit": "requests"},
    ]  # fmt: skip
    for minute, n, p99 in per_minute_p99(samples):
        rows.append({"name": f"{tag}p99 minute {minute + 1} (n={n})", "target": "",
                     "measured": p99, "unit": "ms"})  # fmt: skip
    after_first = [p for p in samples.memory if p["t"] >= 60] or samples.memory
    second_half = [p for p in samples.memory if p["t"] >= samples.memory[-1]["t"] / 2]
    redis_budget = (CACHE_MAX_BYTES + REDIS_OVERHEAD_BYTES) / MIB
    for name in urls:
        rows.append({"name": f"{tag}highest used_memory, {name}", "target": redis_budget,
                     "measured": max(p[name] for p in samples.memory), "unit": "MiB"})  # fmt: skip
        rows.append({"name": f"{tag}used_memory slope, second half, {name}", "target": "",
                     "measured": slope_per_min(second_half, name), "unit": "MiB/min"})  # fmt: skip
    rows += [
        {"name": f"{tag}highest cache budget used", "target": CACHE_MAX_BYTES / MIB,
         "measured": max(p["cache budget used"] for p in samples.memory), "unit": "MiB"},
        {"name": f"{tag}images evicted for the budget", "target": "",
         "measured": samples.evictions, "unit": ""},
        {"name": f"{tag}highest workers' PSS in all (after minute 1)",
         "target": WORKERS_MAX_BYTES / MIB,
         "measured": max(p["workers' PSS"] for p in after_first), "unit": "MiB"},
        {"name": f"{tag}workers' PSS slope, second half", "target": "",
         "measured": slope_per_min(second_half, "workers' PSS"), "unit": "MiB/min"},
        {"name": f"{tag}workers recycled past their hard limit", "target": "",
         "measured": samples.recycled, "unit": ""},
    ]  # fmt: skip
    return rows


def slope_per_min(points: list[dict[str, float]], name: str) -> float:
    """Least-squares slope of ``name`` (MiB) over time, per minute: ~0 on a plateau."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(p["t"] for p in points) / n
    mean_v = sum(p[name] for p in points) / n
    var = sum((p["t"] - mean_t) ** 2 for p in points)
    cov = sum((p["t"] - mean_t) * (p[name] - mean_v) for p in points)
    return cov / var * 60 if var else 0.0


def draw_chart(samples: Samples, urls: dict[str, str], path: Path, layout: str) -> None:
    """Memory (Redis servers, cache budget, workers' PSS, with the budgets) and latency
    (p50, p99 per 30 s) over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    times = [p["t"] / 60 for p in samples.memory]
    for name in [*urls, "cache budget used", "workers' PSS"]:
        top.plot(times, [p[name] for p in samples.memory], label=name)
    top.axhline(CACHE_MAX_BYTES / MIB, linestyle="--", color="grey", label="IS_CACHE_MAX_BYTES")
    top.axhline(WORKERS_MAX_BYTES / MIB, linestyle=":", color="grey", label="IS_WORKERS_MAX_BYTES")
    top.set_ylabel("MiB")
    top.set_title(f"soak, {layout} redis layout: memory")
    top.legend(fontsize="small")
    buckets: dict[int, list[float]] = {}
    for t, ms in samples.latencies:
        buckets.setdefault(int(t // 30), []).append(ms)
    keys = sorted(buckets)
    mids = [(k + 0.5) / 2 for k in keys]
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        values = [sorted(buckets[k])[min(len(buckets[k]) - 1, int(len(buckets[k]) * q))]
                  for k in keys]  # fmt: skip
        bottom.plot(mids, values, marker=".", label=f"{label} per 30 s")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("minutes")
    bottom.set_yscale("log")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
