"""Interactive views while an admin prefetch runs (issue 5): warm-view p99 stays within
2x of the idle p99.

The service runs as ``isctl up`` runs it (ops.stack: own redis-server, supervisor,
bridge behind an is-proxy). One client asks 1024 px views of a cached frame, first with
nothing else running, then while ``isctl prefetch`` (same identity, sizes 384 and 1024,
the default window) warms a 100-frame dataset nobody has viewed yet. Frames are Eiger
4M sized, 2167 x 2070 uint32, bitshuffle+LZ4 synthetic diffraction (noisier than real
frames, so each prefetch frame costs more CPU than a real one would). 10 frames are
generated; the other 90 are copies of that data file with their own frame numbers.

On a 2-vCPU VM whose idle p99 is ~2 ms the ratio is missed (4-5x: p99 ~10 ms during
prefetch). There, any CPU-bound process raises that p99 to 5-12 ms, even one at
SCHED_IDLE in a session (autogroup) of its own, and so does the same reduce loop in a
separate process; a prefetch at nice 10, at SCHED_IDLE, with one decode thread, with a
0.5 ms GIL switch interval or with its own cache Redis left the p99 where it was
(measured 2026-11-22). Session 1's 0.9-1.2x was against an idle p99 near 10 ms.

Run: ``.venv/bin/python -m bench prefetch``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import data_file_name, make_pixel_mask, write_eiger
from ops.testdata.eiger_master import MasterSpec, write_master

SHAPE = (2167, 2070)  # Eiger 4M
FRAMES_PER_FILE = 10
PREFETCH_FRAMES = 100
XSIZE = 1024
IDLE_VIEWS = 400
WARMUP_VIEWS = 20
REPLY_TIMEOUT_S = 30.0
TARGET_RATIO = 2.0


def write_run(directory: Path, prefix: str, n_frames: int) -> Path:
    """An ``n_frames`` dataset: one generated data file and copies of it renumbered."""
    first = write_eiger(
        directory, prefix, nimages=FRAMES_PER_FILE, frames_per_file=FRAMES_PER_FILE,
        shape=SHAPE, seed=21,
    )  # fmt: skip
    links = [("data_000001", data_file_name(prefix, 1))]
    for number in range(2, n_frames // FRAMES_PER_FILE + 1):
        name = data_file_name(prefix, number)
        shutil.copyfile(directory / links[0][1], directory / name)
        with h5py.File(directory / name, "r+") as file:
            stack = file["entry/data/data"]
            stack.attrs["image_nr_low"] = np.int32((number - 1) * FRAMES_PER_FILE + 1)
            stack.attrs["image_nr_high"] = np.int32(number * FRAMES_PER_FILE)
        links.append((f"data_{number:06d}", name))
    center = (SHAPE[1] / 2 + 3.5, SHAPE[0] / 2 - 7.25)
    spec = MasterSpec(SHAPE, 32, n_frames, 1, "1.8", center)
    write_master(first, spec, links, make_pixel_mask(SHAPE, np.random.default_rng(21)))
    return first


def view_ms(endpoint: str, job: dict[str, Any]) -> float:
    """One view's round trip in ms; RuntimeError unless it is a real image reply."""
    started = time.perf_counter()
    frames = request(endpoint, job, timeout_s=REPLY_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if len(frames) != 4 or frames[0] != b"" or "error" in json.loads(frames[1]):
        raise RuntimeError(f"not an image reply: {frames[:2]!r}")
    return elapsed_ms


def p50_p99(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) by rank."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass(frozen=True)
class Summary:
    """What ``isctl prefetch`` reported on its last line."""

    done: int
    total: int
    errors: int
    elapsed_s: float


_SUMMARY = re.compile(r"prefetch: (\d+)/(\d+) frames done, (\d+) errors? in ([\d.]+) s")


def views_during_prefetch(
    stack: Stack, job: dict[str, Any], master: Path
) -> tuple[list[float], Summary]:
    """Views of ``job`` as fast as one client asks, for as long as ``isctl prefetch``
    runs. The command itself runs, in a process of its own, as an admin runs it; not
    its Celery client inside this process, where it would share a GIL with the client
    whose latency is measured (measured here: the p99 was the same either way)."""
    isctl = str(Path(sys.executable).with_name("isctl"))
    command = [isctl, "prefetch", str(master), "--esaf", "0", "--user", dev_user()]
    if "BENCH_PREFETCH_WINDOW" in os.environ:
        command += ["--window", os.environ["BENCH_PREFETCH_WINDOW"]]
    with subprocess.Popen(
        command, env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as admin:
        samples = []
        while admin.poll() is None:
            samples.append(view_ms(stack.endpoint, job))
        report = admin.stderr.read().decode(errors="replace") if admin.stderr else ""
    found = _SUMMARY.findall(report)
    if admin.returncode != 0 or not found:
        raise RuntimeError(f"isctl prefetch exited {admin.returncode}: {report[-2000:]}")
    done, total, errors, elapsed = found[-1]
    return samples, Summary(int(done), int(total), int(errors), float(elapsed))


def rows_for(idle: list[float], busy: list[float], summary: Summary) -> list[dict[str, Any]]:
    """Both latency distributions, the p99 ratio against its target, prefetch speed."""
    idle_p50, idle_p99 = p50_p99(idle)
    busy_p50, busy_p99 = p50_p99(busy)
    label = f"warm view 4M->{XSIZE}"
    return [
        {"name": f"{label} idle p50 (n={len(idle)})", "target": "", "measured": idle_p50,
         "unit": "ms"},
        {"name": f"{label} idle p99 (n={len(idle)})", "target": "", "measured": idle_p99,
         "unit": "ms"},
        {"name": f"{label} during prefetch p50 (n={len(busy)})", "target": "",
         "measured": busy_p50, "unit": "ms"},
        {"name": f"{label} during prefetch p99 (n={len(busy)})", "target": "",
         "measured": busy_p99, "unit": "ms"},
        {"name": "warm view p99 during / idle (100-frame prefetch)", "target": TARGET_RATIO,
         "measured": busy_p99 / idle_p99, "unit": "x"},
        {"name": f"prefetch 4M x {summary.total} frames, 384+1024 ({summary.errors} errors)",
         "target": "", "measured": summary.done / summary.elapsed_s, "unit": "frames/s",
         "better": "higher"},
    ]  # fmt: skip


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    data = Path(tempfile.mkdtemp(prefix="is-bench-prefetch-"))
    data.chmod(0o755)  # as root the workers run as nobody
    stack: Stack | None = None
    try:
        viewed = write_eiger(data, "viewed", nimages=1, frames_per_file=1, shape=SHAPE, seed=20)
        master = write_run(data, "run", PREFETCH_FRAMES)
        for item in data.iterdir():
            item.chmod(0o644)
        run_dir = Path(tempfile.mkdtemp(prefix="is-bench-run-"))
        stack = Stack.start(run_dir, Settings(worker_idle_s=600), via_proxy=True)
        pid = stack.add_session([0], user=dev_user())
        job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(viewed), "frame": 1,
               "xsize": XSIZE}  # fmt: skip
        for _ in range(WARMUP_VIEWS):  # starts the worker and caches the frame
            view_ms(stack.endpoint, job)
        # Idle samples before and after the prefetch, so that load from anything else on
        # the machine weighs on both figures alike.
        idle = [view_ms(stack.endpoint, job) for _ in range(IDLE_VIEWS // 2)]
        busy, summary = views_during_prefetch(stack, job, master)
        idle += [view_ms(stack.endpoint, job) for _ in range(IDLE_VIEWS // 2)]
        return rows_for(idle, busy, summary)
    finally:
        if stack is not None:
            stack.stop()
            shutil.rmtree(stack.run_dir, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
