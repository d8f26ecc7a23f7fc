"""Proof under stress, bad input: over 10,000 malformed or hostile requests, each answered once.

The service runs as ``isctl up`` runs it (ops.stack: its own Redis, the supervisor
forking per-identity workers, the bridge). Hypothesis generates the requests: hostile
job fields behind a valid session, payloads no encoder writes, and every multipart
shape; a fixed list adds hostile files (empty, truncated, FIFOs, devices, /proc, symlinks
out of the tree, size bombs). They go out in batches of 100 with all of a batch in
flight, through a DEALER socket (replies matched by a unique first frame) and through
REQ sockets as is.js sends them. Every request must get exactly one reply, either a valid
success or one error frame that is not a crash, timeout or dead worker; afterwards a
normal view works and the identity's worker is the one that was there before.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from queues.naming import queue_name
from queues.pool import SupervisorClient
from tests.fuzz_files import HostileTree, build_tree
from tests.fuzz_strategies import (
    envelope_probes,
    job_payloads,
    probes,
    raw_payloads,
    req_requests,
)
from tests.fuzz_wire import Ledger, Probe, Storm, req_storm
from tests.wire_assert import assert_error_reply, assert_success_reply

T = TypeVar("T")

#: Requests the whole module must send (issue 6).
TOTAL_REQUESTS = 10_000
BATCH = 100
PER_EXAMPLE = 10
#: Blank images are clamped to this width; a small limit keeps the run short on 2 cores
#: while every "huge xsize" still meets it.
MAX_XSIZE = 1024
#: Longest wait for a batch's replies (the bridge answers every request by itself well
#: before this: view_timeout_s + worker_start_timeout_s + its margin).
BATCH_TIMEOUT_S = 60.0
#: A worker's memory after the storm: its image LRU (512 MB by default) plus the
#: libraries; a size bomb that got through would be gigabytes.
MAX_WORKER_RSS_BYTES = 1536 << 20
STORM_RUNS = ("jobs", "raw", "envelopes", "req", "files", "explicit")

#: Each storm is ~2,000 requests through the real stack: ~15 s on an idle 2-core machine,
#: but over the suite's 120 s bound when other work shares the cores. A test cut off
#: mid-batch leaves replies in flight on the shared socket and fails the next storms too.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STORM = settings(
    deadline=None,
    database=None,
    # No shrinking: a failure message already names the offending request, and
    # shrinking against a live service could run for many minutes.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def tree() -> Iterator[HostileTree]:
    """The hostile files, world-readable (as root the workers run as ``nobody``)."""
    root = Path(tempfile.mkdtemp(prefix="is-fuzz-"))
    yield build_tree(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tree: HostileTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A storm is batches of 100 requests of one session at once: no per-session limit.
    settings_ = Settings(
        worker_idle_s=600, view_timeout_s=30, max_xsize=MAX_XSIZE, indexer_command="/bin/true",
        session_max_in_flight=0,
    )  # fmt: skip
    with Stack.start(tmp_path_factory.mktemp("fuzz-run"), settings_) as running:
        yield running


@pytest.fixture(scope="module")
def pids(stack: Stack) -> list[str]:
    """Sessions of the dev user: ESAF 0 only, and one listing odd ESAF numbers."""
    return [
        stack.add_session([0], user=dev_user()),
        stack.add_session([0, -5, 7, 51234, 2**40], user=dev_user()),
    ]


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture(scope="module")
def worker_before(stack: Stack, pids: list[str], tree: HostileTree) -> dict[str, Any]:
    """The identity's worker as the supervisor reports it before the storm."""
    job = {"type": "jpeg", "pid": pids[0], "esaf": 0, "fn": str(tree.good_eiger), "xsize": 64}
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    return _worker_row(stack)


@pytest.fixture(scope="module")
def storm(stack: Stack, worker_before: dict[str, Any]) -> Iterator[Storm]:
    forbidden = [(stack.run_dir / "task-secret").read_text().strip().encode(), b"redis://"]
    client = Storm(stack.endpoint, forbidden=forbidden)
    yield client
    client.close()


def _worker_row(stack: Stack) -> dict[str, Any]:
    client = SupervisorClient(Settings(supervisor_socket=stack.env["IS_SUPERVISOR_SOCKET"]))
    try:
        status = client.status()
    finally:
        client.close()
    account = pwd.getpwnam(dev_user())
    queue = queue_name(account.pw_uid, account.pw_gid)
    rows = [row for row in status["workers"] if row["queue"] == queue]
    assert len(rows) == 1, status
    return dict(rows[0])


def _run(storm: Storm, ledger: Ledger, name: str, batch: list[Probe]) -> None:
    ledger.record(storm.run(batch, timeout_s=BATCH_TIMEOUT_S, max_width=MAX_XSIZE))
    ledger.runs.add(name)


def _storm(
    strategy: st.SearchStrategy[T], send: Callable[[list[T]], None], *, examples: int, batch: int
) -> None:
    """``examples`` Hypothesis examples of PER_EXAMPLE requests each, sent ``batch`` at a
    time. Hypothesis keeps an example's data small (8 K choices): a whole batch per
    example would mostly overrun and be thrown away, so examples only fill the batch."""
    pending: list[T] = []

    @settings(STORM, max_examples=examples)
    @given(st.lists(strategy, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def fill(drawn: list[T]) -> None:
        pending.extend(drawn)
        if len(pending) >= batch:
            full = pending[:]
            pending.clear()
            send(full)

    fill()
    if pending:
        send(pending)


# -- the fixed list of hostile files ----------------------------------------------------


def test_hostile_files(storm: Storm, ledger: Ledger, pids: list[str], tree: HostileTree) -> None:
    """Every hostile file and path as jpeg, spots and index, twice (the second time the
    worker has opened readers and cached what it could)."""
    batch = []
    for path in tree.paths:
        for kind, field in (("jpeg", "fn"), ("spots", "fn"), ("index", "fn1")):
            job = {"type": kind, "pid": pids[0], "esaf": 0, field: path, "xsize": 100}
            payload = json.dumps(job).encode()
            batch.append(Probe((b"", payload), kind=kind, note=f"{kind} of {path!r:.200}"))
    for _ in range(2):
        replies = storm.exchange(batch, timeout_s=BATCH_TIMEOUT_S)
        ledger.record(["error" if r[0] else "success" for r in replies])
        for probe, reply in zip(batch, replies, strict=True):
            _check_file_reply(probe, reply, tree)
    ledger.runs.add("files")


def _check_file_reply(probe: Probe, reply: list[bytes], tree: HostileTree) -> None:
    """jpeg: a blank with its reason for hostile paths, an image for good ones; spots: an
    error naming the missing data; index: one frame or the indexer's (empty) result."""
    job = json.loads(probe.frames[1])
    path = job.get("fn", job.get("fn1"))
    good = path in tree.aliases or path in map(str, tree.good)
    if "\0" in path:  # "\u0000" in the JSON text: jansson refused it, and so do we
        assert_error_reply(reply, "\\u0000 is not allowed without JSON_ALLOW_NUL")
    elif job["type"] == "jpeg":
        echo, meta, _ = assert_success_reply(reply, 4)
        assert (meta != b"") == good, f"{probe.note}: meta {meta[:100]!r}"
        reason = json.loads(echo).get("error")
        assert bool(reason) == (not good and path != ""), f"{probe.note}: {reason!r}"
    elif job["type"] == "spots" and not good:
        expected = "Missing filename" if path == "" else "Missing data for job"
        assert_error_reply(reply, expected)
    elif job["type"] == "spots":
        assert "spots" in json.loads(assert_success_reply(reply, 3)[1])
    elif reply[0]:
        assert_error_reply(reply, "")
    else:
        assert_success_reply(reply, 3)


# -- generated storms -------------------------------------------------------------------


def test_storm_of_hostile_jobs(
    storm: Storm, ledger: Ledger, pids: list[str], tree: HostileTree
) -> None:
    """Well-formed JSON jobs with a valid session and hostile fields (4,500 requests)."""
    strategy = probes(job_payloads(pids, tree.paths))
    _storm(strategy, partial(_run, storm, ledger, "jobs"), examples=450, batch=BATCH)


def test_storm_of_raw_payloads(storm: Storm, ledger: Ledger, pids: list[str]) -> None:
    """Payload bytes: noise, non-UTF-8, cut JSON, NaN, surrogates, deep nesting (2,500)."""
    strategy = probes(raw_payloads(pids))
    _storm(strategy, partial(_run, storm, ledger, "raw"), examples=250, batch=BATCH)


def test_storm_of_broken_envelopes(
    storm: Storm, ledger: Ledger, pids: list[str], tree: HostileTree
) -> None:
    """Multipart shapes: up to 80 routing frames, no delimiter, no payload (2,500)."""
    strategy = envelope_probes(job_payloads(pids, tree.paths) | raw_payloads(pids))
    _storm(strategy, partial(_run, storm, ledger, "envelopes"), examples=250, batch=BATCH)


def test_storm_through_req_clients(
    stack: Stack, ledger: Ledger, pids: list[str], tree: HostileTree
) -> None:
    """The same requests from REQ clients, 50 at a time, as is.js sends them (1,000)."""
    strategy = req_requests(job_payloads(pids, tree.paths) | raw_payloads(pids))

    def send(batch: list[tuple[list[bytes], str | None, str]]) -> None:
        ledger.record(
            req_storm(stack.endpoint, batch, timeout_s=BATCH_TIMEOUT_S, max_width=MAX_XSIZE)
        )

    _storm(strategy, send, examples=100, batch=50)
    ledger.runs.add("req")


def test_explicit_hostile_envelopes(storm: Storm, ledger: Ledger, pids: list[str]) -> None:
    """Shapes too big to generate often: oversized payloads, 70 routing frames, 10 MB."""
    job = json.dumps({"type": "jpeg", "pid": pids[0], "esaf": 0, "fn": ""}).encode()
    batch = [
        Probe((b"", b" " * (1 << 20) + b"{}"), note="payload over 1 MiB"),
        Probe((b"", b'{"k":1,' * 200_000 + b'"k":2}'), note="1.4 MB of duplicate keys"),
        Probe((b"", job, b"x" * (10 << 20)), kind="jpeg", note="10 MB extra frame"),
        Probe((*(b"r%d" % i for i in range(70)), b"", job), echo=70, note="70 routing frames"),
        Probe(
            (*(b"r%d" % i for i in range(61)), b"", job),
            echo=61,
            kind="jpeg",
            note="61 routing frames (64 with the tag, id and delimiter)",
        ),
        Probe((b"r",) * 500, echo=499, note="500 frames, no delimiter"),
        Probe((b"", job, *([b""] * 100)), kind="jpeg", note="100 empty frames after"),
    ]
    _run(storm, ledger, "explicit", batch * 3)


# -- afterwards -------------------------------------------------------------------------


def test_service_after_the_storm(
    stack: Stack,
    ledger: Ledger,
    pids: list[str],
    tree: HostileTree,
    worker_before: dict[str, Any],
) -> None:
    """At least 10,000 requests were answered, a normal view works, nothing died."""
    if not ledger.runs.issuperset(STORM_RUNS):
        pytest.skip(f"needs the whole module; ran only {sorted(ledger.runs)}")
    assert ledger.sent >= TOTAL_REQUESTS, ledger
    assert ledger.errors and ledger.successes, ledger
    for good in tree.good:
        job = {"type": "jpeg", "pid": pids[0], "esaf": 0, "fn": str(good), "xsize": 256}
        echo, meta, _ = assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
        assert json.loads(meta)["fn"] == str(good) and "wval_used" in json.loads(echo)
    assert stack.dead() == []
    after = _worker_row(stack)
    assert (after["pid"], after["epoch"]) == (worker_before["pid"], worker_before["epoch"])
    assert after["state"] == "running" and after["ready"], after
    _assert_no_strays(stack, after["pid"])
    rss_bytes = _rss_bytes(after["pid"])
    assert rss_bytes < MAX_WORKER_RSS_BYTES, f"worker holds {rss_bytes >> 20} MiB"


def _assert_no_strays(stack: Stack, worker_pid: int) -> None:
    """No zombie and no leftover process (indexer runs) under the supervisor."""
    supervisor = next(c.process.pid for c in stack.components if c.name == "supervisor")
    tree = _descendants(supervisor)
    zombies = [pid for pid, state in tree.items() if state == "Z"]
    assert not zombies, f"zombies under the supervisor: {zombies}"
    assert worker_pid in tree
    # The zygote and the one worker; a worker's own threads are not processes.
    assert len(tree) <= 3, f"processes under the supervisor: {tree}"


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _descendants(root: int) -> dict[int, str]:
    """pid -> state of every process below ``root``."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = (int(fields[1]), fields[0])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = state
                frontier.append(pid)
    return found
