"""The one place that turns outcomes into is.js reply frames (spec 1.3).

Success replies start with an empty frame; an error is exactly one non-empty text frame
of at most 4095 bytes (the original's ``is_zmq_error_reply`` buffer). Exceptions map to
text here and nowhere else: an :class:`IsError` shows its ``wire_text``, anything else
becomes a generic message carrying the request id, never a traceback. Standard library
only: the bridge and the workers both import this.
"""

from __future__ import annotations

from istasks.errors import IsError

#: Largest error frame the original could send (4096-byte buffer with its NUL).
MAX_ERROR_BYTES = 4095
_FALLBACK_TEXT = "is: error"


def error_text(exc: BaseException, request_id: str) -> str:
    """Wire text of ``exc``: its own message for an IsError, a generic one otherwise."""
    if isinstance(exc, IsError):
        return exc.wire_text()
    return f"is: internal error (request {request_id})"


def success_frames(*frames: bytes) -> list[bytes]:
    """A success reply: the empty "no error" frame followed by ``frames``."""
    return [b"", *frames]


def error_frames(text: str) -> list[bytes]:
    """A one-frame error reply: ``text`` as UTF-8, never empty, cut to 4095 bytes."""
    raw = text.encode("utf-8", errors="replace") or _FALLBACK_TEXT.encode()
    if len(raw) > MAX_ERROR_BYTES:
        # Cut on a character boundary so the frame stays valid UTF-8.
        raw = raw[:MAX_ERROR_BYTES].decode("utf-8", errors="ignore").encode()
    return [raw]


def exception_frames(exc: BaseException, request_id: str) -> list[bytes]:
    """Shortcut for ``error_frames(error_text(exc, request_id))``."""
    return error_frames(error_text(exc, request_id))


def is_error_reply(frames: list[bytes]) -> bool:
    """True when frame 0 is non-empty: how is.js tells an error from a success."""
    return bool(frames) and len(frames[0]) > 0
