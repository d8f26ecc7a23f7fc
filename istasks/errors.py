"""The project's one exception hierarchy.

Every error a request can meet is an :class:`IsError`. Each class says which reply it
causes; the mapping to wire frames lives in one place, ``istasks.replies``. Anything that
is not an ``IsError`` becomes a generic one-frame error carrying the request id, with no
traceback on the wire. Standard library only: the bridge and the core both import this.
"""

from __future__ import annotations


class IsError(Exception):
    """Root of the hierarchy. Reply: one error frame with ``wire_text``."""

    #: Prefix of the wire message, kept like the original's "<file> <function>: " so
    #: that is.js users and log readers recognise the source of a refusal.
    origin = "is"

    def wire_text(self) -> str:
        """The human-readable text sent in the single error frame."""
        return f"{self.origin}: {self}"


class RequestError(IsError, ValueError):
    """Malformed request (envelope, JSON, field values). Reply: one error frame."""

    origin = "isMain.c main"


class UnknownRequestType(RequestError):
    """``type`` missing, obsolete or unknown. Reply: one error frame (spec 2.5)."""

    origin = "isWorker.c isWorker"


class AuthError(IsError, PermissionError):
    """Session missing, forged, logged out, or ESAF not allowed. Reply: one error frame."""

    origin = "isMain.c main"


class IdentityError(AuthError):
    """No usable uid/gid for the session (unknown account, uid/gid 0, out of range)."""


class DataUnavailable(IsError, OSError):
    """The frame cannot be produced (missing, unreadable, bad format, bad frame).

    Reply: for ``jpeg`` the blank grey fallback of spec 2.2 (the reason is logged and
    returned in the job as ``error``); for ``spots`` an error frame ("Missing data").
    """

    origin = "isData.c isGetRawImageBuf"


class UnknownFormat(DataUnavailable):
    """The file's content matches no supported detector format."""


class FrameNotFound(DataUnavailable, IndexError):
    """The requested frame is outside the dataset or its data file is missing."""


class InvalidView(DataUnavailable):
    """View parameters the core refuses (e.g. ``xsize`` over the limit)."""


class EncodeError(IsError):
    """JPEG encoding failed. Reply: one error frame (spec 2.2)."""

    origin = "isJpeg.c isJpeg"


class EnvelopeError(IsError, PermissionError):
    """A task whose signed envelope is forged, expired or for another queue.

    Reply: the worker refuses the task; the bridge sends one error frame.
    """

    origin = "istasks envelope"


class WorkerUnavailable(IsError, RuntimeError):
    """No worker answered in time (dead, not started, broker down). Reply: error frame."""

    origin = "bridge"


class SessionBusy(WorkerUnavailable):
    """A session has as many requests in flight as ``IS_SESSION_MAX_IN_FLIGHT`` allows
    (one user must not starve a host). Reply: one error frame, at once."""


class IndexerError(IsError, RuntimeError):
    """The indexer could not be run or timed out. Reply: one error frame."""

    origin = "isIndex.c isIndex"
