"""RFC 9457 problem details, and the one place that maps reply frames to HTTP statuses.

Workers answer in is.js frames (:mod:`istasks.replies`): an error is one text frame, and
a ``jpeg`` whose image cannot be made is the grey fallback with the reason in the echoed
job's ``error``. HTTP clients get a status that says what happened instead: 404 for a
missing file or frame, 403 for a file the identity may not read, 422 for a view the core
refuses, 503/504 when no worker answered. Never a traceback: texts are the workers' own
wire texts, which carry no stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from bridge.outcome import Reply

PROBLEM_TYPE = "application/problem+json"
#: Longest detail text sent (wire texts are at most 4095 bytes; this keeps pages sane).
MAX_DETAIL_CHARS = 1000

TITLES = {
    400: "Bad request",
    401: "Not signed in",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    414: "Query too long",
    415: "Unsupported media type",
    422: "Invalid parameter",
    429: "Too many requests in flight",
    500: "Internal error",
    502: "Worker error",
    503: "Service unavailable",
    504: "Timed out",
}


class Problem(Exception):
    """An HTTP error answer; raised anywhere in a handler, rendered by the app."""

    def __init__(
        self, status: int, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail[:MAX_DETAIL_CHARS]
        self.headers = dict(headers or {})


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    """The problem+json response of ``problem`` (never cached)."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance:
        body["instance"] = instance
    headers = {"Cache-Control": "no-store", **problem.headers}
    return JSONResponse(body, problem.status, headers=headers, media_type=PROBLEM_TYPE)


def error_status(frames: list[bytes]) -> int:
    """HTTP status of an error reply (frame 0 non-empty)."""
    outcome = frames.outcome if isinstance(frames, Reply) else None
    if outcome == "timeout":
        return 504
    if outcome == "unavailable":
        return 503
    if outcome == "refused":
        return 403
    text = frames[0].decode("utf-8", "replace")  # "<origin>: <message>"
    if "Missing data for job" in text:  # spots: no such file or frame (or not readable)
        return 404
    if "Missing filename" in text or "Missing fn1" in text:
        return 422
    if text.startswith("is pixel: "):  # a pixel's frame unreadable: the reason says why
        return blank_status(text)
    return 502


def blank_status(reason: str) -> int:
    """HTTP status of a ``jpeg`` answered with the grey fallback, from its reason."""
    lowered = reason.lower()
    if "permission denied" in lowered:
        return 403
    if "no such file" in lowered or "not a directory" in lowered:
        return 404
    if "frame " in lowered and any(
        word in lowered for word in ("beyond the last", "before the first", "not available")
    ):
        return 404
    return 422  # refused view (xsize, zoom window) or a file no reader understands
