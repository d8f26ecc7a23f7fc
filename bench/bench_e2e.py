"""The whole request path on loopback (issue 3): REQ client -> is-proxy -> bridge -> worker.

The service is started as ``isctl up`` starts it (:class:`ops.stack.Stack`, own
redis-server, supervisor, bridge behind an is-proxy) and asked for 1024 px views of an
Eiger2 X 16M dataset (4362 x 4148 uint32, bitshuffle+LZ4). Figures:

* warm view: the reduced image is cached, so a view is contrast + JPEG + the trip;
* cold view, reader open: a frame never asked for, in a dataset the worker has open
  (read + decompress + reduce + stats + encode);
* cold view, new dataset: also opens the master (mask, frame table), as a user's first
  look at a run does; the data file is shared with the open dataset (page cache warm);
* 16 clients, each with its own REQ socket, asking warm views for ~10 s: views/s and
  replies lost (sent but never answered within the timeout). Once the same view each
  time (the worker's rendered-JPEG LRU answers), once a new contrast on every request
  (contrast + encode run for every view).

Run: ``.venv/bin/python -m bench e2e``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger2_16m
from queues.pool import SupervisorClient

#: Frames in the dataset: one warm frame plus one cold view per other frame.
N_FRAMES = 31
#: Extra master files naming the same data file: "new dataset" cold views (+1 primer).
NEW_DATASETS = 6
WARM_REQUESTS = 400
CONCURRENT_CLIENTS = 16
CONCURRENT_S = 10.0
XSIZE = 1024
REPLY_TIMEOUT_S = 30.0


@dataclass
class Target:
    """A running stack with a session and the dataset to view."""

    stack: Stack
    pid: str
    master: Path
    copies: list[Path]

    def job(self, master: Path, frame: int, **extra: Any) -> dict[str, Any]:
        """An is.js ``jpeg`` job for one frame at :data:`XSIZE` px."""
        return {"type": "jpeg", "pid": self.pid, "esaf": 0, "fn": str(master),
                "frame": frame, "xsize": XSIZE, "tag": "bench", **extra}  # fmt: skip


@dataclass
class LoadCounts:
    """What the concurrent clients saw (updated under ``lock``)."""

    sent: int = 0
    received: int = 0
    errors: int = 0
    timeouts: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_dataset(directory: Path, n_frames: int, n_copies: int) -> tuple[Path, list[Path]]:
    """The 16M dataset plus ``n_copies`` master files linking to the same data file.

    Everything world-readable: as root the workers run as another account.
    """
    master = write_eiger2_16m(directory, nimages=n_frames)
    copies = []
    for n in range(n_copies):
        copy = directory / f"copy{n}_master.h5"
        shutil.copyfile(master, copy)  # its external links are relative: same data file
        copies.append(copy)
    for item in directory.iterdir():
        item.chmod(0o644)
    return master, copies


def view_ms(endpoint: str, job: dict[str, Any]) -> float:
    """One view's round trip in ms; RuntimeError unless it is a real image reply."""
    started = time.perf_counter()
    frames = request(endpoint, job, timeout_s=REPLY_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - started) * 1000
    check_image_reply(frames)
    return elapsed_ms


def check_image_reply(frames: list[bytes]) -> None:
    """Raise unless ``frames`` is a jpeg success reply with an image (not the blank)."""
    if len(frames) != 4 or frames[0] != b"":
        raise RuntimeError(f"not an image reply: {frames[0][:200]!r}")
    if "error" in json.loads(frames[1]):
        raise RuntimeError(f"blank image: {frames[1][:300]!r}")


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) by rank."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latency_rows(
    label: str, samples: list[float], p50_target: float | str, p99_target: float | str
) -> list[dict[str, Any]]:
    """p50 and p99 rows of one set of round trips (n in the name)."""
    p50, p99 = percentiles(samples)
    n = len(samples)
    return [
        {"name": f"{label} p50 (n={n})", "target": p50_target, "measured": p50, "unit": "ms"},
        {"name": f"{label} p99 (n={n})", "target": p99_target, "measured": p99, "unit": "ms"},
    ]


def cold_rows(target: Target) -> list[dict[str, Any]]:
    """Cold views: new datasets first (each opens its master), then unseen frames."""
    endpoint = target.stack.endpoint
    view_ms(endpoint, target.job(target.copies[0], 1))  # one-time costs of a fresh worker
    new = [view_ms(endpoint, target.job(copy, 1)) for copy in target.copies[1:]]
    view_ms(endpoint, target.job(target.master, 1))  # opens the main dataset
    unseen = [view_ms(endpoint, target.job(target.master, f)) for f in range(2, N_FRAMES + 1)]
    return [
        *latency_rows("cold view 16M->1024, reader open", unseen, 120.0, ""),
        *latency_rows("cold view 16M->1024, new dataset (master open)", new, 120.0, ""),
    ]


def warm_rows(target: Target) -> list[dict[str, Any]]:
    """Warm views of frame 1 (its reduced image is cached), one client."""
    job = target.job(target.master, 1)
    for _ in range(20):
        view_ms(target.stack.endpoint, job)
    samples = [view_ms(target.stack.endpoint, job) for _ in range(WARM_REQUESTS)]
    # Same view each time: served by the worker's rendered-JPEG LRU. A new contrast on
    # each request misses that cache, so contrast + encode run every time.
    recontrast = [
        view_ms(target.stack.endpoint, {**job, "contrast": 50 + n}) for n in range(WARM_REQUESTS)
    ]
    return [
        *latency_rows("warm view 16M->1024, 1 client, same view", samples, 10.0, 30.0),
        *latency_rows("warm view 16M->1024, 1 client, new contrast each", recontrast, 10.0, 30.0),
    ]


def client_loop(
    endpoint: str, job: dict[str, Any], stop_at: float, counts: LoadCounts, contrasts: Contrasts
) -> None:
    """One client: its own REQ socket, one request at a time until ``stop_at``; with
    ``contrasts``, each request asks a contrast never asked before (so the worker renders
    every view from the cached reduced image instead of its rendered-JPEG LRU).

    A REQ socket that timed out is stuck, so it is replaced (as is.js would reconnect).
    """
    context: zmq.Context[Any] = zmq.Context.instance()
    sock: zmq.Socket[Any] | None = None
    sent = received = errors = timeouts = 0
    latencies: list[float] = []
    fixed = json.dumps(job).encode()
    while time.monotonic() < stop_at:
        if sock is None:
            sock = context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        payload = json.dumps({**job, "contrast": next(contrasts)}).encode() if contrasts else fixed
        started = time.perf_counter()
        sock.send(payload)
        sent += 1
        if not sock.poll(int(REPLY_TIMEOUT_S * 1000), zmq.POLLIN):
            timeouts += 1
            sock.close(linger=0)
            sock = None
            continue
        frames = sock.recv_multipart()
        latencies.append((time.perf_counter() - started) * 1000)
        received += 1
        errors += len(frames) != 4 or frames[0] != b""
    if sock is not None:
        sock.close(linger=0)
    with counts.lock:
        counts.sent += sent
        counts.received += received
        counts.errors += errors
        counts.timeouts += timeouts
        counts.latencies_ms += latencies


def run_clients(
    endpoint: str, jobs: list[dict[str, Any]], duration_s: float, *, new_contrast: bool = False
) -> LoadCounts:
    """One thread per job (each its own REQ socket) for ``duration_s``; their counts.
    ``new_contrast``: every request of every client asks a contrast not asked before."""
    counts = LoadCounts()
    stop_at = time.monotonic() + duration_s
    contrasts = Contrasts(new_contrast)
    threads = [
        threading.Thread(
            target=client_loop,
            args=(endpoint, job, stop_at, counts, contrasts),
            name=f"bench-client-{n}",
        )
        for n, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


class Contrasts:
    """Contrast values shared by the clients of one run, each handed out once and none
    asked by the single-client rows before (false when the run asks one fixed view)."""

    def __init__(self, enabled: bool, start: int = 10_000) -> None:
        self._enabled = enabled
        self._values = itertools.count(start)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._enabled

    def __next__(self) -> int:
        with self._lock:
            return next(self._values)


def load_rows(
    label: str, counts: LoadCounts, duration_s: float, views_target: float | str
) -> list[dict[str, Any]]:
    """Throughput, latency and losses of a :func:`run_clients` run."""
    p50, p99 = percentiles(counts.latencies_ms or [float("nan")])
    good = counts.received - counts.errors
    return [
        {"name": f"{label}: warm views/s", "target": views_target,
         "measured": good / duration_s, "unit": "views/s", "better": "higher"},
        {"name": f"{label}: lost replies (of {counts.sent} sent)", "target": 0,
         "measured": counts.sent - counts.received, "unit": "replies"},
        {"name": f"{label}: error replies", "target": 0, "measured": counts.errors,
         "unit": "replies"},
        {"name": f"{label}: latency p50", "target": "", "measured": p50, "unit": "ms"},
        {"name": f"{label}: latency p99", "target": "", "measured": p99, "unit": "ms"},
    ]  # fmt: skip


def concurrent_rows(target: Target) -> list[dict[str, Any]]:
    """:data:`CONCURRENT_CLIENTS` clients asking warm views of frame 1 for ~10 s, the
    same view each time and then a new contrast each time, with the CPU time each
    service process spent per view meanwhile (where the time goes)."""
    rows = []
    for new_contrast, what in ((False, "same view"), (True, "new contrast each")):
        jobs = [target.job(target.master, 1)] * CONCURRENT_CLIENTS
        pids = service_pids(target.stack)
        cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
        started = time.monotonic()
        counts = run_clients(target.stack.endpoint, jobs, CONCURRENT_S, new_contrast=new_contrast)
        elapsed_s = time.monotonic() - started
        label = f"{CONCURRENT_CLIENTS} clients, 1 identity, {what}"
        rows += load_rows(label, counts, elapsed_s, 150.0)
        views = max(counts.received, 1)
        for name, pid in pids.items():
            rows.append({"name": f"{label}: CPU per view in the {name}", "target": "",
                         "measured": (cpu_s(pid) - cpu_before[name]) * 1000 / views,
                         "unit": "ms"})  # fmt: skip
    return rows


def worker_pids(stack: Stack) -> dict[str, int]:
    """Queue name ("uid:gid") -> pid of its running worker, from the supervisor."""
    client = SupervisorClient(stack.settings, socket_path=stack.env["IS_SUPERVISOR_SOCKET"])
    try:
        return {w["queue"]: int(w["pid"]) for w in client.status()["workers"]}
    finally:
        client.close()


def service_pids(stack: Stack) -> dict[str, int]:
    """Process ids of the stack's worker(s), bridge, proxy, gateway and redis-server."""
    pids = {f"worker {queue}": pid for queue, pid in worker_pids(stack).items()}
    front = ("bridge", "proxy", "gateway")
    pids |= {c.name: c.process.pid for c in stack.components if c.name in front}
    if stack.redis is not None:
        pids["redis-server"] = stack.redis.process.pid
    return pids


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_stack(settings: Settings) -> Stack:
    """The service with an is-proxy in front, as ``isctl up`` runs it."""
    run_dir = Path(tempfile.mkdtemp(prefix="is-bench-run-"))
    return Stack.start(run_dir, settings, via_proxy=True)


def stop_stack(stack: Stack) -> None:
    """Stop every component and remove the run directory."""
    stack.stop()
    shutil.rmtree(stack.run_dir, ignore_errors=True)


def data_directory(prefix: str) -> Path:
    """A world-traversable scratch directory (the workers may run as ``nobody``)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    data = data_directory("is-bench-e2e-")
    stack: Stack | None = None
    try:
        master, copies = write_dataset(data, N_FRAMES, NEW_DATASETS + 1)
        stack = start_stack(Settings(worker_idle_s=600, view_timeout_s=REPLY_TIMEOUT_S))
        target = Target(stack, stack.add_session([0], user=dev_user()), master, copies)
        blank = {"type": "jpeg", "pid": target.pid, "esaf": 0, "xsize": 64}
        started = time.perf_counter()
        request(stack.endpoint, blank, timeout_s=REPLY_TIMEOUT_S)  # starts the worker
        first_ms = (time.perf_counter() - started) * 1000
        rows = [{"name": "new identity (nobody): first reply, blank 64 px", "issue": 4,
                 "target": 300.0, "measured": first_ms, "unit": "ms"}]  # fmt: skip
        rows += cold_rows(target)
        rows += warm_rows(target)
        rows += concurrent_rows(target)
        if dead := stack.dead():
            raise RuntimeError(f"components died during the benchmark: {dead}")
        return rows
    finally:
        if stack is not None:
            stop_stack(stack)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    for result in run():
        print(result)
