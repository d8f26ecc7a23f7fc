"""Tasks through real Celery: the CeleryDispatcher -> Redis -> ``python -m istasks.worker``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import itsdangerous
import pytest
import redis
from celery import Celery
from PIL import Image

from bridge.dispatch import CeleryDispatcher
from bridge.outcome import Reply
from bridge.progress import parse_progress
from istasks.app import create_app
from istasks.keys import progress_channel, stats_key
from istasks.settings import Settings
from ops.redisserver import free_port
from ops.testdata.eiger import write_eiger
from queues.envelope import queue_key, seal
from queues.naming import Identity
from queues.pool import Gone, WorkerState
from tests.processes import terminate, wait_for

SECRET = "celery-test-secret"
IDENT = Identity(4001, 5001)
STAND_IN_INDEXER = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
progress = os.fdopen(int(args[args.index("--progress-fd") + 1]), "w")
for step in ("indexing", "strategy"):
    progress.write(step + "\\n"); progress.flush(); time.sleep(0.05)
time.sleep(float(os.environ.get("INDEX_SLEEP_S", "0")))
sys.stderr.write("rapd says hi\\n")
with os.fdopen(int(args[args.index("--json-fd") + 1]), "w") as out:
    json.dump({{"status": "SUCCESS", "images": args[-1:]}}, out)
"""


class WorkerProcess:
    """``python -m istasks.worker --queue Q`` as production starts it (own queue key)."""

    def __init__(self, redis_url: str, queue: str, workdir: Path, env: dict[str, str]) -> None:
        self.log_path = workdir / f"worker-{queue.replace(':', '_')}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
        base.update(
            IS_REDIS_URL=redis_url,
            IS_QUEUE_KEY=queue_key(SECRET.encode(), queue).decode(),
            IS_LOG_LEVEL="INFO",
            IS_WORKER_CONCURRENCY="3",
        )
        base.update(env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "istasks.worker", "--queue", queue],
                cwd=workdir,
                env=base,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " ready on " in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # Cold shutdown (SIGQUIT): do not wait for tasks.
        terminate(self.proc, signum=signal.SIGQUIT, timeout_s=10)


class ProcessPool:
    """A WorkerPool (contract 5) over worker subprocesses, as the supervisor would be."""

    def __init__(self, redis_url: str, workdir: Path, env: dict[str, str]) -> None:
        self.redis_url, self.workdir, self.env = redis_url, workdir, env
        self.workers: dict[Identity, WorkerProcess] = {}

    def ensure(self, identity: Identity) -> int:
        worker = self.workers.get(identity)
        if worker is None or worker.proc.poll() is not None:
            worker = WorkerProcess(self.redis_url, identity.queue, self.workdir, self.env)
            worker.wait_ready()
            self.workers[identity] = worker
        return worker.proc.pid

    def epoch(self, identity: Identity) -> int | None:
        return self.state(identity).epoch

    def state(self, identity: Identity) -> WorkerState:
        """A dead worker is listed as gone at a time not known."""
        worker = self.workers.get(identity)
        if worker is None:
            return WorkerState(None)
        if worker.proc.poll() is not None:
            return WorkerState(None, (Gone(worker.proc.pid, None),))
        return WorkerState(worker.proc.pid)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "esaf-home"
    path.mkdir()
    script = path / "rapd.index"
    script.write_text(STAND_IN_INDEXER.format(python=sys.executable))
    script.chmod(0o755)
    return path


@pytest.fixture
def master(workdir: Path) -> Path:
    return write_eiger(workdir / "data", "x_1", nimages=2, shape=(512, 514))


@pytest.fixture
def worker(redis_url: str, workdir: Path) -> Iterator[WorkerProcess]:
    env = {"IS_INDEXER_COMMAND": str(workdir / "rapd.index")}
    proc = WorkerProcess(redis_url, IDENT.queue, workdir, env)
    proc.wait_ready()
    yield proc
    proc.stop()


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    return Settings(redis_url=redis_url, task_secret=SECRET, **overrides)


@pytest.fixture
def dispatcher(redis_url: str) -> Iterator[CeleryDispatcher]:
    settings = settings_for(redis_url)
    d = CeleryDispatcher(create_app(settings), settings)
    yield d
    d.close()


def ask(d: CeleryDispatcher, kind: str, job: dict[str, Any], rid: str = "r1") -> list[bytes]:
    future: Future[list[bytes]] = d.submit(IDENT, kind, job, rid)
    return future.result(timeout=30)


def decode_jpeg(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "JPEG"
        return image.size


def test_jpeg_round_trip(
    redis_url: str, worker: WorkerProcess, dispatcher: CeleryDispatcher, master: Path
) -> None:
    job = {"type": "jpeg", "pid": "p1", "esaf": 5001, "fn": "data/x_1_master.h5", "frame": 2,
           "xsize": 300, "label": "x_1", "labelHeight": 16, "tag": "t1"}  # fmt: skip
    frames = ask(dispatcher, "jpeg", job)
    assert len(frames) == 4
    assert frames[0] == b""
    echo = json.loads(frames[1])
    assert set(echo) == {*job, "wval_used", "bval_used"}
    assert frames[1] == json.dumps(echo, separators=(",", ":"), sort_keys=True).encode()
    meta = json.loads(frames[2])
    assert meta["fn"] == "data/x_1_master.h5"  # relative: resolved in the worker's cwd
    assert isinstance(meta["spots"], int)
    assert decode_jpeg(frames[3]) == (300, 316)
    # Second request, other contrast: served from the worker's cache, counted in Redis.
    again = ask(dispatcher, "jpeg", {**job, "wval": 1, "contrast": 50}, "r2")
    assert json.loads(again[1])["bval_used"] == 50
    client = redis.Redis.from_url(redis_url)
    assert client.get(stats_key(IDENT.gid, "computed")) == b"1"
    # LRU hits reach Redis from the worker's background reporter, just after the reply.
    wait_for(lambda: client.get(stats_key(IDENT.gid, "lru_hits")) == b"1", 5.0, "lru_hits 1")
    # Results are stored under the identity's own prefix, read once and deleted.
    deadline = time.monotonic() + 2
    while client.keys("*celery-task-meta-*") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.keys("*celery-task-meta-*") == []
    assert dispatcher.pending_count == 0
    assert " rid=r2 queue=4001:5001 kind=jpeg " in worker.log()
    assert isinstance(frames, Reply) and isinstance(again, Reply)  # the worker's report
    assert (frames.cache, again.cache) == ("computed", "lru") and again.worker_ms is not None


def test_blank_fallback_and_spots(
    worker: WorkerProcess, dispatcher: CeleryDispatcher, master: Path
) -> None:
    blank = ask(dispatcher, "jpeg", {"type": "jpeg", "fn": "/nonexistent/m.h5", "xsize": 64})
    assert len(blank) == 4
    assert blank[0] == b"" and blank[2] == b""
    assert "No such file" in json.loads(blank[1])["error"]
    assert decode_jpeg(blank[3]) == (64, 64)
    spots = ask(dispatcher, "spots", {"type": "spots", "fn": str(master)})
    assert len(spots) == 3
    assert json.loads(spots[1])["xsize"] == 384
    assert json.loads(spots[2])["spots"] > 0
    missing = ask(dispatcher, "spots", {"type": "spots"})
    assert missing == [b'isSpots.c isSpots: Missing filename for job {"type":"spots"}']


def test_index_with_progress_on_service_redis(
    redis_url: str, worker: WorkerProcess, dispatcher: CeleryDispatcher, master: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("progress-42")
    job = {"type": "index", "fn1": str(master), "tag": "ix", "progressPublisher": "progress-42",
           "progressAddress": "198.51.100.7", "progressPort": 1}  # fmt: skip
    frames = ask(dispatcher, "index", job)
    assert frames[:2] == [b"", json.dumps(job, separators=(",", ":"), sort_keys=True).encode()]
    assert json.loads(frames[2]) == {
        "status": "SUCCESS",
        "images": ["x_1_master.h5"],
        "stderr": "rapd says hi\n",
    }
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not messages or not messages[-1].get("done")):
        message = pubsub.get_message(timeout=0.2)
        if message is not None:
            messages.append(json.loads(message["data"]))
    pubsub.close()
    assert messages == [
        {"progress": "indexing", "done": False, "tag": "ix"},
        {"progress": "strategy", "done": False, "tag": "ix"},
        {"done": True, "tag": "ix"},
    ]


def test_progress_is_relayed_only_for_requests_in_flight(
    redis_url: str, workdir: Path, master: Path
) -> None:
    """Only (identity, channel) pairs of index requests in flight are relayed: not
    another identity's channel, not an unrequested target, nothing after the reply."""
    env = {"IS_INDEXER_COMMAND": str(workdir / "rapd.index"), "INDEX_SLEEP_S": "1"}
    proc = WorkerProcess(redis_url, IDENT.queue, workdir, env)
    proc.wait_ready()
    settings = settings_for(redis_url)
    d = CeleryDispatcher(create_app(settings), settings)
    admin = redis.Redis.from_url(redis_url)
    listener = admin.pubsub()  # type: ignore[no-untyped-call]
    listener.subscribe("mine", "other", "/0.celery.pidbox")
    own, foreign = progress_channel(IDENT.uid, IDENT.gid), progress_channel(4002, IDENT.gid)

    def inject(channel: str, target: str, message: str) -> None:
        admin.publish(channel, json.dumps({"channel": target, "message": message}))

    try:
        job = {"type": "index", "fn1": str(master), "tag": "ix", "progressPublisher": "mine"}
        future = d.submit(IDENT, "index", job, "r-p")
        first = _next_message(listener, 10)  # the worker's own first line
        assert first is not None and json.loads(first["data"])["progress"] == "indexing"
        inject(own, "mine", '"from the worker"')
        inject(foreign, "mine", '"forged by another identity"')
        inject(own, "other", '"not the requested channel"')
        inject(own, "/0.celery.pidbox", '"remote control"')
        admin.publish(own, b"not json")
        inject(own, "mine", "x" * 5000)
        assert future.result(timeout=30)[0] == b""
        inject(own, "mine", '"after the reply"')
        time.sleep(0.5)
    finally:
        d.close()
        proc.stop()
    received = [(m["channel"], m["data"]) for m in iter(lambda: _next_message(listener, 1), None)]
    listener.close()
    admin.close()
    assert (b"mine", b'"from the worker"') in received
    assert received[-1] == (b"mine", b'{"done": true, "tag": "ix"}')
    assert {channel for channel, _ in received} == {b"mine"}
    assert {data for _, data in received} == {
        b'"from the worker"',
        b'{"progress": "strategy", "done": false, "tag": "ix"}',
        b'{"done": true, "tag": "ix"}',
    }


def test_parse_progress_refuses_reserved_and_malformed_messages() -> None:
    own = progress_channel(IDENT.uid, IDENT.gid).encode()

    def wrapped(target: object, message: object = "m") -> bytes:
        return json.dumps({"channel": target, "message": message}).encode()

    assert parse_progress(own, wrapped("idx-7")) == (IDENT, "idx-7", "m")
    for target in ("is:r:5001:x", "celery-task-meta-1", "/0.celery.pidbox", "", 7):
        assert parse_progress(own, wrapped(target)) is None, target
    assert parse_progress(own, wrapped("idx-7", {"progress": 1})) is None
    assert parse_progress(own, b"[1, 2]") is None
    assert parse_progress(b"is:progress:4001", wrapped("idx-7")) is None
    assert parse_progress(b"is:progress:4001:5001:x", wrapped("idx-7")) is None


def test_sent_tasks_hide_the_envelope(redis_url: str) -> None:
    """Flower and worker logs show argsrepr/kwargsrepr, never the envelope."""
    settings = settings_for(redis_url, view_timeout_s=2.0)
    d = CeleryDispatcher(create_app(settings), settings)
    nobody = Identity(4999, 5999)
    admin = redis.Redis.from_url(redis_url)
    try:
        future = d.submit(nobody, "jpeg", {"type": "jpeg", "pid": "secret-pid"}, "r-h")
        _wait_for(lambda: admin.llen(nobody.queue) == 1, 5)
        raw = admin.lindex(nobody.queue, 0)
        future.result(timeout=10)
    finally:
        d.close()
        admin.close()
    assert isinstance(raw, bytes)
    headers = json.loads(raw)["headers"]
    assert (headers["argsrepr"], headers["kwargsrepr"]) == ("('<envelope>',)", "{}")
    assert b"secret-pid" not in raw  # only inside the (signed, base64) body


def raw_result(app: Celery, name: str, token: object, queue: str) -> Any:
    """Send a task by hand (bypassing the dispatcher) and read its result."""
    result = app.send_task(name, args=[token], queue=queue)
    try:
        return result.get(timeout=20)
    finally:
        result.forget()


def test_worker_refuses_bad_envelopes(
    redis_url: str,
    worker: WorkerProcess,
    master: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(redis_url)
    app = create_app(settings, IDENT)  # reads results under the worker's identity prefix
    job = {"job": {"type": "spots", "fn": str(master)}, "rid": "r9"}
    good = raw_result(app, "is.spots", seal(SECRET.encode(), IDENT.queue, job), IDENT.queue)
    assert set(good) == {"frames", "cache", "elapsed_ms"}
    forged = seal(b"not the secret", IDENT.queue, job)
    assert raw_result(app, "is.spots", forged, IDENT.queue) == {
        "error": "istasks envelope: task envelope signature invalid"
    }
    # Sealed (validly) for another identity's queue, then pushed onto this one.
    other = Identity(4002, 5001).queue
    misrouted = seal(SECRET.encode(), other, job)
    assert raw_result(app, "is.spots", misrouted, IDENT.queue) == {
        "error": "istasks envelope: task envelope signature invalid"
    }
    assert raw_result(app, "is.spots", ["not", "a", "token"], IDENT.queue) == {
        "error": "istasks envelope: task argument is not an envelope"
    }
    no_args = app.send_task("is.spots", args=[], queue=IDENT.queue)
    assert no_args.get(timeout=20) == {
        "error": "istasks envelope: task argument is not an envelope"
    }
    no_args.forget()
    old = int(time.time()) - 3600
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda self: old)
    expired = seal(SECRET.encode(), IDENT.queue, job)
    assert raw_result(app, "is.spots", expired, IDENT.queue) == {
        "error": "istasks envelope: task envelope expired"
    }
    assert worker.log().count("refused on queue 4001:5001") == 5


def test_burst_of_large_replies_all_arrive(
    worker: WorkerProcess,
    dispatcher: CeleryDispatcher,
    master: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job = {"type": "jpeg", "fn": str(master), "xsize": 1024}
    futures = [dispatcher.submit(IDENT, "jpeg", {**job, "wval": i}, f"b{i}") for i in range(40)]
    replies = [f.result(timeout=60) for f in futures]
    assert all(len(r) == 4 and r[0] == b"" and r[3][:2] == b"\xff\xd8" for r in replies)
    assert [json.loads(r[1])["wval_used"] for r in replies] == list(range(40))
    assert "result listener lost Redis" not in caplog.text


def test_a_busy_worker_takes_the_next_task_as_soon_as_a_thread_frees(
    redis_url: str, workdir: Path, dispatcher: CeleryDispatcher, master: Path
) -> None:
    """With its one thread busy a worker stops asking for messages; when the task ends
    it must ask again at once, also with task events off (IS_TASK_EVENTS=0: no task
    event wakes its event loop). Before the fix the loop slept until a timer fired,
    about a second per queued task: 18 s here for 20 views."""
    env = {"IS_WORKER_CONCURRENCY": "1", "IS_TASK_EVENTS": "0"}
    worker = WorkerProcess(redis_url, IDENT.queue, workdir, env)
    worker.wait_ready()
    try:
        started = time.monotonic()
        job = {"type": "jpeg", "fn": str(master), "xsize": 1024}
        futures = [dispatcher.submit(IDENT, "jpeg", {**job, "wval": n}, f"q{n}") for n in range(20)]
        replies = [f.result(timeout=60) for f in futures]
        elapsed_s = time.monotonic() - started
    finally:
        worker.stop()
    assert [json.loads(r[1])["wval_used"] for r in replies] == list(range(20))
    assert elapsed_s < 8.0, f"20 queued views took {elapsed_s:.1f} s"


def test_interactive_queue_goes_before_prefetch(
    redis_url: str, workdir: Path, master: Path
) -> None:
    """One thread busy; a prefetch task queued first still runs after an interactive one."""
    env = {"IS_INDEXER_COMMAND": str(workdir / "rapd.index"), "INDEX_SLEEP_S": "1",
           "IS_WORKER_CONCURRENCY": "1"}  # fmt: skip
    proc = WorkerProcess(redis_url, IDENT.queue, workdir, env)
    proc.wait_ready()
    settings = settings_for(redis_url)
    app = create_app(settings, IDENT)  # reads results under the worker's identity prefix
    d = CeleryDispatcher(app, settings)
    try:
        busy = d.submit(IDENT, "index", {"type": "index", "fn1": str(master)}, "busy")
        time.sleep(0.3)  # the index job holds the only thread
        token = seal(SECRET.encode(), IDENT.queue, {"job": {"type": "spots"}, "rid": "pre"})
        prefetch = app.send_task("is.spots", args=[token], queue=IDENT.prefetch_queue)
        time.sleep(0.1)
        view = d.submit(IDENT, "spots", {"type": "spots"}, "view")
        assert view.result(timeout=30)[0].startswith(b"isSpots.c isSpots: Missing filename")
        assert busy.result(timeout=30)[0] == b""
        assert prefetch.get(timeout=30)["error"].startswith("isSpots.c")
        prefetch.forget()
    finally:
        d.close()
        proc.stop()
    order = [
        line.split(" rid=")[1].split()[0] for line in proc.log().splitlines() if " rid=" in line
    ]
    assert order == ["busy", "view", "pre"]


def test_forged_dispatcher_gets_error_frame(
    redis_url: str, worker: WorkerProcess, master: Path
) -> None:
    settings = Settings(redis_url=redis_url, task_secret="some other secret")
    d = CeleryDispatcher(create_app(settings), settings)
    try:
        frames = ask(d, "jpeg", {"type": "jpeg", "fn": str(master)})
    finally:
        d.close()
    assert frames == [b"istasks envelope: task envelope signature invalid"]


def test_timeout_without_worker(redis_url: str) -> None:
    settings = settings_for(redis_url, view_timeout_s=1.0)
    d = CeleryDispatcher(create_app(settings), settings)
    try:
        started = time.monotonic()
        frames = d.submit(Identity(4999, 5999), "jpeg", {"type": "jpeg"}, "r-late").result(10)
        waited_s = time.monotonic() - started
    finally:
        d.close()
    assert frames == [b"bridge: jpeg request timed out after 1 s (request r-late)"]
    assert 0.9 <= waited_s < 2.5


def test_broker_down_answers_with_error(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = settings_for(redis_url, broker_url=dead)
    d = CeleryDispatcher(create_app(settings), settings)
    try:
        frames = d.submit(IDENT, "spots", {"type": "spots"}, "r-b").result(30)
    finally:
        d.close()
    assert len(frames) == 1
    assert frames[0].startswith(b"bridge: broker unavailable")
    assert frames[0].endswith(b"(request r-b)")


def test_unknown_kind_and_closed_dispatcher(redis_url: str) -> None:
    settings = settings_for(redis_url)
    d = CeleryDispatcher(create_app(settings), settings)
    assert d.submit(IDENT, "rsync", {}, "r").result(1) == [b"bridge: unknown task kind 'rsync'"]
    d.close()
    frames = d.submit(IDENT, "jpeg", {}, "r-c").result(1)
    assert frames == [b"bridge: dispatcher closed (request r-c)"]


def test_missing_secret_is_a_clear_error(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    with pytest.raises(ValueError, match="IS_TASK_SECRET or IS_TASK_SECRET_FILE"):
        CeleryDispatcher(create_app(settings), settings)


def test_dead_worker_is_reported_within_5_s(redis_url: str, workdir: Path, master: Path) -> None:
    env = {"IS_INDEXER_COMMAND": str(workdir / "rapd.index"), "INDEX_SLEEP_S": "60"}
    pool = ProcessPool(redis_url, workdir, env)
    settings = settings_for(redis_url)
    d = CeleryDispatcher(create_app(settings), settings, pool)
    indexers: list[int] = []
    try:
        future = d.submit(IDENT, "index", {"type": "index", "fn1": str(master)}, "r-dead")
        _wait_for(lambda: IDENT in pool.workers and bool(_indexer_pids(pool.workers[IDENT])), 30)
        indexers = _indexer_pids(pool.workers[IDENT])
        killed_at = time.monotonic()
        os.killpg(pool.workers[IDENT].proc.pid, signal.SIGKILL)
        frames = future.result(timeout=10)
        assert time.monotonic() - killed_at < 5.0
        assert frames == [b"bridge: worker for 4001:5001 died while serving index (request r-dead)"]
        # The next request starts a new worker (new epoch) and is served.
        assert ask(d, "spots", {"type": "spots", "fn": str(master)})[0] == b""
    finally:
        d.close()
        pool.close()
        for pid in indexers:  # its own session: it outlives a killed worker
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_bridge_modules_stay_light() -> None:
    code = (
        "import sys, bridge.dispatch, istasks.app; "
        "heavy = {'numpy', 'h5py', 'PIL'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _indexer_pids(worker: WorkerProcess) -> list[int]:
    """Pids of the worker's children running the stand-in indexer."""
    found = []
    # Children are listed per thread; the indexer is started from a pool thread.
    for children in Path(f"/proc/{worker.proc.pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"rapd.index" in cmdline.read_bytes():
                found.append(int(pid))
    return found


def _next_message(pubsub: Any, timeout_s: float) -> dict[str, Any] | None:
    """The next published message (subscription confirmations skipped), or None."""
    deadline = time.monotonic() + timeout_s
    while (remaining_s := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=remaining_s)
        if message is not None and message["type"] == "message":
            return dict(message)
    return None


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
