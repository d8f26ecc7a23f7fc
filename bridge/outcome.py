"""How a request ended, for the bridge's request log line and its metrics.

A dispatcher resolves its future to the reply frames. When it knows more than the frames
say (the worker's cache outcome and time, or that it stopped waiting) it resolves to a
:class:`Reply`, which *is* that list of frames (every user of the Dispatcher protocol
keeps working) with those facts attached. Standard library only: the bridge loop uses it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from typing import Literal

from istasks.errors import AuthError, RequestError, WorkerUnavailable
from istasks.keys import VALIDATOR_RE

#: ok; blank (jpeg grey fallback: no image); error (the worker's error reply, or an
#: internal one); bad_request (malformed, no pid, unknown type); refused (session or
#: identity not accepted); unavailable (no worker, broker down, bridge busy or stopping);
#: timeout (no reply in time).
Outcome = Literal["ok", "blank", "error", "bad_request", "refused", "unavailable", "timeout"]
OUTCOMES: tuple[Outcome, ...] = typing.get_args(Outcome)
#: How the worker found the reduced image ("jpeg": the whole rendered reply came from the
#: worker's JPEG LRU); "none": no cache lookup, or not reported.
CACHE_RESULTS = ("jpeg", "lru", "redis", "computed", "none")


class Reply(list[bytes]):
    """Reply frames plus what the dispatcher learnt while getting them.

    ``outcome`` is set only when the frames alone would mislead (a timeout is an error
    frame too); ``cache``, ``worker_ms`` and ``validator`` (a digest naming a rendered
    view's bytes: the gateway's ETag) are the worker's report, checked here because a
    worker's result is not trusted to be well formed (they become metric labels, headers).
    """

    def __init__(
        self,
        frames: Iterable[bytes],
        *,
        outcome: Outcome | None = None,
        cache: object = "none",
        worker_ms: object = None,
        validator: object = None,
    ) -> None:
        super().__init__(frames)
        self.outcome = outcome
        self.cache: str = cache if isinstance(cache, str) and cache in CACHE_RESULTS else "none"
        self.worker_ms: float | None = _duration_ms(worker_ms)
        self.validator: str | None = (
            validator if isinstance(validator, str) and VALIDATOR_RE.fullmatch(validator) else None
        )


def exception_outcome(exc: BaseException) -> Outcome:
    """The outcome of a request answered with ``exc``'s error frame."""
    if isinstance(exc, RequestError):
        return "bad_request"
    if isinstance(exc, AuthError):
        return "refused"
    if isinstance(exc, WorkerUnavailable):
        return "unavailable"
    return "error"


def frames_outcome(kind: str, frames: list[bytes]) -> Outcome:
    """The outcome a reply's frames show: error frame, jpeg blank fallback (empty meta
    frame, spec 2.2) or ok; a :class:`Reply`'s own ``outcome`` wins."""
    if isinstance(frames, Reply) and frames.outcome is not None:
        return frames.outcome
    if frames and frames[0]:
        return "error"
    if kind == "jpeg" and len(frames) == 4 and not frames[2]:
        return "blank"
    return "ok"


def _duration_ms(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None
