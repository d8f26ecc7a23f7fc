"""Generic (non-MarCCD) TIFF reader, e.g. Eiger "monitor" images (spec Appendix A).

The fork gave these only ``x/y_pixels_in_detector``, and its reduction then died on the
missing ``image_depth`` and beam centre. Here the depth follows the sample type (8-bit
is widened to 16) and the beam centre defaults to the image centre. Either byte order,
classic or BigTIFF, read by tifffile; only the first page of a multi-page file is shown.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from istasks.core.readers.base import Frame, Meta, SingleImage, check_frame_size
from istasks.core.readers.detect import FileProbe
from istasks.core.readers.negatives import unsigned_with_mask
from istasks.errors import DataUnavailable, UnknownFormat

#: Output depth in bytes by input sample width: 8/16-bit -> uint16, 32-bit -> uint32.
_DEPTH_BY_ITEMSIZE = {1: 2, 2: 2, 4: 4}
_SATURATION_BY_DEPTH = {2: 0xFFFF, 4: 0xFFFFFFFF}


def image_depth(dtype: np.dtype[Any]) -> int:
    """Bytes per output pixel for a TIFF sample type; UnknownFormat if not 8/16/32-bit int."""
    if dtype.kind not in "ui" or dtype.itemsize not in _DEPTH_BY_ITEMSIZE:
        raise UnknownFormat(f"TIFF samples of type {dtype} are not supported")
    return _DEPTH_BY_ITEMSIZE[dtype.itemsize]


class TiffReader(SingleImage):
    """The first image of a TIFF: ``frame_count`` 1, negatives masked. Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        # tifffile seeks and reads one shared handle: one page read at a time.
        self._lock = threading.Lock()
        self._probe = FileProbe(path)
        try:
            self._tiff, shape, dtype = _open_first_page(self._probe)
        except BaseException:
            self._probe.close()
            raise
        try:
            if len(shape) != 2:
                raise UnknownFormat(f"TIFF image of shape {shape} is not a 2-D greyscale image")
            check_frame_size(shape[0], shape[1], path)
            self._depth = image_depth(dtype)
        except BaseException:
            self.close()
            raise
        height, width = shape
        self._meta: Meta = {
            "x_pixels_in_detector": width,
            "y_pixels_in_detector": height,
            "image_depth": self._depth,
            "beam_center_x": width / 2,
            "beam_center_y": height / 2,
            "fn": path,
            "first_frame": 1,
            "last_frame": 1,
        }

    def read_frame(self, frame: int) -> Frame:
        """The first page as fresh uint16/uint32. ``frame`` is ignored like Rayonix's."""
        values = self._read_values()
        pixels, mask = unsigned_with_mask(values, self._depth)
        saturation = _SATURATION_BY_DEPTH[self._depth]
        return Frame(
            pixels=pixels, mask=mask, saturation=saturation, meta={**self._meta, "frame": 1}
        )

    def _read_values(self) -> npt.NDArray[np.integer[Any]]:
        try:
            with self._lock:
                values = self._tiff.pages[0].asarray()
        except Exception as exc:  # truncated strips, bad compression...: unreadable content
            raise DataUnavailable(f"cannot read pixels of {self.path!r}: {exc}") from exc
        expected = (self._meta["y_pixels_in_detector"], self._meta["x_pixels_in_detector"])
        if values.shape != expected:
            raise DataUnavailable(f"TIFF image is {values.shape}, expected {expected}")
        return values if values.flags.writeable else values.copy()

    def close(self) -> None:
        """Release the file."""
        self._tiff.close()
        self._probe.close()


def _open_first_page(
    probe: FileProbe,
) -> tuple[tifffile.TiffFile, tuple[int, ...], np.dtype[Any]]:
    """tifffile on the opened descriptor, with its first page's shape and sample type."""
    try:
        tiff = tifffile.TiffFile(probe.file, name=probe.name)
    except Exception as exc:  # third-party parser: any failure means unreadable content
        raise DataUnavailable(f"unreadable TIFF {probe.path!r}: {exc}") from exc
    try:
        page = tiff.pages[0]
        shape, dtype = tuple(page.shape), page.dtype
    except Exception as exc:  # e.g. no pages, or a page tifffile cannot describe
        tiff.close()
        raise DataUnavailable(f"TIFF without a readable image {probe.path!r}: {exc}") from exc
    if dtype is None:
        tiff.close()
        raise UnknownFormat(f"TIFF sample format not supported: {probe.path!r}")
    return tiff, shape, np.dtype(dtype)
