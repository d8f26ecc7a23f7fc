"""istasks.replies: the one mapping from outcomes to reply frames (spec 1.3)."""

from __future__ import annotations

from istasks.errors import AuthError, DataUnavailable, UnknownRequestType, WorkerUnavailable
from istasks.replies import (
    MAX_ERROR_BYTES,
    error_frames,
    error_text,
    exception_frames,
    is_error_reply,
    success_frames,
)
from tests.wire_assert import assert_error_reply, assert_success_reply


def test_is_errors_keep_their_origin_prefix() -> None:
    assert error_text(AuthError("Process p is not authorized (2)"), "r1") == (
        "isMain.c main: Process p is not authorized (2)"
    )
    assert error_text(UnknownRequestType("No type parameter in job {}"), "r1") == (
        "isWorker.c isWorker: No type parameter in job {}"
    )
    assert error_text(WorkerUnavailable("gone"), "r1") == "bridge: gone"
    assert (
        error_text(DataUnavailable("Missing data"), "r")
        == "isData.c isGetRawImageBuf: Missing data"
    )


def test_other_exceptions_are_generic_with_the_request_id() -> None:
    text = error_text(KeyError("/etc/shadow secret detail"), "ab-12")
    assert text == "is: internal error (request ab-12)"
    assert_error_reply(exception_frames(ZeroDivisionError("x"), "ab-13"), "(request ab-13)")


def test_error_frame_is_one_capped_utf8_frame() -> None:
    frames = error_frames("é" * 5000)
    assert_error_reply(frames, "é")
    assert len(frames[0]) in (MAX_ERROR_BYTES - 1, MAX_ERROR_BYTES)
    frames[0].decode("utf-8")  # cut on a character boundary
    assert error_frames("") == [b"is: error"]  # never the empty "success" frame


def test_success_frames_start_empty() -> None:
    frames = success_frames(b"{}", b"meta", b"\xff\xd8")
    assert assert_success_reply(frames, 4) == [b"{}", b"meta", b"\xff\xd8"]
    assert not is_error_reply(frames)
    assert is_error_reply(error_frames("x"))
