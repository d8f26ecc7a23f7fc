"""Contrast: full-depth reduced pixels to an 8-bit view (spec 5.7).

Dark means strong signal: values at or below the white point ``w`` are white (255), at or
above the black point ``b`` black (0), in between ``trunc(255 - (v - w) / (b - w) * 255)``;
saturated pixels are pure red. The view is built as a grey canvas plus the flat indices
of its red pixels (:class:`MarkedView`): the encoder turns that into a grey JPEG, or into
colour planes directly, without an RGB image in between (:mod:`istasks.core.jpeg`).
:func:`to_8bit` composes the RGB image for callers that want pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core import _kernels as kernels
from istasks.core import bands
from istasks.core.params import ContrastParams

Pixels = npt.NDArray[np.unsignedinteger[Any]]
View8 = npt.NDArray[np.uint8]

RED = (255, 0, 0)
#: Highest white point: above any 32-bit pixel. Requests may carry any JSON integer;
#: beyond 2**53 float64 cannot tell ``b`` from ``b - w`` (NaN pixels), beyond 2**1024
#: ``float()`` fails. Clamping keeps the view identical: every pixel is below it.
MAX_LEVEL = 1 << 32
_NONE: npt.NDArray[np.intp] = np.empty(0, np.intp)
_NONE.flags.writeable = False


@dataclass(frozen=True)
class Levels:
    """White and black points actually used (``wval_used``, ``bval_used``); white < black."""

    white: int
    black: int


def contrast_levels(params: ContrastParams, meta: Mapping[str, Any]) -> Levels:
    """The original's rule: automatic values are ``mean -/+ stddev`` of the reduced image.

    ``wval < 0`` -> trunc(mean - stddev), then at least 0; ``contrast <= 0`` ->
    trunc(mean + stddev); a black point not above the white point becomes white + 1.
    Both are capped at :data:`MAX_LEVEL` (white) and ``MAX_LEVEL + 1`` (black).
    """
    mean, stddev = _finite(meta.get("mean")), _finite(meta.get("stddev"))
    white = params.wval if params.wval >= 0 else math.trunc(mean - stddev)
    white = min(max(white, 0), MAX_LEVEL)
    black = params.contrast if params.contrast > 0 else math.trunc(mean + stddev)
    black = min(black, MAX_LEVEL + 1)
    if black <= white:
        black = white + 1
    return Levels(white, black)


def _finite(value: object) -> float:
    """A meta number as float; anything else (missing, NaN, text) is 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    number = float(value)
    return number if math.isfinite(number) else 0.0


@dataclass(frozen=True)
class MarkedView:
    """An 8-bit grey view and the flat indices (into ``grey``) of its pure-red pixels."""

    grey: View8
    red: npt.NDArray[np.intp]


def marked_view(
    pixels: Pixels,
    levels: Levels,
    saturated: npt.NDArray[np.intp],
    *,
    top_rows: int = 0,
) -> MarkedView:
    """The grey view with ``top_rows`` white rows above it for a banner; ``saturated``
    (flat indices into ``pixels``, see :func:`saturated_indices`) become its red pixels."""
    height, width = pixels.shape
    canvas = np.empty((top_rows + height, width), np.uint8)
    canvas[:top_rows] = 255
    grey_into(pixels, levels, canvas[top_rows:])
    return MarkedView(canvas, saturated + top_rows * width)


def to_8bit(pixels: Pixels, saturation: int, levels: Levels, *, top_rows: int = 0) -> View8:
    """The 8-bit view as pixels: grey (rows, width) when no pixel equals
    ``saturation``, else RGB (rows, width, 3) with saturated pixels red."""
    view = marked_view(pixels, levels, saturated_indices(pixels, saturation), top_rows=top_rows)
    if not view.red.size:
        return view.grey
    canvas = np.empty((*view.grey.shape, 3), np.uint8)
    put_grey(canvas, view.grey)
    canvas.reshape(-1, 3)[view.red] = RED
    return canvas


def put_grey(canvas: View8, grey: View8) -> None:
    """Copy a grey image into a grey (h, w) or RGB (h, w, 3) canvas of the same size."""
    if canvas.ndim == 2:
        canvas[...] = grey
        return
    # Channel by channel: a broadcast grey[..., None] copy is ~8x slower (7 ms at 1024^2).
    for channel in range(canvas.shape[2]):
        canvas[..., channel] = grey


def saturated_indices(pixels: Pixels, saturation: int) -> npt.NDArray[np.intp]:
    """Flat indices of the pixels equal to ``saturation`` (usually none, or a few)."""
    if not 0 <= saturation <= np.iinfo(pixels.dtype).max or pixels.size == 0:
        return _NONE
    # The code is normally the largest value, so one max() settles the usual case.
    if int(pixels.max()) < saturation:
        return _NONE
    return np.flatnonzero(pixels == pixels.dtype.type(saturation))


def grey_into(pixels: Pixels, levels: Levels, out: View8) -> None:
    """Write the grey levels of ``pixels`` into ``out`` (same shape), in one compiled pass.

    ``255 - ceil((clip(v, w, b) - w) * 255 / (b - w))``, computed in integers, equals the
    spec's truncated float formula exactly: the float64 numerator is an exact integer,
    one correctly rounded division cannot cross an integer (a fraction is at least
    1 / (b - w) away), so its ceiling is the exact quotient's, and ``trunc(255 - x) ==
    255 - ceil(x)`` for 0 <= x <= 255.
    """
    source = np.ascontiguousarray(pixels)

    def band(start: int, stop: int) -> None:
        kernels.grey(source[start:stop], levels.white, levels.black, out[start:stop])

    bands.over_rows(band, source.shape)
