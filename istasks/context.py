"""What a worker process serves, and how a task opens its envelope.

Shared by the request tasks (:mod:`istasks.tasks`) and ``is.prefetch``
(:mod:`istasks.prefetch_task`): both import this module, neither imports the other's
helpers, so the task modules form no import circle (``tasks`` registers prefetch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from istasks.errors import EnvelopeError
from queues.envelope import open_envelope

if TYPE_CHECKING:
    from istasks.service import Service
    from istasks.settings import Settings


@dataclass(frozen=True)
class WorkerContext:
    """What this worker process serves: its queue, that queue's key, its service."""

    queue: str
    queue_key: bytes
    settings: Settings
    service: Service


def open_job(
    context: WorkerContext, token: object, max_age_s: float | None = None
) -> tuple[dict[str, Any], str]:
    """Verify the envelope (sealed for this worker's queue, at most ``max_age_s`` old,
    default the task setting); the job and request id inside, or EnvelopeError."""
    if not isinstance(token, str):
        raise EnvelopeError("task argument is not an envelope")
    max_age = context.settings.task_max_age_s if max_age_s is None else max_age_s
    payload = open_envelope(context.queue_key, context.queue, token, max_age)
    job, request_id = payload.get("job"), payload.get("rid")
    if not isinstance(job, dict):
        raise EnvelopeError("task envelope carries no job object")
    return job, str(request_id) if request_id is not None else "-"
