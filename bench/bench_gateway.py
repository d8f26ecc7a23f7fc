"""Zoom tiles, the HTTP gateway against ZeroMQ, and worker memory (issue 13).

The service runs as ``isctl up`` runs it (:class:`ops.stack.Stack` with an is-proxy in
front and the gateway), on an Eiger2 X 16M dataset (4362 x 4148 uint32, bslz4), 1024 px:

* zoom tiles of the frame on screen over ZeroMQ (one REQ socket kept, as is.js keeps
  it): frame 1 is viewed, then tiles at zoom 2, 4 and 8 (each a view never asked before:
  a reduction, but no decode, thanks to the worker's frame LRU,
  ``IS_FRAME_LRU_MAX_BYTES``), then the same for frame 2; beside them the request path's
  floor (a warm 64 px view) of the same run, and that view on a new socket per request
  (until 2026-12-03 the tiles were timed so, connection set-up included: about 1 ms
  more a request here);
* warm view (the same view again) one client at a time, over ZeroMQ (one REQ socket kept,
  as is.js keeps it -> is-proxy -> bridge) and over HTTP (one keep-alive connection ->
  uvicorn gateway): the difference of p50s. Both clients are lean (pyzmq; the standard
  library's http.client), so the difference is the gateway's, not a client library's:
  httpx alone costs ~0.7-1 ms a request here (measured against http.client on the same
  gateway), as much as the whole budget; its figure is shown beside, without a target;
* 16 HTTP clients (threads, one keep-alive http.client connection each) asking warm views
  ~10 s (a lean client also leaves the 2 CPUs to the service), with the CPU time each
  process spent per view meanwhile: on 2 CPUs their sum bounds the views/s, and it moves
  with how busy the host is (the same code took 2.3 to 3.6 ms of gateway CPU a view);
* the worker's RSS after 50 distinct cold frames (the frame LRU must keep it bounded).

Run: ``.venv/bin/python -m bench gateway``.
"""

from __future__ import annotations

import http.client
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import zmq

from bench.bench_e2e import (
    Target,
    check_image_reply,
    cpu_s,
    data_directory,
    latency_rows,
    percentiles,
    service_pids,
    stop_stack,
    view_ms,
    worker_pids,
)
from bench.bench_load import exchange, req_socket
from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger2_16m

#: Frames: 1 on screen, then 50 distinct cold ones for the memory figure.
N_FRAMES = 52
COLD_FRAMES = 50
XSIZE = 1024
WARM_REQUESTS = 300
HTTP_CLIENTS = 16
HTTP_LOAD_S = 10.0
TIMEOUT_S = 60.0
#: Warm 64 px views timed for the request path's floor.
FLOOR_REQUESTS = 100


def tile_jobs(target: Target) -> list[dict[str, Any]]:
    """Every tile of zoom 2 and 4 and a row of zoom 8 of frame 1: 4 + 16 + 8 views."""
    jobs = []
    for zoom, cols, rows in ((2, 2, 2), (4, 4, 4), (8, 8, 1)):
        for row in range(rows):
            for col in range(cols):
                jobs.append(target.job(target.master, 1, zoom=zoom, segcol=col, segrow=row))
    return jobs


def tile_rows(target: Target) -> list[dict[str, Any]]:
    """Tiles of frame 1 (on screen), then of frame 2 (a second frame looked over), over
    one kept REQ socket as is.js sends them, and the request path's own floor measured
    alongside: the same 64 px view again (served from the worker's LRU), so a slow
    machine shows as such and not as a slow tile. Beside it, that view on a new socket
    per request (connection set-up included), the client this row used before."""
    endpoint = target.stack.endpoint
    samples: list[float] = []
    by_zoom: dict[Any, list[float]] = {}
    sock = req_socket(endpoint)
    try:
        for frame in (1, 2):
            kept_view_ms(sock, target.job(target.master, frame))  # on screen: decoded once
            for job in tile_jobs(target):
                elapsed = kept_view_ms(sock, dict(job, frame=frame))
                samples.append(elapsed)
                by_zoom.setdefault(job["zoom"], []).append(elapsed)
        floor_job = target.job(target.master, 1, xsize=64)
        kept_view_ms(sock, floor_job)
        floor = percentiles([kept_view_ms(sock, floor_job) for _ in range(FLOOR_REQUESTS)])[0]
    finally:
        sock.close()
    fresh = percentiles([view_ms(endpoint, floor_job) for _ in range(FLOOR_REQUESTS)])[0]
    p50 = percentiles(samples)[0]
    label = "zoom tile of the frame on screen 16M->1024, ZeroMQ (kept REQ socket)"
    return [
        *latency_rows(label, samples, 15.0, ""),
        *({"name": f"  zoom {zoom} tiles p50 (n={len(ms)})", "target": "",
           "measured": percentiles(ms)[0], "unit": "ms"} for zoom, ms in by_zoom.items()),
        {"name": "request path floor: a warm 64 px view p50 (same run)", "target": "",
         "measured": floor, "unit": "ms"},
        {"name": "  the same on a new REQ socket per request", "target": "",
         "measured": fresh, "unit": "ms"},
        {"name": "zoom tile p50 above that floor", "target": "", "measured": p50 - floor,
         "unit": "ms"},
    ]  # fmt: skip


class HttpViews:
    """Warm views of frame 1 over one keep-alive HTTP/1.1 connection (http.client)."""

    def __init__(self, target: Target) -> None:
        url = urllib.parse.urlsplit(target.stack.gateway_url)
        self._conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=TIMEOUT_S)
        query = urllib.parse.urlencode({"fn": str(target.master), "frame": 1, "xsize": XSIZE})
        self._path = f"/api/v1/esaf/0/view?{query}"
        self._headers = {"Authorization": f"Bearer {target.pid}"}

    def view_ms(self) -> float:
        """One view's round trip in ms; RuntimeError unless it is a JPEG."""
        started = time.perf_counter()
        self._conn.request("GET", self._path, headers=self._headers)
        response = self._conn.getresponse()
        body = response.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        if response.status != 200 or response.getheader("content-type") != "image/jpeg":
            raise RuntimeError(f"gateway: {response.status} {body[:200]!r}")
        return elapsed_ms

    def close(self) -> None:
        self._conn.close()


def kept_view_ms(sock: zmq.Socket[Any], job: dict[str, Any]) -> float:
    """One view's round trip over a kept REQ socket (:func:`bench.bench_load.req_socket`)
    in ms; RuntimeError unless it is a real image reply."""
    reply, elapsed_ms = exchange(sock, job)
    if reply is None:
        raise RuntimeError("no reply in time over the kept REQ socket")
    check_image_reply(reply)
    return elapsed_ms


def httpx_view_ms(client: httpx.Client, target: Target) -> float:
    """The same view through httpx (a client library's cost, for comparison)."""
    started = time.perf_counter()
    response = client.get(
        "/api/v1/esaf/0/view", params={"fn": str(target.master), "frame": 1, "xsize": XSIZE}
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or response.headers["content-type"] != "image/jpeg":
        raise RuntimeError(f"gateway: {response.status_code} {response.text[:200]}")
    return elapsed_ms


def warm_compare_rows(target: Target) -> list[dict[str, Any]]:
    """The same warm view over ZeroMQ, HTTP and HTTP through httpx, interleaved in blocks
    so all see the same machine load."""
    samples: dict[str, list[float]] = {"zmq": [], "http": [], "httpx": []}
    sock, http_views = req_socket(target.stack.endpoint), HttpViews(target)
    job = target.job(target.master, 1)
    headers = {"Authorization": f"Bearer {target.pid}"}
    client = httpx.Client(base_url=target.stack.gateway_url, headers=headers, timeout=TIMEOUT_S)
    try:
        for _ in range(20):
            kept_view_ms(sock, job), http_views.view_ms(), httpx_view_ms(client, target)
        for _ in range(WARM_REQUESTS // 50):
            samples["zmq"] += [kept_view_ms(sock, job) for _ in range(50)]
            samples["http"] += [http_views.view_ms() for _ in range(50)]
            samples["httpx"] += [httpx_view_ms(client, target) for _ in range(50)]
    finally:
        sock.close(linger=0)
        http_views.close()
        client.close()
    zmq_p50, http_p50 = percentiles(samples["zmq"])[0], percentiles(samples["http"])[0]
    return [
        *latency_rows("warm view 16M->1024, ZeroMQ via is-proxy", samples["zmq"], 10.0, ""),
        *latency_rows("warm view 16M->1024, HTTP gateway", samples["http"], "", ""),
        {"name": "gateway's extra p50 over ZeroMQ, warm view", "target": 1.0,
         "measured": http_p50 - zmq_p50, "unit": "ms"},
        {"name": "  the same through httpx: extra p50 (client library included)",
         "target": "", "measured": percentiles(samples["httpx"])[0] - zmq_p50, "unit": "ms"},
    ]  # fmt: skip


def http_load_rows(target: Target) -> list[dict[str, Any]]:
    counts = {"ok": 0, "bad": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + HTTP_LOAD_S

    def loop() -> None:
        ok = bad = 0
        mine: list[float] = []
        views = HttpViews(target)
        try:
            while time.monotonic() < stop_at:
                try:
                    mine.append(views.view_ms())
                    ok += 1
                except (RuntimeError, OSError, http.client.HTTPException):
                    bad += 1
                    views.close()  # reconnects on the next request
        finally:
            views.close()
        with lock:
            counts["ok"] += ok
            counts["bad"] += bad
            latencies.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(HTTP_CLIENTS)]
    pids = {**service_pids(target.stack), "benchmark's clients": os.getpid()}
    for idle in ("bridge", "proxy"):  # the ZeroMQ path: no part of an HTTP view
        pids.pop(idle, None)
    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu_ms = {name: (cpu_s(pid) - cpu_before[name]) * 1000 for name, pid in pids.items()}
    p50, p99 = percentiles(latencies or [float("nan")])
    label = f"{HTTP_CLIENTS} HTTP clients, same warm view"
    views = max(counts["ok"], 1)
    cpu_rows = [{"name": f"{label}: CPU per view in the {name}", "target": "",
                 "measured": ms / views, "unit": "ms"} for name, ms in cpu_ms.items()]  # fmt: skip
    return [
        {"name": f"{label}: views/s", "target": 300.0, "measured": counts["ok"] / elapsed,
         "unit": "views/s", "better": "higher"},
        {"name": f"{label}: failed requests", "target": 0, "measured": counts["bad"],
         "unit": "requests"},
        {"name": f"{label}: latency p50", "target": "", "measured": p50, "unit": "ms"},
        {"name": f"{label}: latency p99", "target": "", "measured": p99, "unit": "ms"},
        *cpu_rows,
    ]  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_rows(target: Target) -> list[dict[str, Any]]:
    endpoint = target.stack.endpoint
    cold = [view_ms(endpoint, target.job(target.master, f)) for f in range(2, 2 + COLD_FRAMES)]
    (pid,) = worker_pids(target.stack).values()
    budget = Settings().frame_lru_max_bytes / 2**20
    return [
        *latency_rows(f"cold view 16M->1024 ({COLD_FRAMES} distinct frames)", cold, 120.0, ""),
        {"name": f"worker RSS after {COLD_FRAMES} distinct cold frames "
                 f"(frame LRU {budget:.0f} MiB)", "target": "", "measured": rss_mb(pid),
         "unit": "MiB"},
    ]  # fmt: skip


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    data = data_directory("is-bench-gw-")
    stack: Stack | None = None
    try:
        master = write_eiger2_16m(data, nimages=N_FRAMES)
        for item in data.iterdir():
            item.chmod(0o644)
        settings = Settings(worker_idle_s=600, view_timeout_s=TIMEOUT_S, gateway_port=0)
        run_dir = data_directory("is-bench-gw-run-")
        stack = Stack.start(run_dir, settings, via_proxy=True, gateway=True)
        target = Target(stack, stack.add_session([0], user=dev_user()), master, [])
        request(stack.endpoint, {"type": "jpeg", "pid": target.pid, "esaf": 0, "xsize": 64},
                timeout_s=TIMEOUT_S)  # fmt: skip
        rows = tile_rows(target)
        rows += warm_compare_rows(target)
        rows += http_load_rows(target)
        rows += memory_rows(target)
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
