"""Multipart envelopes on the bridge's ROUTER socket (spec 1.2, 1.3).

A request is ``routing frames..., b"", payload, extra frames...``: our ROUTER adds the
peer's id, each proxy hop adds one more, the client's REQ socket adds the empty
delimiter. A reply is the same routing frames, the delimiter, then the reply frames.
Unlike the original, nothing here can end the process: every malformed message becomes
a :class:`~istasks.errors.RequestError` that still knows where to send the answer. A
message without a delimiter is answered along all its frames but the last, with a
delimiter added, so every reply has the one shape ``route, b"", frames``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from istasks.errors import RequestError
from istasks.jobs import Job

#: Routing frames plus the delimiter the bridge accepts (the original stopped at 16).
MAX_ENVELOPE_FRAMES = 64
#: Largest payload parsed. is.js jobs are a few hundred bytes; this only stops abuse.
MAX_PAYLOAD_BYTES = 1 << 20
_FORMAT = "Unexpected incoming message format"


class MalformedEnvelope(RequestError):
    """The frames do not form ``route, b"", payload``. Reply: one error frame to ``route``."""

    def __init__(self, detail: str, route: Sequence[bytes]) -> None:
        super().__init__(f"{_FORMAT} ({detail})")
        self.route: tuple[bytes, ...] = tuple(route)


def split_envelope(frames: Sequence[bytes]) -> tuple[tuple[bytes, ...], bytes, int]:
    """Split a ROUTER message into ``(route, payload, number of extra frames)``.

    Raises MalformedEnvelope (carrying the best route we can reply to) when there is no
    delimiter, no payload after it, or more than MAX_ENVELOPE_FRAMES before it.
    """
    try:
        delimiter = frames.index(b"")
    except ValueError:
        # No delimiter: ROUTER always gives the peer id, and every frame but the last is
        # most likely a hop, so answer along them.
        route = frames[:-1] if len(frames) > 1 else frames[:1]
        raise MalformedEnvelope("no empty delimiter frame", route) from None
    route = tuple(frames[:delimiter])
    if delimiter + 1 > MAX_ENVELOPE_FRAMES:
        raise MalformedEnvelope(f"more than {MAX_ENVELOPE_FRAMES} envelope frames", route)
    if delimiter + 1 >= len(frames):
        raise MalformedEnvelope("no payload after the delimiter", route)
    return route, frames[delimiter + 1], len(frames) - delimiter - 2


def parse_job(payload: bytes) -> Job:
    """Decode the JSON job of one request; RequestError with the original's texts otherwise."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RequestError(
            f"Failed to parse request: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"Failed to parse request: not UTF-8 at byte {exc.start}") from None
    try:
        value: Any = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"Failed to parse request: {_short(exc)}") from None
    if isinstance(value, list):
        # jansson accepted a top-level array; main then found no pid in it.
        raise RequestError("request does not contain pid")
    if not isinstance(value, dict):
        raise RequestError("Failed to parse request: '[' or '{' expected")
    return value


def reply_message(route: Sequence[bytes], frames: Sequence[bytes]) -> list[bytes]:
    """The multipart message to send on the ROUTER: ``route + [b""] + frames``."""
    return [*route, b"", *frames]


def _reject_constant(name: str) -> Any:
    """JSON has no NaN/Infinity (jansson refuses them); neither do we."""
    raise ValueError(f"invalid token '{name}'")


def _short(exc: BaseException) -> str:
    """Parser message, bounded so a huge payload cannot produce a huge error frame."""
    if isinstance(exc, RecursionError):
        return "nesting too deep"
    return str(exc)[:200]
