"""The Celery tasks ``is.jpeg``, ``is.spots``, ``is.index``: thin adapters over the service.

Each takes one signed envelope (contract item 1), opens it with this worker's queue
key, runs the service and returns ``{"frames": [...]}`` or ``{"error": text}``. Nothing
escapes as a Celery failure: every exception becomes the one error text of
``istasks.replies`` (a Celery FAILURE would carry a traceback through the backend).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from istasks.app import TASK_NAMES
from istasks.errors import EnvelopeError, IsError
from istasks.replies import error_text
from istasks.service import Frames, Service
from istasks.settings import Settings
from queues.envelope import open_envelope

log = logging.getLogger(__name__)

TaskResult = dict[str, Any]


@dataclass(frozen=True)
class WorkerContext:
    """What this worker process serves: its queue, that queue's key, its service."""

    queue: str
    queue_key: bytes
    settings: Settings
    service: Service


def register(app: Celery, context: WorkerContext) -> None:
    """Add the three tasks to ``app``, bound to this worker's ``context``."""
    handlers: dict[str, Callable[[dict[str, Any]], Frames]] = {
        "jpeg": context.service.jpeg,
        "spots": context.service.spots,
        "index": context.service.index,
    }
    for kind, name in TASK_NAMES.items():
        app.task(name=name, typing=False)(_task_function(kind, handlers[kind], context))


def _task_function(
    kind: str, handler: Callable[[dict[str, Any]], Frames], context: WorkerContext
) -> Callable[..., TaskResult]:
    def run(*args: object, **kwargs: object) -> TaskResult:
        # Any other call shape is refused here, not raised as a Celery failure.
        token = args[0] if len(args) == 1 and not kwargs else None
        return run_task(kind, handler, context, token)

    run.__name__ = run.__qualname__ = f"is_{kind}"
    return run


def run_task(
    kind: str, handler: Callable[[dict[str, Any]], Frames], context: WorkerContext, token: object
) -> TaskResult:
    """Open the envelope, run ``handler`` on its job, map any failure to error text."""
    started = time.perf_counter()
    try:
        job, request_id = _open(context, token)
    except EnvelopeError as exc:
        log.warning("%s refused on queue %s: %s", kind, context.queue, exc)
        return {"error": exc.wire_text()}
    try:
        frames = handler(job)
    except Exception as exc:  # the one mapping; Celery must never see a failure
        if isinstance(exc, IsError):
            log.info("%s rid=%s queue=%s: %s", kind, request_id, context.queue, exc.wire_text())
        else:
            log.exception("%s rid=%s queue=%s: internal error", kind, request_id, context.queue)
        return {"error": error_text(exc, request_id)}
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    log.info(
        "%s rid=%s queue=%s frames=%d bytes=%d %.1f ms",
        kind, request_id, context.queue, len(frames), sum(map(len, frames)), elapsed_ms,
    )  # fmt: skip
    return {"frames": frames}


def _open(context: WorkerContext, token: object) -> tuple[dict[str, Any], str]:
    """Verify the envelope; the job and request id inside, or EnvelopeError."""
    if not isinstance(token, str):
        raise EnvelopeError("task argument is not an envelope")
    payload = open_envelope(
        context.queue_key, context.queue, token, context.settings.task_max_age_s
    )
    job, request_id = payload.get("job"), payload.get("rid")
    if not isinstance(job, dict):
        raise EnvelopeError("task envelope carries no job object")
    return job, str(request_id) if request_id is not None else "-"
