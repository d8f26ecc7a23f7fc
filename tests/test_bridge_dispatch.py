"""The dispatcher when workers die (issue 19), against a real Redis.

The pool is scripted (which worker lives, which died and when) and the test plays the
worker: it reads the task messages from the identity's queue and publishes results
where a worker would. So every order of events is exact: a death before or after a
send, a result that comes late, a retry that also dies.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import redis

from bridge.dispatch import RETRY_MIN_S, WATCH_INTERVAL_S, CeleryDispatcher, result_key
from istasks.app import create_app
from istasks.errors import WorkerUnavailable
from istasks.replies import success_frames
from istasks.settings import Settings
from queues.envelope import open_envelope, queue_key
from queues.liveness import INTERVAL_S, TTL_S, Heartbeat
from queues.naming import Identity
from queues.pool import Gone, WorkerState
from queues.workers import refusal
from tests.processes import wait_for

SECRET = "dispatch-test-secret"
IDENT = Identity(4101, 5101)
#: Longest a death takes to be acted on: a watchdog period, with room for a slow machine.
NOTICE_S = WATCH_INTERVAL_S + 2.0


class ScriptedPool:
    """A worker pool whose workers live and die when the test says so."""

    def __init__(self) -> None:
        self.live: int | None = 1
        self.gone: list[Gone] = []
        self.ensured: list[int] = []
        self._stale: int | None = None
        self._next = 2
        self._lock = threading.Lock()

    def ensure(self, identity: Identity) -> int:
        with self._lock:
            if self._stale is not None:  # as a cached answer would: the dead one
                epoch, self._stale = self._stale, None
            else:
                if self.live is None:
                    self.live, self._next = self._next, self._next + 1
                epoch = self.live
            self.ensured.append(epoch)
            return epoch

    def epoch(self, identity: Identity) -> int | None:
        return self.state(identity).epoch

    def state(self, identity: Identity) -> WorkerState:
        with self._lock:
            return WorkerState(self.live, tuple(self.gone))

    def kill(self, *, at_s: float | None, stale: bool = False) -> None:
        """The live worker dies; it was noticed at ``at_s`` (None: when is not known).
        ``stale``: the next ensure still answers its epoch."""
        with self._lock:
            assert self.live is not None
            self.gone.append(Gone(self.live, at_s))
            self._stale = self.live if stale else None
            self.live = None


class Queue:
    """The identity's queue and result keys, as its worker sees them."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.redis = redis.Redis.from_url(url)
        self.app = create_app(settings)
        self.max_age_s = settings.task_max_age_s

    def messages(self) -> list[dict[str, Any]]:
        """The task messages waiting, oldest first."""
        raw = self.redis.lrange(IDENT.queue, 0, -1)
        return [json.loads(m) for m in reversed(raw)]  # LPUSH'd: newest first

    def wait_messages(self, count: int, timeout_s: float = NOTICE_S) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.messages()) >= count, timeout_s, f"{count} message(s)")
        return self.messages()

    def payload(self, message: dict[str, Any]) -> dict[str, Any]:
        """The envelope's payload, opened as the worker would (key, queue, age)."""
        args = json.loads(base64.b64decode(message["body"]))[0]
        key = queue_key(SECRET.encode(), IDENT.queue)
        return open_envelope(key, IDENT.queue, args[0], self.max_age_s)

    def answer(self, message: dict[str, Any], *frames: bytes) -> bytes:
        """Store and publish a successful result for the message's task; its key."""
        task_id = message["headers"]["id"]
        result = {"frames": list(frames), "cache": "computed", "elapsed_ms": 1.0}
        meta = {"status": "SUCCESS", "task_id": task_id, "result": result}
        payload = self.app.backend.encode(meta)
        key = result_key(IDENT, task_id)
        self.redis.set(key, payload, ex=60)
        self.redis.publish(key, payload)
        return key

    def close(self) -> None:
        self.redis.close()
        self.app.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, task_secret=SECRET, view_timeout_s=10.0)


@pytest.fixture
def queue(redis_url: str, settings: Settings) -> Iterator[Queue]:
    q = Queue(redis_url, settings)
    yield q
    q.close()


@pytest.fixture
def make_dispatcher() -> Iterator[Callable[[Settings, ScriptedPool], CeleryDispatcher]]:
    made: list[CeleryDispatcher] = []

    def make(settings: Settings, pool: ScriptedPool) -> CeleryDispatcher:
        dispatcher = CeleryDispatcher(create_app(settings), settings, pool)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


def _resolved(future: Future[list[bytes]]) -> list[bytes]:
    return future.result(timeout=NOTICE_S)


@pytest.mark.parametrize("clock", ["shared", "unknown"])
def test_view_whose_worker_died_is_sent_again_and_answered_once(
    settings: Settings, queue: Queue, make_dispatcher: Any, clock: str
) -> None:
    """The worker dies after the send: the view is sealed and sent once more, to the new
    worker, under a new task id; the first result to come answers it, the other one
    (the first send's, late after all) is dropped and its key deleted."""
    pool = ScriptedPool()
    dispatcher = make_dispatcher(settings, pool)
    job = {"type": "jpeg", "fn": "/data/x_master.h5", "frame": 3}
    future = dispatcher.submit(IDENT, "jpeg", job, "r-again")
    (first,) = queue.wait_messages(1)
    pool.kill(at_s=time.monotonic() if clock == "shared" else None)
    first, again = queue.wait_messages(2)
    assert pool.ensured == [1, 2]
    assert first["headers"]["id"] != again["headers"]["id"]
    assert queue.payload(first) == queue.payload(again) == {"job": job, "rid": "r-again"}
    assert again["headers"]["expires"] <= first["headers"]["expires"]  # the same deadline
    assert not future.done()
    queue.answer(again, b"echo", b"meta", b"jpeg-again")
    assert _resolved(future) == success_frames(b"echo", b"meta", b"jpeg-again")
    late = queue.answer(first, b"echo", b"meta", b"jpeg-first")
    wait_for(lambda: queue.redis.exists(late) == 0, 5.0, "the late result deleted")
    assert future.result() == success_frames(b"echo", b"meta", b"jpeg-again")
    assert dispatcher.pending_count == 0
    assert len(queue.messages()) == 2  # nothing sent a third time


def test_view_sent_again_whose_new_worker_dies_too_fails(
    settings: Settings, queue: Queue, make_dispatcher: Any
) -> None:
    pool = ScriptedPool()
    future = make_dispatcher(settings, pool).submit(IDENT, "spots", {"type": "spots"}, "r-2x")
    queue.wait_messages(1)
    pool.kill(at_s=time.monotonic())
    queue.wait_messages(2)
    wait_for(lambda: pool.live is not None and pool.ensured[-1] == pool.live, 5.0, "resend")
    pool.kill(at_s=time.monotonic())
    assert _resolved(future) == [b"bridge: worker for 4101:5101 died while serving spots "
                                 b"(request r-2x)"]  # fmt: skip
    assert len(queue.messages()) == 2


def test_index_whose_worker_died_is_not_sent_again(
    settings: Settings, queue: Queue, make_dispatcher: Any
) -> None:
    pool = ScriptedPool()
    future = make_dispatcher(settings, pool).submit(IDENT, "index", {"type": "index"}, "r-ix")
    queue.wait_messages(1)
    pool.kill(at_s=time.monotonic())
    assert _resolved(future) == [b"bridge: worker for 4101:5101 died while serving index "
                                 b"(request r-ix)"]  # fmt: skip
    assert len(queue.messages()) == 1 and pool.ensured == [1]


def test_view_without_time_left_is_not_sent_again(
    redis_url: str, queue: Queue, make_dispatcher: Any
) -> None:
    settings = Settings(redis_url=redis_url, task_secret=SECRET, view_timeout_s=RETRY_MIN_S)
    pool = ScriptedPool()
    future = make_dispatcher(settings, pool).submit(IDENT, "jpeg", {"type": "jpeg"}, "r-late")
    queue.wait_messages(1)
    pool.kill(at_s=time.monotonic())
    assert b"died while serving jpeg" in _resolved(future)[0]
    assert len(queue.messages()) == 1


@pytest.mark.parametrize("kind", ["jpeg", "index"])
def test_request_sent_to_a_worker_already_dead_waits_for_the_next_one(
    settings: Settings, queue: Queue, make_dispatcher: Any, kind: str
) -> None:
    """The pool's (cached) answer named a worker that had died before the send: that
    worker never saw the task, which waits in the queue. The request is not failed nor
    sent again; a new worker is started and its answer is the reply."""
    pool = ScriptedPool()
    pool.kill(at_s=time.monotonic(), stale=True)
    future = make_dispatcher(settings, pool).submit(IDENT, kind, {"type": kind}, "r-next")
    (message,) = queue.wait_messages(1)
    wait_for(lambda: pool.ensured == [1, 2], NOTICE_S, "a new worker for the request")
    time.sleep(2 * WATCH_INTERVAL_S)
    assert not future.done() and len(queue.messages()) == 1
    queue.answer(message, b"echo", b"result")
    assert _resolved(future) == success_frames(b"echo", b"result")


@pytest.mark.parametrize(
    ("gone", "lost"),
    [
        ((), False),
        ((Gone(7, 9.0),), False),  # noticed before the send: never saw the task
        ((Gone(7, 10.0),), True),
        ((Gone(8, 11.0),), True),  # a successor that died after the send
        ((Gone(6, None),), False),  # when not known: an older worker is not ours
        ((Gone(7, None),), True),
        ((Gone(8, None),), True),
        ((Gone(None, None),), True),  # the supervisor is gone with every worker
    ],
)
def test_worker_state_lost_since(gone: tuple[Gone, ...], lost: bool) -> None:
    """A task sent at t=10 to worker 7."""
    assert WorkerState(None, gone).lost_since(7, 10.0) is lost


# -- several hosts (issue 14): other hosts' workers seen through their heartbeats -----------


class DownPool(ScriptedPool):
    """This host's supervisor is unreachable (stopped, crashed)."""

    def ensure(self, identity: Identity) -> int:
        self.ensured.append(-1)
        raise WorkerUnavailable("worker supervisor unreachable at /run/is/supervisor.sock")


def _other_host(url: str, running: list[str] | None = None) -> Heartbeat:
    """A worker of IDENT on another host, beating (listing ``running`` as its tasks)."""
    beat = Heartbeat(url, IDENT, "otherhost", "is_4101_5101@otherhost", lambda: running or [])
    beat.start()
    return beat


def _lose(beat: Heartbeat) -> None:
    """The other host vanishes: its beats stop, its key is left to expire (no clean-up)."""
    beat._stopping.set()
    beat._thread.join()


def test_view_whose_other_hosts_worker_vanished_is_sent_again(
    settings: Settings, queue: Queue, make_dispatcher: Any, redis_url: str
) -> None:
    beat = _other_host(redis_url)
    try:
        future = make_dispatcher(settings, ScriptedPool()).submit(IDENT, "jpeg", {}, "r-host")
        (first,) = queue.wait_messages(1)
        time.sleep(2 * WATCH_INTERVAL_S)  # the dispatcher has seen it beat
        lost_at = time.monotonic()
        _lose(beat)
        first, again = queue.wait_messages(2, timeout_s=TTL_S + NOTICE_S)
        assert time.monotonic() - lost_at <= TTL_S + NOTICE_S
        assert first["headers"]["id"] != again["headers"]["id"]
        queue.answer(again, b"echo", b"meta", b"jpeg")
        assert _resolved(future) == success_frames(b"echo", b"meta", b"jpeg")
    finally:
        beat.stop()


def test_index_is_failed_only_when_the_vanished_worker_ran_it(
    settings: Settings, queue: Queue, make_dispatcher: Any, redis_url: str
) -> None:
    running: list[str] = []
    beat = _other_host(redis_url, running)
    try:
        dispatcher = make_dispatcher(settings, ScriptedPool())
        theirs = dispatcher.submit(IDENT, "index", {"type": "index"}, "r-theirs")
        (message,) = queue.wait_messages(1)
        mine = dispatcher.submit(IDENT, "index", {"type": "index"}, "r-queued")
        queue.wait_messages(2)
        running.append(message["headers"]["id"])  # the other host's worker took it
        time.sleep(INTERVAL_S + 2 * WATCH_INTERVAL_S)  # beaten and read
        _lose(beat)
        assert _resolved(theirs) == [b"bridge: worker is_4101_5101@otherhost died while "
                                     b"serving index (request r-theirs)"]  # fmt: skip
        time.sleep(2 * WATCH_INTERVAL_S)
        assert not mine.done()  # never run twice, never failed while it may still run
        assert len(queue.messages()) == 2
    finally:
        beat.stop()


def test_unreachable_supervisor_sends_to_another_hosts_worker(
    settings: Settings, queue: Queue, make_dispatcher: Any, redis_url: str
) -> None:
    """Issue 14: the bridge answered "worker supervisor unreachable" although another
    host's worker consumed the queue."""
    dispatcher = make_dispatcher(settings, DownPool())
    alone = dispatcher.submit(IDENT, "jpeg", {}, "r-alone")
    assert b"worker supervisor unreachable" in _resolved(alone)[0]
    beat = _other_host(redis_url)
    try:
        future = dispatcher.submit(IDENT, "jpeg", {}, "r-elsewhere")
        (message,) = queue.wait_messages(1)
        queue.answer(message, b"echo", b"meta", b"jpeg")
        assert _resolved(future) == success_frames(b"echo", b"meta", b"jpeg")
    finally:
        beat.stop()


def test_esaf_not_served_here_goes_to_another_hosts_worker(
    queue: Queue, make_dispatcher: Any, redis_url: str
) -> None:
    settings = Settings(
        redis_url=redis_url, task_secret=SECRET, view_timeout_s=10.0, host_esafs="1,2"
    )
    pool = ScriptedPool()
    dispatcher = make_dispatcher(settings, pool)
    refused = _resolved(dispatcher.submit(IDENT, "jpeg", {}, "r-none"))
    assert b"ESAF 5101 is not served on host" in refused[0]
    beat = _other_host(redis_url)
    try:
        future = dispatcher.submit(IDENT, "jpeg", {}, "r-there")
        (message,) = queue.wait_messages(1)
        queue.answer(message, b"echo", b"meta", b"jpeg")
        assert _resolved(future) == success_frames(b"echo", b"meta", b"jpeg")
        assert pool.ensured == []  # this host's supervisor is never asked
    finally:
        beat.stop()
    assert refusal(settings, IDENT) == (
        f"ESAF 5101 is not served on host {settings.host} (IS_HOST_ESAFS)"
    )


class StartingPool(ScriptedPool):
    """A host's pool whose ensure starts a worker that beats (as its supervisor would)."""

    def __init__(self, url: str, host: str) -> None:
        super().__init__()
        self.url, self.host = url, host
        self.beats: list[Heartbeat] = []

    def ensure(self, identity: Identity) -> int:
        if not self.beats:
            node = f"is_{identity.uid}_{identity.gid}@{self.host}"
            self.beats.append(Heartbeat(self.url, identity, self.host, node))
            self.beats[0].start()
        return super().ensure(identity)


def test_a_host_not_serving_the_esaf_has_another_host_start_a_worker(
    queue: Queue, make_dispatcher: Any, redis_url: str
) -> None:
    """No worker of the identity runs anywhere: host B (not serving the ESAF) asks the
    other bridges on ``is:ensure``; host A, which serves it, starts one; B sends there."""
    base = {"redis_url": redis_url, "task_secret": SECRET, "view_timeout_s": 10.0}
    serving = StartingPool(redis_url, "hosta")
    make_dispatcher(Settings(**base, host_name="hosta"), serving)
    other = make_dispatcher(Settings(**base, host_name="hostb", host_esafs="1"), ScriptedPool())
    try:
        future = other.submit(IDENT, "jpeg", {}, "r-ask")
        (message,) = queue.wait_messages(1, timeout_s=NOTICE_S + 5.0)
        assert serving.ensured == [1]  # started on host A, on host B's request
        queue.answer(message, b"echo", b"meta", b"jpeg")
        assert _resolved(future) == success_frames(b"echo", b"meta", b"jpeg")
    finally:
        for beat in serving.beats:
            beat.stop()
