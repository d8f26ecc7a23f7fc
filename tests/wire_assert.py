"""Assertions on is.js reply shapes (spec 1.3): the one place tests check them."""

from __future__ import annotations

from istasks.replies import MAX_ERROR_BYTES


def assert_error_reply(frames: list[bytes], contains: str) -> str:
    """An error reply is exactly one non-empty UTF-8 text frame of <= 4095 bytes that
    contains ``contains``; returns its text."""
    assert len(frames) == 1, f"error reply must be one frame, got {len(frames)}: {frames!r:.300}"
    assert frames[0], "error frame is empty (that would mean success)"
    assert len(frames[0]) <= MAX_ERROR_BYTES, f"error frame of {len(frames[0])} bytes"
    text = frames[0].decode("utf-8")
    assert contains in text, f"{contains!r} not in error {text!r:.500}"
    assert "Traceback" not in text
    return text


def assert_success_reply(frames: list[bytes], n_frames: int | None = None) -> list[bytes]:
    """A success reply starts with an empty frame; returns the frames after it."""
    assert frames, "empty reply"
    assert frames[0] == b"", f"not a success reply: {frames[0][:300]!r}"
    if n_frames is not None:
        assert len(frames) == n_frames, f"expected {n_frames} frames, got {len(frames)}"
    return frames[1:]
