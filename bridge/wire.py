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
import math
import re
from collections.abc import Sequence
from typing import Any

from bridge.jansson import first_error
from istasks.errors import RequestError
from istasks.jobs import Job

#: Routing frames plus the delimiter the bridge accepts (the original stopped at 16).
MAX_ENVELOPE_FRAMES = 64
#: Largest payload parsed. is.js jobs are a few hundred bytes; this only stops abuse.
MAX_PAYLOAD_BYTES = 1 << 20
#: Deepest nesting of arrays/objects accepted in a job (is.js jobs are flat). Without a
#: bound a job nested just below the bridge's parser limit would pass here and then fail
#: to decode in a worker, whose threads run on deeper stacks.
MAX_JSON_DEPTH = 32
_FORMAT = "Unexpected incoming message format"
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT64_MAX_DIGITS = 20  # "-9223372036854775808"
#: Escapes Python decodes and jansson refused: a surrogate (unpaired ones make text no
#: UTF-8 encoder accepts) or NUL. A match only means "ask jansson's rules" (a pair is fine).
_JANSSON_REFUSED_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")
#: Largest invalid payload whose jansson error text is reproduced (pure Python, ~6 us a
#: token, on the bridge's loop thread). is.js jobs are a few hundred bytes; beyond this a
#: refusal carries Python's parser message.
MAX_EMULATED_BYTES = 4096
_TOO_DEEP = f"Failed to parse request: nested deeper than {MAX_JSON_DEPTH} levels"


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
    """Decode the JSON job of one request; RequestError with the original's texts otherwise.

    Python's parser does the work. Only when it refuses a payload, or accepts one that
    jansson refused (a lone surrogate escape, ``\\u0000``, a top-level scalar), does
    :func:`bridge.jansson.first_error` find the text the original sent.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RequestError(
            f"Failed to parse request: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    try:
        text = payload.decode("utf-8")
        value: Any = json.loads(
            text, parse_constant=_reject_constant, parse_int=_int64, parse_float=_finite_float
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _parse_error(payload, exc) from None
    if not isinstance(value, dict | list):
        _refuse_as_jansson(payload)
        raise RequestError("Failed to parse request: '[' or '{' expected")
    escapes = "\\u" in text and _JANSSON_REFUSED_ESCAPE.search(text) is not None
    if escapes:
        _refuse_as_jansson(payload)
    if _nesting_depth(value) > MAX_JSON_DEPTH:
        raise RequestError(_TOO_DEEP)
    if escapes and len(payload) > MAX_EMULATED_BYTES:
        _refuse_lone_surrogates(value)
    if isinstance(value, list):
        # jansson accepted a top-level array; main then found no pid in it.
        raise RequestError("request does not contain pid")
    return value


def reply_message(route: Sequence[bytes], frames: Sequence[bytes]) -> list[bytes]:
    """The multipart message to send on the ROUTER: ``route + [b""] + frames``."""
    return [*route, b"", *frames]


def _reject_constant(name: str) -> Any:
    """JSON has no NaN/Infinity (jansson refuses them); neither do we."""
    raise ValueError(f"invalid token '{name}'")


def _int64(digits: str) -> int:
    """An integer as jansson reads it: beyond 64 bits the whole request is refused (an
    unbounded Python int would overflow float conversions in the workers)."""
    value = int(digits) if len(digits) <= _INT64_MAX_DIGITS else _INT64_MAX + 1
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(
            "too big negative integer" if digits.startswith("-") else "too big integer"
        )
    return value


def _finite_float(text: str) -> float:
    """A real as jansson reads it: one that overflows to infinity is refused (Python
    would keep ``inf`` and echo it as ``Infinity``, which is not JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("real number overflow")
    return value


def _nesting_depth(value: Any) -> int:
    """Levels of arrays/objects in a decoded JSON value (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_error(payload: bytes, exc: BaseException) -> RequestError:
    """The error for a payload Python's parser refused: jansson's text when the payload
    is small enough to emulate it, else Python's (bounded so a huge payload cannot
    produce a huge error frame)."""
    if len(payload) <= MAX_EMULATED_BYTES:
        message = first_error(payload)
        if message is not None:
            return RequestError(f"Failed to parse request: {message}")
    if isinstance(exc, RecursionError):
        return RequestError(_TOO_DEEP)  # Python's limit; jansson allows 2048 levels
    if isinstance(exc, UnicodeDecodeError):
        return RequestError(f"Failed to parse request: not UTF-8 at byte {exc.start}")
    return RequestError(f"Failed to parse request: {str(exc)[:200]}")


def _refuse_as_jansson(payload: bytes) -> None:
    """For a payload Python accepted: jansson's error if jansson refused it (payloads
    too big to emulate are left to the caller)."""
    message = first_error(payload) if len(payload) <= MAX_EMULATED_BYTES else None
    if message is not None:
        raise RequestError(f"Failed to parse request: {message}")


def _refuse_lone_surrogates(value: Any) -> None:
    r"""Python decodes an unpaired ``\uD800`` escape into a string no UTF-8 encoder
    accepts, so the echoed job could never be sent; jansson refused such text too."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        text = "Failed to parse request: invalid Unicode escape (unpaired surrogate)"
        raise RequestError(text) from None
