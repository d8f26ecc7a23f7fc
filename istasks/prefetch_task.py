"""The worker side of admin prefetch: the ``is.prefetch`` task (ops.prefetch sends it).

One task is one frame of one file at one or more view widths. The worker reduces the
frame at each width through the same ViewParams and cache key as a ``jpeg`` request of
that ``xsize`` (square, zoom 1), so the ESAF's later views find it in the cache, and
reports ``{"status": "done"|"missing"|"error", "error": text}``. Envelopes are opened
like every task's, but with ``prefetch_max_age_s``: a queued backlog waits behind
every view, and a replayed prefetch only warms the cache. The reduction runs at a
lower CPU priority than the views the worker serves meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from celery import Celery

from istasks.context import WorkerContext, open_job
from istasks.core.params import MIN_XSIZE
from istasks.errors import FrameNotFound, IsError, RequestError
from istasks.jobs import Job, view_params
from istasks.logs import log_value
from istasks.memory import GOVERNOR
from istasks.replies import error_text

if TYPE_CHECKING:
    from istasks.service import Service

log = logging.getLogger(__name__)

PREFETCH_TASK = "is.prefetch"
#: Nice value of the thread reducing a prefetch frame (views run at the worker's own).
PREFETCH_NICE = 10
#: Task outcomes: reduced; frame not (yet) in the data; failed; no answer in time.
DONE, MISSING, ERROR, TIMEOUT = "done", "missing", "error", "timeout"

Report = dict[str, Any]


class PrefetchError(RequestError):
    """A prefetch job or ``isctl prefetch`` arguments that make no sense (sizes, frame
    range, target). The worker reports it as the frame's error; isctl prints it."""

    origin = "prefetch"


def prefetch_job(path: str, frame: int, sizes: Iterable[int]) -> Job:
    """The job inside an ``is.prefetch`` envelope: one frame of one file, some widths."""
    return {"fn": path, "frame": frame, "sizes": list(sizes)}


def _job_fields(job: Job) -> tuple[str, int, list[int]]:
    """(fn, frame, sizes) of a prefetch job, or PrefetchError."""
    fn, frame, sizes = job.get("fn"), job.get("frame"), job.get("sizes")
    if not isinstance(fn, str) or not fn:
        raise PrefetchError("prefetch job without fn")
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 1:
        raise PrefetchError(f"prefetch job with frame {frame!r}")
    if not isinstance(sizes, list) or not sizes or not all(_is_size(s) for s in sizes):
        raise PrefetchError(f"prefetch job with sizes {sizes!r}")
    return fn, frame, sizes


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= MIN_XSIZE


def warm(service: Service, job: Job) -> None:
    """Reduce the job's frame at each size into the cache, through the same ViewParams
    (square, zoom 1) and cache key as a ``jpeg`` request ``{fn, frame, xsize}``."""
    fn, frame, sizes = _job_fields(job)
    for size in sizes:
        service.reduced(fn, view_params({"frame": frame, "xsize": size}))


def at_low_priority(work: Callable[[], None]) -> None:
    """Run ``work`` on a fresh thread at nice :data:`PREFETCH_NICE` and wait for it.

    Nice is per thread on Linux and inherited by the threads it starts (the frame
    decoder's helpers), so on a busy machine the kernel gives views running on the
    worker's other threads the CPU first. A fresh thread because an unprivileged
    process can never lower a nice value again: a pool thread would stay slow for
    every view it serves afterwards.
    """
    failure: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):  # best effort: a plain thread still works
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
        try:
            work()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="is-prefetch", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def run_prefetch(context: WorkerContext, token: object) -> Report:
    """The ``is.prefetch`` task body: open the envelope (prefetch max age), warm, report
    ``{"status": done|missing|error, "error": text}``; never raises."""
    started = time.perf_counter()
    job: Job = {}
    rid = "-"
    try:
        job, rid = open_job(context, token, context.settings.prefetch_max_age_s)
        at_low_priority(lambda: warm(context.service, job))
        report: Report = {"status": DONE}
    except FrameNotFound as exc:  # not written yet, or beyond the data
        report = {"status": MISSING, "error": exc.wire_text()}
    except IsError as exc:
        report = {"status": ERROR, "error": exc.wire_text()}
    except Exception as exc:  # Celery must never see a failure (as istasks.tasks)
        log.exception("prefetch rid=%s failed with an internal error", rid)
        report = {"status": ERROR, "error": error_text(exc, rid)}
    sizes = job.get("sizes")
    log.info(
        "task rid=%s queue=%s kind=prefetch fn=%s frame=%s sizes=%s outcome=%s ms=%.1f",
        log_value(rid), context.queue, log_value(job.get("fn")), log_value(job.get("frame")),
        log_value(",".join(map(str, sizes)) if isinstance(sizes, list) else sizes),
        report["status"], (time.perf_counter() - started) * 1000.0,
    )  # fmt: skip
    return report


def register(app: Celery, context: WorkerContext) -> None:
    """Add ``is.prefetch`` to a worker's app (from :func:`istasks.tasks.register`)."""

    def run(*args: object, **kwargs: object) -> Report:
        token = args[0] if len(args) == 1 and not kwargs else None
        with GOVERNOR.request():
            return run_prefetch(context, token)

    run.__name__ = run.__qualname__ = "is_prefetch"
    app.task(name=PREFETCH_TASK, typing=False)(run)
