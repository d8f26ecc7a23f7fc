"""Admin prefetch: warm an ESAF's reduced-image cache for a dataset (``isctl prefetch``).

Work is sent as one ``is.prefetch`` task per frame (istasks.prefetch_task, the worker
side) to the identity's ``:prefetch`` queue at Redis priority 9, the last list a
worker's BRPOP looks at (field notes 3.5). One frame per task because a worker takes a
message only when a thread is free (``worker_disable_prefetch``): small tasks let the
interactive queue in between every frame, and all sizes of a frame share one task so
the frame is located and opened once. A run keeps only ``prefetch_window`` tasks in
flight (default 1), so at most that many of the worker's threads do prefetch while the
others stay free for views, and the worker reduces prefetch frames at a lower CPU
priority than views. ``--no-wait`` queues everything at once; queue priority then
still puts views first. Progress comes back as the tasks' results.

Planning runs as the invoking user (root): it opens each dataset for its frame count,
never its pixels. ``--watch`` is ops.prefetch_watch.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from istasks.app import create_app, master_secret
from istasks.core.params import MIN_XSIZE
from istasks.core.readers import open_reader
from istasks.errors import IsError, WorkerUnavailable
from istasks.prefetch_task import (
    DONE,
    ERROR,
    MISSING,
    PREFETCH_TASK,
    TIMEOUT,
    PrefetchError,
    prefetch_job,
)
from istasks.settings import Settings
from ops.prefetch_progress import ProgressBar, Tally
from ops.prefetch_tree import DATASET_PATTERNS
from queues.envelope import seal
from queues.identity import IdentityResolver, IdRange
from queues.naming import Identity
from queues.pool import SupervisorClient

#: Redis priority of prefetch messages: 9 is the lowest, its list is read last.
PREFETCH_PRIORITY = 9
DEFAULT_SIZES = (384, 1024)
#: Longest wait for one frame's result before the run gives up on the worker.
DEFAULT_TIMEOUT_S = 120.0
#: What kombu and redis-py raise when the broker or result backend is unreachable.
_BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)
_FRAMES_RE = re.compile(r"([0-9]{1,9})(?:-([0-9]{1,9}))?")

# -- what to prefetch (admin side) -------------------------------------------------------


@dataclass(frozen=True)
class FrameRange:
    """``--frames A-B``: 1-based, inclusive."""

    first: int
    last: int


@dataclass(frozen=True)
class FrameTask:
    """One frame of one file (frame 0: the file itself, for errors found planning)."""

    path: str
    frame: int


@dataclass(frozen=True)
class Outcome:
    """What became of one task."""

    task: FrameTask
    status: str
    error: str = ""

    def describe(self) -> str:
        """``path frame N: error`` for the summary."""
        task = self.task
        where = task.path if task.frame == 0 else f"{task.path} frame {task.frame}"
        return f"{where}: {self.error or self.status}"


def parse_sizes(text: str, max_xsize: int) -> tuple[int, ...]:
    """``"384,1024"`` -> (384, 1024): distinct widths within MIN_XSIZE..``max_xsize``."""
    sizes: list[int] = []
    for part in text.split(","):
        try:
            size = int(part.strip())
        except ValueError:
            raise PrefetchError(f"--sizes {text!r}: {part.strip()!r} is not a number") from None
        if not MIN_XSIZE <= size <= max_xsize:
            raise PrefetchError(f"--sizes: {size} is outside {MIN_XSIZE}..{max_xsize}")
        if size not in sizes:
            sizes.append(size)
    return tuple(sizes)


def parse_frames(text: str) -> FrameRange:
    """``"A-B"`` or ``"A"`` -> FrameRange (1 <= A <= B), or PrefetchError."""
    match = _FRAMES_RE.fullmatch(text.strip())
    if match is None:
        raise PrefetchError(f"--frames {text!r}: expected A-B (e.g. 1-100) or A")
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    if not 1 <= first <= last:
        raise PrefetchError(f"--frames {text!r}: need 1 <= A <= B (frames are 1-based)")
    return FrameRange(first, last)


def dataset_paths(directory: Path) -> list[Path]:
    """The files of ``directory`` matching :data:`DATASET_PATTERNS`, sorted, absolute."""
    found = {p for pattern in DATASET_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(Path(os.path.abspath(p)) for p in found)


def frame_count(path: Path) -> int:
    """The dataset's frame count, read as the invoking user (IsError when unreadable)."""
    reader = open_reader(str(path))
    try:
        return reader.frame_count
    finally:
        reader.close()


def frame_numbers(path: Path, count: int, frames: FrameRange | None) -> range:
    """The frames to prefetch of a ``count``-frame dataset; PrefetchError when the range
    does not fit it."""
    if frames is None:
        return range(1, count + 1)
    if frames.last > count:
        raise PrefetchError(f"--frames {frames.first}-{frames.last}: {path} has {count} frame(s)")
    return range(frames.first, frames.last + 1)


@dataclass(frozen=True)
class Options:
    """How to prefetch (the ``isctl prefetch`` options)."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    frames: FrameRange | None = None
    window: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class Plan:
    """The tasks of a run and the files that could not even be opened."""

    tasks: list[FrameTask] = field(default_factory=list)
    errors: list[Outcome] = field(default_factory=list)


def plan(target: Path, frames: FrameRange | None) -> Plan:
    """Every frame task for a master file or a directory of datasets. An unreadable or
    missing file is an error of the plan, not of the run; a bad --frames is raised."""
    paths = dataset_paths(target) if target.is_dir() else [Path(os.path.abspath(target))]
    if not paths:
        raise PrefetchError(f"{target}: no {', '.join(DATASET_PATTERNS)} files")
    result = Plan()
    for path in paths:
        try:
            count = frame_count(path)
        except IsError as exc:
            result.errors.append(Outcome(FrameTask(str(path), 0), ERROR, exc.wire_text()))
            continue
        result.tasks += [FrameTask(str(path), n) for n in frame_numbers(path, count, frames)]
    return result


# -- who runs it -------------------------------------------------------------------------


def resolve_identity(settings: Settings, esaf: int, user: str | None = None) -> Identity:
    """The identity prefetch runs as, by the bridge's own NSS rules (queues.identity):
    without ``user`` the ESAF account ``e<esaf>`` (policy "esaf"); with ``user`` that
    account's uid and its primary gid, or the ESAF's gid above 40000 (policy "user").
    The cache is shared per gid, so either warms what the ESAF's users will view."""
    if esaf < 0 or (esaf == 0 and user is None):
        raise PrefetchError(f"--esaf {esaf} has no ESAF account: name one with --user NAME")
    resolver = IdentityResolver(
        "esaf" if user is None else "user",
        uids=IdRange(settings.uid_min, settings.uid_max),
        gids=IdRange(settings.gid_min, settings.gid_max),
    )
    return resolver.resolve(user, esaf)


class Sender:
    """Seals ``is.prefetch`` tasks for one identity, sends them to its ``:prefetch`` queue
    at the lowest priority and reads their results (stored under the identity's prefix)."""

    def __init__(self, settings: Settings, identity: Identity) -> None:
        try:
            self._secret = master_secret(settings)
        except ValueError as exc:
            raise PrefetchError(str(exc)) from None
        self.identity = identity
        self._max_age_s = settings.prefetch_max_age_s
        self._app = create_app(settings, identity)
        socket_path = settings.supervisor_socket
        self._pool = SupervisorClient(settings) if os.path.exists(socket_path) else None
        self._run = uuid.uuid4().hex[:12]
        self._sent = 0

    @property
    def supervised(self) -> bool:
        """True when a supervisor starts the identity's worker on demand."""
        return self._pool is not None

    def ensure_worker(self) -> None:
        """Start the identity's worker (cheap when running; keeps it from being reaped as
        idle during a long run). Without a supervisor, workers are someone else's job."""
        if self._pool is not None:
            self._pool.ensure(self.identity)

    def send(
        self, task: FrameTask, sizes: tuple[int, ...], *, keep_result: bool = True
    ) -> AsyncResult:
        """Queue one frame; WorkerUnavailable when the broker cannot be reached."""
        self.ensure_worker()
        self._sent += 1
        rid = f"prefetch-{self._run}-{self._sent}"
        job = prefetch_job(task.path, task.frame, sizes)
        token = seal(self._secret, self.identity.queue, {"job": job, "rid": rid})
        try:
            return self._app.send_task(
                PREFETCH_TASK,
                args=[token],
                queue=self.identity.prefetch_queue,
                priority=PREFETCH_PRIORITY,
                expires=self._max_age_s,  # never run what the worker would refuse anyway
                task_id=rid,
                ignore_result=not keep_result,
            )
        except _BROKER_ERRORS as exc:
            raise WorkerUnavailable(f"cannot queue prefetch tasks: {exc}") from exc

    def outcome(self, task: FrameTask, result: AsyncResult, timeout_s: float) -> Outcome:
        """Wait for one task's report."""
        try:
            value = result.get(timeout=timeout_s, propagate=False)
        except CeleryTimeoutError:
            queue = self.identity.prefetch_queue
            return Outcome(
                task, TIMEOUT, f"no result within {timeout_s:g} s (no worker on {queue}?)"
            )
        except _BROKER_ERRORS as exc:
            return Outcome(task, TIMEOUT, f"result backend unavailable: {exc}")
        state = result.state
        with contextlib.suppress(*_BROKER_ERRORS):
            result.forget()  # read once; do not leave it for result_expires
        return _outcome_from(task, state, value)

    def close(self) -> None:
        """Release the broker, backend and supervisor connections."""
        if self._pool is not None:
            self._pool.close()
        self._app.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _outcome_from(task: FrameTask, state: str, value: object) -> Outcome:
    if state == "SUCCESS" and isinstance(value, dict):
        status, error = value.get("status"), value.get("error")
        if status in (DONE, MISSING, ERROR):
            return Outcome(task, str(status), str(error or ""))
        if isinstance(error, str):  # a refused call shape answers like istasks.tasks
            return Outcome(task, ERROR, error)
    if state == "REVOKED":
        return Outcome(task, ERROR, "expired in the queue before a worker took it")
    return Outcome(task, ERROR, f"task ended in state {state}")


class Window:
    """Tasks in flight, at most ``options.window``; outcomes are collected in sending
    order, each waited for at most ``options.timeout_s``."""

    def __init__(self, sender: Sender, options: Options) -> None:
        self._sender, self._options = sender, options
        self._flying: collections.deque[tuple[FrameTask, AsyncResult]] = collections.deque()

    @property
    def full(self) -> bool:
        """True when no more may be sent before one comes back."""
        return len(self._flying) >= max(1, self._options.window)

    def __len__(self) -> int:
        return len(self._flying)

    def send(self, task: FrameTask) -> None:
        """Send one more task."""
        self._flying.append((task, self._sender.send(task, self._options.sizes)))

    def next_outcome(self) -> Outcome:
        """Wait for the oldest task in flight."""
        task, result = self._flying.popleft()
        return self._sender.outcome(task, result, self._options.timeout_s)


def run_tasks(
    flight: Window, tasks: Iterable[FrameTask], on_outcome: Callable[[Outcome], bool]
) -> None:
    """Send ``tasks`` through ``flight``, calling ``on_outcome`` for every result; once it
    returns False nothing more is sent, but what is in flight is still collected."""
    going = True
    for task in tasks:
        while going and flight.full:
            going = on_outcome(flight.next_outcome())
        if not going:
            break
        flight.send(task)
    while flight:
        on_outcome(flight.next_outcome())


# -- a run --------------------------------------------------------------------------------


def prefetch(
    sender: Sender, work: Plan, options: Options, progress: ProgressBar | None = None
) -> Tally:
    """Run ``work`` to the end, ``options.window`` tasks in flight; the tally of outcomes.

    A task without an answer in ``options.timeout_s`` stops the run (the worker is gone
    or stuck): what was not sent is reported as not done.
    """
    tally = Tally(total=len(work.tasks), errors=[o.describe() for o in work.errors])

    def on_outcome(outcome: Outcome) -> bool:
        if outcome.status == DONE:
            tally.done += 1
        else:
            tally.errors.append(outcome.describe())
        if progress is not None:
            progress.draw(tally)
        return outcome.status != TIMEOUT

    if progress is not None:
        progress.draw(tally, force=True)
    run_tasks(Window(sender, options), work.tasks, on_outcome)
    if progress is not None:
        progress.finish(tally)
    return tally


def enqueue(sender: Sender, work: Plan, sizes: tuple[int, ...]) -> int:
    """Queue every task at once without waiting for results (``--no-wait``); how many."""
    for task in work.tasks:
        sender.send(task, sizes, keep_result=False)
    return len(work.tasks)


def command(
    settings: Settings,
    identity: Identity,
    options: Options,
    target: Path,
    *,
    wait: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``isctl prefetch MASTER_OR_DIR``: exit status 0 when every frame was done (or, with
    ``wait=False``, queued), 1 otherwise, 130 on Ctrl-C."""
    out, err = out or sys.stdout, err or sys.stderr
    work = plan(target, options.frames)
    sender = Sender(settings, identity)
    try:
        if not sender.supervised:
            print(f"prefetch: no supervisor at {settings.supervisor_socket}: a worker must "
                  f"already consume {identity.prefetch_queue}", file=err)  # fmt: skip
        if not wait:
            count = enqueue(sender, work, options.sizes)
            for outcome in work.errors:
                print(f"  error: {outcome.describe()}", file=err)
            print(f"queued {count} prefetch task(s) on {identity.prefetch_queue}", file=out)
            return 1 if work.errors else 0
        return 0 if prefetch(sender, work, options, ProgressBar(err)).ok else 1
    except KeyboardInterrupt:
        print("\nprefetch: interrupted (tasks already queued still run)", file=err)
        return 130
    finally:
        sender.close()
