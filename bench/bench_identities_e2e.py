"""Per-identity workers through the whole path (issue 4), with real Unix accounts.

As root, :data:`N_FRESH` accounts are created (``tests.accounts.Accounts``: useradd,
each with its own group, removed afterwards), each gets a signed session, and the
service runs as ``isctl up`` runs it (supervisor forking one worker per UID:GID, bridge
behind an is-proxy). Figures:

* first reply of each fresh identity (worker forked, ids dropped, small 256 px view of
  a 1024 px MarCCD image): p50 and worst over :data:`N_FRESH` identities;
* warm 1024 px views of an Eiger2 X 16M frame across :data:`N_LIVE` live identities,
  round robin from one client (p50/p99), then 2 clients per identity for ~8 s;
* memory (VmRSS from ``/proc``) of an idle worker, and of a worker whose in-process
  LRU of reduced images was filled past its budget (``IS_LRU_MAX_BYTES``, set small).

Not root: one row saying so (accounts and setuid need root).
Run: ``.venv/bin/python -m bench identities_e2e``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_e2e import (
    REPLY_TIMEOUT_S,
    XSIZE,
    check_image_reply,
    data_directory,
    latency_rows,
    load_rows,
    run_clients,
    start_stack,
    stop_stack,
    view_ms,
    worker_pids,
)
from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack
from ops.testdata.eiger import write_eiger2_16m
from ops.testdata.marccd import write_marccd
from tests.accounts import Account, Accounts

N_FRESH = 20
N_LIVE = 8
WARM_REQUESTS = 400
CLIENTS_PER_IDENTITY = 2
CONCURRENT_S = 8.0
LRU_BUDGET_BYTES = 64 * 2**20
#: Distinct view sizes asked of one worker: ~4 MB reduced images, > the budget in total.
LRU_FILL_XSIZES = tuple(range(1024, 1024 - 24 * 8, -8))


@dataclass
class Scene:
    """The running stack, its data and one session per account."""

    stack: Stack
    small_image: Path
    master: Path
    users: list[tuple[Account, str]]  # (account, session pid)

    def job(self, pid: str, path: Path, xsize: int, **extra: Any) -> dict[str, Any]:
        """An is.js ``jpeg`` job of frame 1."""
        return {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(path), "frame": 1,
                "xsize": xsize, "tag": "bench", **extra}  # fmt: skip


def write_data(directory: Path) -> tuple[Path, Path]:
    """(small MarCCD image, one-frame Eiger2 16M master), world-readable."""
    small = write_marccd(directory / "small.mccd", size=1024)
    master = write_eiger2_16m(directory, nimages=1)
    for item in directory.iterdir():
        item.chmod(0o644)
    return small, master


def first_reply_rows(scene: Scene) -> list[dict[str, Any]]:
    """Each fresh identity's first request: worker start + a small view."""
    times_ms = []
    for _, pid in scene.users:
        started = time.perf_counter()
        frames = request(scene.stack.endpoint, scene.job(pid, scene.small_image, 256),
                         timeout_s=REPLY_TIMEOUT_S)  # fmt: skip
        times_ms.append((time.perf_counter() - started) * 1000)
        check_image_reply(frames)
    times_ms.sort()
    n = len(times_ms)
    return [
        {"name": f"new identity: first reply p50 (n={n}, 256 px view)", "target": 300.0,
         "measured": times_ms[n // 2], "unit": "ms"},
        {"name": f"new identity: first reply worst (n={n})", "target": "",
         "measured": times_ms[-1], "unit": "ms"},
    ]  # fmt: skip


def live_rows(scene: Scene) -> list[dict[str, Any]]:
    """Warm 1024 px views across :data:`N_LIVE` identities: one client, then many."""
    endpoint = scene.stack.endpoint
    jobs = [scene.job(pid, scene.master, XSIZE) for _, pid in scene.users[:N_LIVE]]
    for job in jobs:
        view_ms(endpoint, job)  # each identity's own gid: its own cached reduced image
    cycle = itertools.cycle(jobs)
    samples = [view_ms(endpoint, next(cycle)) for _ in range(WARM_REQUESTS)]
    rows = latency_rows(f"warm view 1024, {N_LIVE} identities round robin", samples, "", "")
    started = time.monotonic()
    counts = run_clients(endpoint, jobs * CLIENTS_PER_IDENTITY, CONCURRENT_S)
    label = f"{N_LIVE * CLIENTS_PER_IDENTITY} clients over {N_LIVE} identities"
    return rows + load_rows(label, counts, time.monotonic() - started, "")


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def memory_rows(scene: Scene) -> list[dict[str, Any]]:
    """RSS of an idle worker and of one whose LRU holds its whole budget."""
    pids = worker_pids(scene.stack)
    idle_account, _ = scene.users[N_LIVE]  # did one small view only
    busy_account, busy_pid = scene.users[0]
    busy_worker = pids[f"{busy_account.uid}:{busy_account.gid}"]
    before_mb = rss_mb(busy_worker)
    for xsize in LRU_FILL_XSIZES:
        view_ms(scene.stack.endpoint, scene.job(busy_pid, scene.master, xsize))
    budget_mib = LRU_BUDGET_BYTES / 2**20
    return [
        {"name": "idle worker RSS (after one small view)", "target": "",
         "measured": rss_mb(pids[f"{idle_account.uid}:{idle_account.gid}"]), "unit": "MiB"},
        {"name": "worker RSS after warm 16M views", "target": "",
         "measured": before_mb, "unit": "MiB"},
        {"name": f"worker RSS, LRU filled ({len(LRU_FILL_XSIZES)} views > "
                 f"budget {budget_mib:.0f} MiB)", "target": "",
         "measured": rss_mb(busy_worker), "unit": "MiB"},
    ]  # fmt: skip


def open_sessions(stack: Stack, accounts: Accounts) -> list[tuple[Account, str]]:
    """:data:`N_FRESH` new accounts, each with a session (esaf 0: its own group)."""
    users = [accounts.user() for _ in range(N_FRESH)]
    return [(user, stack.add_session([0], user=user.name)) for user in users]


def not_root_rows() -> list[dict[str, Any]]:
    return [{"name": "identities end to end (needs root: accounts, setuid)", "target": "",
             "measured": "skipped", "unit": ""}]  # fmt: skip


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    if os.geteuid() != 0:
        return not_root_rows()
    data = data_directory("is-bench-ids-e2e-")
    accounts = Accounts()
    stack: Stack | None = None
    try:
        small, master = write_data(data)
        settings = Settings(lru_max_bytes=LRU_BUDGET_BYTES, worker_idle_s=600,
                            view_timeout_s=REPLY_TIMEOUT_S)  # fmt: skip
        stack = start_stack(settings)
        scene = Scene(stack, small, master, open_sessions(stack, accounts))
        rows = first_reply_rows(scene) + live_rows(scene) + memory_rows(scene)
        if dead := stack.dead():
            raise RuntimeError(f"components died during the benchmark: {dead}")
        return rows
    finally:
        if stack is not None:
            stop_stack(stack)  # first: userdel refuses accounts with running processes
        accounts.cleanup()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    for result in run():
        print(result)
