"""Celery round trip: CeleryDispatcher -> Redis -> ``python -m istasks.worker`` -> reply.

Warm figures (worker started, reduced image cached): what one view costs on top of the
image work, the part that must stay far below the 500 ms budget of spec 7. Also the
worker's start-up and the first (cold) request, which a user meets after idling.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.dispatch import CeleryDispatcher
from istasks.app import create_app
from istasks.settings import Settings
from ops.redisserver import start_redis
from ops.testdata.eiger import write_eiger
from queues.envelope import queue_key
from queues.naming import Identity

SECRET = b"bench-secret"
IDENT = Identity(4001, 5001)
ROUNDS = 300


def _start_worker(url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env.update(
        IS_REDIS_URL=url,
        IS_QUEUE_KEY=queue_key(SECRET, IDENT.queue).decode(),
        IS_LOG_LEVEL="INFO",
    )
    log_path = workdir / "worker.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "istasks.worker", "--queue", IDENT.queue],
            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    while " ready on " not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - started > 60:
            raise RuntimeError(log_path.read_text(errors="replace"))
        time.sleep(0.01)
    return proc, (time.monotonic() - started) * 1000.0


def _percentiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _timed(d: CeleryDispatcher, kind: str, job: dict[str, Any]) -> float:
    started = time.perf_counter()
    frames = d.submit(IDENT, kind, job, "bench").result(timeout=60)
    if frames[0]:
        raise RuntimeError(frames[0].decode())
    return (time.perf_counter() - started) * 1000.0


def _round_trips(
    d: CeleryDispatcher, name: str, kind: str, job: dict[str, Any], target_ms: float
) -> list[dict[str, Any]]:
    _timed(d, kind, job)  # warm: the reduction is cached from here on
    p50, p99 = _percentiles([_timed(d, kind, job) for _ in range(ROUNDS)])
    return [
        {"name": f"{name} round trip p50", "target": target_ms, "measured": p50, "unit": "ms"},
        {"name": f"{name} round trip p99", "target": 2 * target_ms, "measured": p99, "unit": "ms"},
    ]


def _throughput(d: CeleryDispatcher, job: dict[str, Any]) -> float:
    started = time.perf_counter()
    futures = [d.submit(IDENT, "jpeg", job, f"t{i}") for i in range(ROUNDS)]
    concurrent.futures.wait(futures, timeout=120)
    assert all(not f.result()[0] for f in futures)
    return ROUNDS / (time.perf_counter() - started)


def run() -> list[dict[str, Any]]:
    """Rows: worker start, cold and warm round trips, throughput."""
    server = start_redis()
    workdir = Path(tempfile.mkdtemp(prefix="is-bench-tasks-"))
    master = write_eiger(workdir / "data", "bench", nimages=2, shape=(2048, 2048))
    proc, start_ms = _start_worker(server.url, workdir)
    settings = Settings(redis_url=server.url, task_secret=SECRET.decode())
    d = CeleryDispatcher(create_app(settings), settings)
    rows: list[dict[str, Any]] = []
    try:
        rows.append(
            {"name": "worker start to ready", "target": 2000.0, "measured": start_ms, "unit": "ms"}
        )
        cold_job = {"type": "jpeg", "fn": str(master), "frame": 2, "xsize": 1024}
        rows.append({"name": "first jpeg 1024 (2048^2 frame, cold)", "target": 500.0,
                     "measured": _timed(d, "jpeg", cold_job), "unit": "ms"})  # fmt: skip
        small = {"type": "spots", "fn": str(master), "frame": 1, "xsize": 64}
        rows += _round_trips(d, "small reply (spots, cached)", "spots", small, 10.0)
        rows += _round_trips(d, "jpeg 256 px (cached)", "jpeg", {**cold_job, "xsize": 256}, 20.0)
        rows += _round_trips(d, "jpeg 1024 px (cached)", "jpeg", cold_job, 50.0)
        rows.append({"name": "jpeg 1024 px throughput, 300 in flight, 4 threads", "target": 50.0,
                     "measured": _throughput(d, cold_job), "unit": "req/s",
                     "better": "higher"})  # fmt: skip
    finally:
        d.close()
        proc.terminate()
        proc.wait(timeout=20)
        server.stop()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
