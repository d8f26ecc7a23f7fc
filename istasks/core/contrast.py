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

from istasks.core.params import ContrastParams

Pixels = npt.NDArray[np.unsignedinteger[Any]]
View8 = npt.NDArray[np.uint8]

RED = (255, 0, 0)
#: Pixels per block: float64 temporaries of ~2 MB stay in cache.
_BLOCK_PIXELS = 1 << 18
#: Highest white point: above any 32-bit pixel. Requests may carry any JSON integer;
#: beyond 2**53 float64 cannot tell ``b`` from ``b - w`` (NaN pixels), beyond 2**1024
#: ``float()`` fails. Clamping keeps the view identical: every pixel is below it.
MAX_LEVEL = 1 << 32
#: Widest white..black span converted through a lookup table (the usual auto contrast
#: spans a few hundred counts); wider spans use the float formula directly.
_LUT_MAX_SPAN = 1 << 16
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
    """Write the grey levels of ``pixels`` into ``out`` (same shape), block by block.

    ``255 - ceil((clip(v, w, b) - w) * 255 / (b - w))`` equals the spec's truncated
    formula exactly: the float64 numerator is an exact integer, one correctly rounded
    division cannot cross an integer (a fraction is at least 1 / (b - w) away), and
    ``trunc(255 - x) == 255 - ceil(x)`` for 0 <= x <= 255.
    """
    step = max(_BLOCK_PIXELS // max(pixels.shape[1], 1), 1)
    if _lut_fits(pixels, levels):
        _grey_by_table(pixels, levels, out, step)
        return
    white, black = float(levels.white), float(levels.black)
    span = black - white
    for start in range(0, pixels.shape[0], step):
        block = pixels[start : start + step].astype(np.float64)
        np.clip(block, white, black, out=block)
        block -= white
        block *= 255.0
        block /= span
        np.ceil(block, out=block)
        np.subtract(255.0, block, out=block)
        np.copyto(out[start : start + step], block, casting="unsafe")


def _lut_fits(pixels: Pixels, levels: Levels) -> bool:
    """Whether a grey table over ``white..black`` is small and indexable by the pixels."""
    return (
        pixels.dtype.kind == "u"
        and levels.black - levels.white <= _LUT_MAX_SPAN
        and levels.white <= int(np.iinfo(pixels.dtype).max)
    )


def _grey_by_table(pixels: Pixels, levels: Levels, out: View8, step: int) -> None:
    """:func:`grey_into` through a table of the same formula per level (identical output,
    one integer clip and a gather per pixel instead of five float64 passes)."""
    span = levels.black - levels.white
    table = np.arange(span + 1, dtype=np.float64)
    table *= 255.0
    table /= float(span)
    np.ceil(table, out=table)
    grey = (255.0 - table).astype(np.uint8)
    # Values above the dtype cannot occur, so the top clip never needs a wider type.
    high = pixels.dtype.type(min(levels.black, int(np.iinfo(pixels.dtype).max)))
    white = pixels.dtype.type(levels.white)
    for start in range(0, pixels.shape[0], step):
        block = np.clip(pixels[start : start + step], white, high)
        block -= white
        np.take(grey, block, out=out[start : start + step])
