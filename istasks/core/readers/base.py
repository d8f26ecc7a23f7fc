"""The small protocol every detector reader implements, and the values it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from istasks.errors import DataUnavailable

Meta = dict[str, Any]

#: Largest frame a reader loads, in pixels (256 MB at 32 bits). The largest detectors
#: served have ~18 M pixels (Eiger2 16M); a header claiming more is corrupt or hostile,
#: and trusting it would make a worker allocate (and fill) gigabytes.
MAX_FRAME_PIXELS = 1 << 26


def check_frame_size(rows: int, cols: int, path: str) -> None:
    """DataUnavailable when a ``rows`` x ``cols`` frame exceeds :data:`MAX_FRAME_PIXELS`."""
    if rows * cols > MAX_FRAME_PIXELS:
        raise DataUnavailable(
            f"{path}: frame of {rows} x {cols} pixels exceeds the limit of {MAX_FRAME_PIXELS}"
        )


class PixelMask:
    """Invalid pixels of a detector (module gaps, dead, hot, beamstop...).

    ``bad`` is a read-only boolean image, True where a pixel must be ignored. The flat
    index of bad pixels is computed once and shared by every frame of the dataset,
    because zeroing a few hundred thousand indices is far cheaper than a full-frame
    ``np.where`` on every read.
    """

    __slots__ = ("_flat", "bad")

    def __init__(self, bad: npt.NDArray[np.bool_]) -> None:
        bad.setflags(write=False)
        self.bad = bad
        self._flat: npt.NDArray[np.intp] | None = None

    @property
    def flat_index(self) -> npt.NDArray[np.intp]:
        """Flat (C-order) indices of the bad pixels, cached."""
        if self._flat is None:
            self._flat = np.flatnonzero(self.bad)
        return self._flat

    @property
    def count(self) -> int:
        """Number of bad pixels."""
        return int(self.flat_index.size)


@dataclass(frozen=True)
class Frame:
    """One detector frame at full depth.

    ``pixels`` is 2-D (rows, columns), uint16 or uint32, owned by the caller (the reader
    hands out a fresh array, so the pipeline may modify it in place). ``mask`` is None
    when the file has no mask ("no masked pixels", never an error). ``saturation`` is the
    value that marks a saturated/overloaded pixel (0xFFFF or 0xFFFFFFFF as in the
    original). ``meta`` is the detector metadata with the exact JSON names of the spec,
    including ``image_depth``, ``fn``, ``frame``, ``first_frame`` and ``last_frame``.
    """

    pixels: npt.NDArray[np.unsignedinteger[Any]]
    mask: PixelMask | None
    saturation: int
    meta: Meta


class SingleImage:
    """What the one-image formats (MarCCD, CBF, TIFF) share: frame is always 1 and the
    metadata is read once at open; subclasses fill ``_meta``."""

    _meta: Meta

    @property
    def frame_count(self) -> int:
        """Always 1: these files hold one image (a requested frame is ignored, as the
        original ignored it for Rayonix)."""
        return 1

    def meta(self) -> Meta:
        """A copy of the metadata read at open."""
        return dict(self._meta)


@runtime_checkable
class FrameReader(Protocol):
    """An opened detector file. One module per format implements this."""

    path: str

    @property
    def frame_count(self) -> int:
        """Number of frames the dataset declares (1 for single-image formats)."""
        ...

    def meta(self) -> Meta:
        """Detector metadata with the spec's JSON names (no per-request keys)."""
        ...

    def read_frame(self, frame: int) -> Frame:
        """Read frame ``frame`` (1-based). Raises FrameNotFound / DataUnavailable."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...
