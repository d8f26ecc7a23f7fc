"""Index runs started over HTTP and their progress as Server-Sent Events.

An is.js client names a ``progressPublisher`` channel and subscribes to it on the session
Redis, where the dispatcher's relay (bridge.progress) republishes the worker's progress.
The gateway does the same on the client's behalf: it subscribes to a fresh channel of its
own (``isgw-<run id>``) *before* sending the task, keeps every message of the run, and
replays them to each ``GET .../events`` stream, followed by the indexer's result. A run
belongs to the session that started it. Runs are bounded (:data:`MAX_RUNS`); finished
ones are forgotten oldest first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bridge.gateway.problems import Problem, error_status

log = logging.getLogger(__name__)

#: Runs remembered (running or finished); a new one beyond this evicts the oldest finished.
MAX_RUNS = 64
#: Runs in progress at once, all sessions together (each holds one Redis subscription).
MAX_RUNNING = 16
#: After the result, how long the last progress messages may still arrive.
TAIL_S = 1.0
#: Runs in progress at once for one session (one user cannot take every slot).
MAX_RUNNING_PER_SESSION = 2
#: A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
#: Progress messages kept per run (the indexer's are a few dozen).
MAX_EVENTS = 1000
CHANNEL_PREFIX = "isgw-"


@dataclass
class IndexRun:
    """One index request: who started it, what it said so far, and whether it ended."""

    run_id: str
    pid: str
    esaf: int
    channel: str
    events: list[tuple[str, str]] = field(default_factory=list)  # (event name, data)
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, event: str, data: str, *, final: bool = False) -> None:
        """Record one event and wake the streams."""
        async with self.changed:
            if len(self.events) < MAX_EVENTS or final:
                self.events.append((event, data))
            self.done = self.done or final
            self.changed.notify_all()

    async def stream(self) -> AsyncIterator[str]:
        """The run's events as SSE text, from the first, until the final one."""
        sent = 0
        while True:
            async with self.changed:
                if sent == len(self.events) and not self.done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), KEEPALIVE_S)
                pending, finished = self.events[sent:], self.done
            if not pending and not finished:
                yield ": keepalive\n\n"
                continue
            for name, data in pending:
                sent += 1
                lines = "".join(f"data: {line}\n" for line in data.split("\n"))
                yield f"id: {sent}\nevent: {name}\n{lines}\n"
            if finished and sent == len(self.events):
                return


class IndexRuns:
    """The gateway's index runs; used from the event loop only."""

    def __init__(self, progress_url: str | None) -> None:
        self._url = progress_url
        self._runs: OrderedDict[str, IndexRun] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, run_id: str, pid: str) -> IndexRun:
        """The run ``run_id`` of session ``pid``; 404 for another session's (not 403:
        whether a run exists is nobody else's business)."""
        run = self._runs.get(run_id)
        if run is None or not secrets.compare_digest(run.pid, pid):
            raise Problem(404, f"no index run {run_id[:40]!r} for this session")
        return run

    def new(self, pid: str, esaf: int) -> IndexRun:
        """Register a run (503 when too many are running)."""
        mine = sum(not r.done and r.pid == pid for r in self._runs.values())
        if mine >= MAX_RUNNING_PER_SESSION:
            raise Problem(
                429,
                f"{mine} index runs of this session are in progress",
                headers={"Retry-After": "10"},
            )
        if sum(not r.done for r in self._runs.values()) >= MAX_RUNNING:
            raise Problem(
                503,
                "too many index runs in progress; try again later",
                headers={"Retry-After": "10"},
            )
        while len(self._runs) >= MAX_RUNS:
            oldest = next((k for k, r in self._runs.items() if r.done), None)
            if oldest is None:
                break
            del self._runs[oldest]
        run_id = secrets.token_urlsafe(12)
        run = IndexRun(run_id, pid, esaf, CHANNEL_PREFIX + run_id)
        self._runs[run_id] = run
        return run

    async def subscribe(self, run: IndexRun) -> aioredis.client.PubSub | None:
        """Subscribe to ``run``'s progress channel (None: no progress Redis, or it is
        down: the run still gives its result)."""
        if not self._url:
            return None
        client = aioredis.Redis.from_url(self._url, socket_connect_timeout=2.0)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(run.channel)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("index progress not followed (%s)", exc)
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()
            return None
        return pubsub

    def follow(
        self,
        run: IndexRun,
        pubsub: aioredis.client.PubSub | None,
        future: concurrent.futures.Future[list[bytes]],
    ) -> None:
        """Relay ``run``'s progress until ``future`` (the dispatch) resolves, then its result."""
        task = asyncio.create_task(self._follow(run, pubsub, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(
        self,
        run: IndexRun,
        pubsub: aioredis.client.PubSub | None,
        future: concurrent.futures.Future[list[bytes]],
    ) -> None:
        waiting = asyncio.wrap_future(future)
        try:
            while not waiting.done():
                if pubsub is None:
                    await asyncio.wait({waiting})
                    break
                await self._relay(run, pubsub, 0.25)
            frames = await waiting
            if pubsub is not None:  # the relay may still be publishing the last ones
                deadline = time.monotonic() + TAIL_S
                while time.monotonic() < deadline and not await self._relay(run, pubsub, 0.1):
                    pass
            await run.add(*_result_event(frames), final=True)
        except Exception as exc:  # never leave a stream waiting forever
            log.exception("index run %s failed", run.run_id)
            body = {"status": 500, "title": "Internal error", "detail": type(exc).__name__}
            await run.add("error", json.dumps(body), final=True)
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _relay(self, run: IndexRun, pubsub: aioredis.client.PubSub, wait_s: float) -> bool:
        """Relay at most one progress message; True when it was the indexer's last."""
        try:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("index progress lost (%s)", exc)
            await asyncio.sleep(wait_s)
            return False
        if message is None or message.get("type") != "message":
            return False
        data = message["data"]
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        await run.add("progress", text)
        try:
            return bool(json.loads(text).get("done"))
        except (ValueError, AttributeError):
            return False

    async def close(self) -> None:
        """Cancel the relays (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _result_event(frames: list[bytes]) -> tuple[str, str]:
    """The final event of a run: ``result`` with the indexer's JSON (null when it gave
    none) or ``error`` with a problem object."""
    if frames and frames[0]:
        status = error_status(frames)
        detail = frames[0].decode("utf-8", "replace")
        return "error", json.dumps({"status": status, "title": "Index failed", "detail": detail})
    raw = frames[2] if len(frames) > 2 else b""
    result: Any = None
    if raw:
        try:
            result = json.loads(raw)
        except ValueError:
            result = raw.decode("utf-8", "replace")
    return "result", json.dumps({"result": result})
