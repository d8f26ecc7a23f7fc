"""Signed detector counts to unsigned pixels plus a mask of the negative flag values.

Pilatus CBFs (and some TIFFs) store int32 counts where -1 marks module gaps and -2 bad
pixels. Read as unsigned they would become the brightest pixels of the image; here they
become 0 and are reported through a :class:`PixelMask` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core.readers.base import PixelMask

UnsignedPixels = npt.NDArray[np.unsignedinteger[Any]]


def unsigned_with_mask(
    values: npt.NDArray[np.integer[Any]], depth_bytes: int
) -> tuple[UnsignedPixels, PixelMask | None]:
    """``values`` as uint16 (depth 2) or uint32 (depth 4), negatives zeroed and masked.

    ``values`` is consumed (zeroed in place where negative). Values above the unsigned
    range are clipped to its top, which is the saturation marker.
    """
    out_type = np.dtype(np.uint16 if depth_bytes == 2 else np.uint32)
    top = 0xFFFF if depth_bytes == 2 else 0xFFFFFFFF
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    signed = np.issubdtype(values.dtype, np.signedinteger)
    mask: PixelMask | None = None
    if signed:
        bad = values < 0
        if bad.any():
            values[bad] = 0
            mask = PixelMask(bad)
    if signed and values.dtype.itemsize == out_type.itemsize:
        # Nothing negative is left, so a view reinterprets the same bits for free.
        return values.view(out_type), mask
    if values.dtype.itemsize > out_type.itemsize:
        values = np.minimum(values, top)
    return values.astype(out_type, copy=False), mask
