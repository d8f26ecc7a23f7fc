"""The Celery tasks ``is.jpeg``, ``is.spots``, ``is.index``: thin adapters over the service.

Each takes one signed envelope (contract item 1), opens it with this worker's queue
key, runs the service and returns ``{"frames": [...]}`` or ``{"error": text}``, plus
``cache`` (how the reduced image was found: jpeg, lru, redis, computed, none) and
``elapsed_ms`` for the bridge's request line and metrics, and for an image the view's
``validator`` (the gateway's ETag, istasks.cache.note_validator). Nothing escapes as a Celery
failure: every exception becomes the one error text of ``istasks.replies`` (a Celery
FAILURE would carry a traceback through the backend). Each task logs one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from istasks.app import TASK_NAMES
from istasks.cache import report_outcome
from istasks.context import WorkerContext, open_job
from istasks.errors import EnvelopeError, IsError
from istasks.jobs import Job, int_field, str_field
from istasks.logs import log_value, redact_token
from istasks.memory import GOVERNOR
from istasks.prefetch_task import register as register_prefetch
from istasks.replies import error_text
from istasks.service import Frames

log = logging.getLogger(__name__)

TaskResult = dict[str, Any]


def register(app: Celery, context: WorkerContext) -> None:
    """Add the three request tasks and ``is.prefetch`` to ``app``, bound to ``context``."""
    handlers: dict[str, Callable[[dict[str, Any]], Frames]] = {
        "jpeg": context.service.jpeg,
        "spots": context.service.spots,
        "index": context.service.index,
        "pixel": context.service.pixel,
    }
    for kind, name in TASK_NAMES.items():
        app.task(name=name, typing=False, bind=True)(_task_function(kind, handlers[kind], context))
    register_prefetch(app, context)


def _task_function(
    kind: str, handler: Callable[[dict[str, Any]], Frames], context: WorkerContext
) -> Callable[..., TaskResult]:
    def run(task: Task, *args: object, **kwargs: object) -> TaskResult:
        # Any other call shape is refused here, not raised as a Celery failure.
        token = args[0] if len(args) == 1 and not kwargs else None
        with GOVERNOR.request():  # past its memory limit, the worker acts once idle
            return run_task(kind, handler, context, token, task_id=task.request.id or "-")

    run.__name__ = run.__qualname__ = f"is_{kind}"
    return run


def run_task(
    kind: str,
    handler: Callable[[dict[str, Any]], Frames],
    context: WorkerContext,
    token: object,
    *,
    task_id: str = "-",
) -> TaskResult:
    """Open the envelope, run ``handler`` on its job, map any failure to error text, and
    log the task's one line. A refused envelope gets a bare ``{"error": ...}``: nothing
    ran, so there is nothing to report."""
    started = time.perf_counter()
    try:
        job, request_id = open_job(context, token)
    except EnvelopeError as exc:
        log.warning("%s refused on queue %s: %s", kind, context.queue, exc)
        return {"error": exc.wire_text()}
    with report_outcome() as cache:
        result, outcome = _run(kind, handler, job, request_id, task_id)
    elapsed_ms = round((time.perf_counter() - started) * 1000.0, 1)
    result.update(cache=cache.outcome, elapsed_ms=elapsed_ms)
    if cache.validator is not None and outcome == "ok":
        result["validator"] = cache.validator  # the gateway's ETag; the bridge ignores it
    if log.isEnabledFor(logging.INFO):
        _log_task(kind, job, result, outcome, task_id=task_id, rid=request_id, queue=context.queue)
    return result


def _run(
    kind: str,
    handler: Callable[[dict[str, Any]], Frames],
    job: Job,
    request_id: str,
    task_id: str,
) -> tuple[TaskResult, str]:
    """The handler's result and its outcome: ok, blank (jpeg fallback) or error."""
    try:
        frames = handler(job)
    except Exception as exc:  # the one mapping; Celery must never see a failure
        if not isinstance(exc, IsError):
            log.exception("task id=%s failed with an internal error", task_id)
        return {"error": error_text(exc, request_id)}, "error"
    blank = kind == "jpeg" and len(frames) > 1 and not frames[1]  # empty meta
    return {"frames": frames}, "blank" if blank else "ok"


def _log_task(
    kind: str,
    job: Job,
    result: TaskResult,
    outcome: str,
    *,
    task_id: str,
    rid: str,
    queue: str,
) -> None:
    """One scannable ``key=value`` line per task (grep ``rid=`` to follow a request);
    an error text keeps only the pid's prefix (it may echo the job, pid included)."""
    frames: Frames = result.get("frames", [])
    error = result.get("error")
    if isinstance(error, str):
        error = redact_token(error, str_field(job, "pid"))
    index = kind == "index"
    log.info(
        "task id=%s rid=%s queue=%s kind=%s fn=%s frame=%d xsize=%d cache=%s outcome=%s "
        "bytes=%d ms=%.1f%s",
        task_id,
        log_value(rid),
        queue,
        kind,
        log_value(str_field(job, "fn1" if index else "fn")),
        int_field(job, "frame1" if index else "frame"),
        int_field(job, "xsize"),
        result["cache"],
        outcome,
        len(result["error"].encode()) if error else sum(map(len, frames)),
        result["elapsed_ms"],
        f" error={log_value(error)}" if error else "",
    )
