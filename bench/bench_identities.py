"""Per-identity workers: how fast a new identity gets its first image, what a worker costs.

Starts a private Redis and a real supervisor (``python -m queues.supervisor``) running
``istasks.worker:serve``, then for N fresh ``uid:gid`` identities measures ensure() plus
the first ``jpeg`` reply (target 300 ms), against the reference of exec'ing a worker
process per identity (``python -m istasks.worker``). Also the per-request cost of
ensure() for a running worker (cached and uncached) and the memory of one idle worker
(RSS, and PSS: pages shared with the preloaded zygote counted once).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from istasks.app import create_app
from istasks.settings import Settings
from ops.redisserver import start_redis
from ops.testdata.marccd import write_marccd
from queues.envelope import seal
from queues.naming import Identity
from queues.pool import SupervisorClient

N_IDENTITIES = 10
SECRET = b"bench-identities-secret"
PROJECT = Path(__file__).resolve().parent.parent


def _start_supervisor(redis_url: str, workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    socket_path = os.path.join(workdir, "run", "supervisor.sock")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(PROJECT),
        "IS_REDIS_URL": redis_url,
        "IS_TASK_SECRET": SECRET.decode(),
        "IS_LOG_LEVEL": "WARNING",
    }
    log = open(os.path.join(workdir, "supervisor.log"), "wb")  # noqa: SIM115 - child's
    process = subprocess.Popen(
        [sys.executable, "-m", "queues.supervisor", "--socket", socket_path],
        env=env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    client = SupervisorClient(Settings(), socket_path=socket_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.status()
            break
        except Exception:
            time.sleep(0.05)
    client.close()
    return process, socket_path


def _first_replies(
    settings: Settings, client: SupervisorClient, image: Path
) -> tuple[list[float], ...]:
    """(ensure ms, ensure + first jpeg reply ms) for N fresh identities."""
    ensure_ms, first_ms = [], []
    job = {"type": "jpeg", "fn": str(image), "frame": 1, "xsize": 256, "tag": "bench"}
    for n in range(N_IDENTITIES):
        identity = Identity(71000 + n, 81000 + n)
        # Results live under the identity's own key prefix (istasks.app.worker_isolation).
        app = create_app(settings, identity)
        started = time.perf_counter()
        client.ensure(identity)
        ensured = time.perf_counter()
        token = seal(SECRET, identity.queue, {"job": job, "rid": f"bench-{n}"})
        result = app.send_task("is.jpeg", args=[token], queue=identity.queue).get(timeout=60)
        if "frames" not in result:
            raise RuntimeError(f"first reply of {identity.queue} failed: {result}")
        first_ms.append((time.perf_counter() - started) * 1000)
        ensure_ms.append((ensured - started) * 1000)
    return ensure_ms, first_ms


def _plain_worker_ms(settings: Settings, redis_url: str, image: Path, runs: int = 3) -> list[float]:
    """The reference: exec ``python -m istasks.worker`` for a queue, time its first reply."""
    times = []
    job = {"type": "jpeg", "fn": str(image), "frame": 1, "xsize": 256, "tag": "bench"}
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT), "IS_REDIS_URL": redis_url,
           "IS_TASK_SECRET": SECRET.decode(), "IS_LOG_LEVEL": "WARNING"}  # fmt: skip
    for n in range(runs):
        identity = Identity(72000 + n, 82000 + n)
        app = create_app(settings, identity)
        started = time.perf_counter()
        worker = subprocess.Popen(
            [sys.executable, "-m", "istasks.worker", "--queue", identity.queue],
            env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            token = seal(SECRET, identity.queue, {"job": job, "rid": f"plain-{n}"})
            app.send_task("is.jpeg", args=[token], queue=identity.queue).get(timeout=60)
            times.append((time.perf_counter() - started) * 1000)
        finally:
            worker.terminate()
            worker.wait(30)
    return times


def _ensure_cost_us(socket_path: str, identity: Identity, cache_ttl_s: float) -> float:
    client = SupervisorClient(Settings(), socket_path=socket_path, cache_ttl_s=cache_ttl_s)
    calls = 20_000 if cache_ttl_s else 2_000
    client.ensure(identity)
    started = time.perf_counter()
    for _ in range(calls):
        client.ensure(identity)
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed / calls * 1e6


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB."""

    def field(path: str, name: str) -> float:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    return field(f"/proc/{pid}/status", "VmRSS"), field(f"/proc/{pid}/smaps_rollup", "Pss")


def run() -> list[dict[str, Any]]:
    """Benchmark rows (see module docstring)."""
    redis_server = start_redis()
    workdir = tempfile.mkdtemp(prefix="is-bench-ids-")
    os.chmod(workdir, 0o755)  # the workers (other uids when run as root) read the image
    image = write_marccd(Path(workdir) / "frame.tif", size=1024)
    image.chmod(0o644)
    process, socket_path = _start_supervisor(redis_server.url, workdir)
    client = SupervisorClient(Settings(), socket_path=socket_path)
    try:
        settings = Settings(redis_url=redis_server.url)
        ensure_ms, first_ms = _first_replies(settings, client, image)
        plain_ms = _plain_worker_ms(settings, redis_server.url, image)
        first = Identity(71000, 81000)
        cached_us = _ensure_cost_us(socket_path, first, 0.5)
        uncached_us = _ensure_cost_us(socket_path, first, 0.0)
        time.sleep(2.0)  # let the workers settle idle
        pid = next(w["pid"] for w in client.status()["workers"] if w["queue"] == first.queue)
        rss_mb, pss_mb = _memory_mb(pid)
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    p90 = statistics.quantiles(first_ms, n=10)[-1]
    return [
        {"name": "new identity: ensure + first jpeg, p50", "target": 300,
         "measured": statistics.median(first_ms), "unit": "ms"},
        {"name": "new identity: ensure + first jpeg, p90", "target": 300,
         "measured": p90, "unit": "ms"},
        {"name": "reference: exec python -m istasks.worker + first jpeg, p50", "target": "",
         "measured": statistics.median(plain_ms), "unit": "ms"},
        {"name": "new identity: ensure() (worker forked, ids dropped), p50", "target": 50,
         "measured": statistics.median(ensure_ms), "unit": "ms"},
        {"name": "ensure() of a running worker, cached", "target": 5,
         "measured": cached_us, "unit": "us"},
        {"name": "ensure() of a running worker, socket round trip", "target": 500,
         "measured": uncached_us, "unit": "us"},
        {"name": "idle worker RSS", "target": "", "measured": rss_mb, "unit": "MB"},
        {"name": "idle worker PSS (zygote pages shared)", "target": "",
         "measured": pss_mb, "unit": "MB"},
    ]  # fmt: skip


if __name__ == "__main__":
    for row in run():
        print(row)
