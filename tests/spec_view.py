"""A slow, literal transcription of spec 5.5 (reduction) and 5.6 (statistics, spots).

Plain Python loops over output pixels, written from the spec's text and not from the
code under test, for small frames only. Python's ``int()`` of a float truncates toward
zero like C's ``(int)``; Python's int/int division is the correctly rounded double, as
C's double division of exactly representable integers is.

Where the original read memory it did not own, the reference uses 0: a 32-bit nearest
read outside the image, a 16-bit nearest read past the last row (the documented fix).
``wrap_squares=True`` sums squares wrapped to 32 bits as the original did (spec 5.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

SENTINEL = 0xFFFFFFFF
BINS = 16


@dataclass
class SpecView:
    """What the original computed for one view."""

    pixels: npt.NDArray[Any]  # stored view (source dtype)
    in_stats: npt.NDArray[np.bool_]  # pxl != 0xFFFFFFFF before storing
    saturated: int
    x0: int
    y0: int
    win_width: int
    win_height: int
    stats: dict[str, Any] = field(default_factory=dict)
    #: Per ring bin: (n, mean, rms, spots), as the spot loop used them.
    rings: list[tuple[int, float, float, int]] = field(default_factory=list)


def spec_reduce(
    pixels: npt.NDArray[Any],
    bad: npt.NDArray[np.bool_] | None,
    *,
    xsize: int,
    zoom: float = 1.0,
    segcol: float = 0.0,
    segrow: float = 0.0,
    keep_aspect: bool = False,
) -> SpecView:
    """``isReduceImage`` + ``reduceImage16/32`` for already-normalised zoom/segments."""
    height, width = pixels.shape
    wide = pixels.dtype.itemsize == 4
    code = 0xFFFFFFFF if wide else 0xFFFF
    if bad is None:
        bad = np.zeros(pixels.shape, bool)
    dst_width = max(xsize, 8)
    win_width, win_height = int(width / zoom), int(height / zoom)
    dst_height = dst_width
    if keep_aspect and win_width > 0:  # our extension: the height follows the window
        dst_height = max(round(dst_width * win_height / win_width), 1)
    x0, y0 = int(win_width * segcol), int(win_height * segrow)
    xa, ya = win_width // dst_width, win_height // dst_height
    lo_x, hi_x = xa // 2, xa // 2 + xa % 2
    lo_y, hi_y = ya // 2, ya // 2 + ya % 2
    nearest = xa <= 1 or ya <= 1
    out = np.zeros((dst_height, dst_width), pixels.dtype)
    in_stats = np.zeros((dst_height, dst_width), bool)
    saturated = 0
    for row in range(dst_height):
        k = row * win_height / dst_height + y0
        for col in range(dst_width):
            l = col * win_width / dst_width + x0  # noqa: E741 - the spec's name
            if not wide and (k < 0 or k >= height or l < 0 or l >= width):
                pxl, count = 0, 0
            elif nearest:
                pxl, count = _nearest(pixels, bad, k, l)
            else:
                pxl, count = _max_box(pixels, bad, k, l, (lo_y, hi_y, lo_x, hi_x))
                if not wide and pxl == 0xFFFF:
                    pxl = SENTINEL
            saturated += count
            out[row, col] = pxl & code
            in_stats[row, col] = pxl != SENTINEL
    return SpecView(out, in_stats, saturated, x0, y0, win_width, win_height)


def _nearest(
    pixels: npt.NDArray[Any],
    bad: npt.NDArray[np.bool_],
    k: float,
    l: float,  # noqa: E741
) -> tuple[int, int]:
    """``nearest16/32``: the value at flat index (int)(k + 0.5) * W + (int)(l + 0.5) and
    whether it is the saturation code (0 where the original read foreign memory)."""
    height, width = pixels.shape
    wide = pixels.dtype.itemsize == 4
    rr, cc = int(k + 0.5), int(l + 0.5)
    index = rr * width + cc
    if not 0 <= index < height * width or (wide and not (0 <= rr < height and 0 <= cc < width)):
        return 0, 0
    if bad.reshape(-1)[index]:
        return 0, 0
    value = int(pixels.reshape(-1)[index])
    return value, int(value == (0xFFFFFFFF if wide else 0xFFFF))


def _max_box(
    pixels: npt.NDArray[Any],
    bad: npt.NDArray[np.bool_],
    k: float,
    l: float,  # noqa: E741
    halves: tuple[int, int, int, int],
) -> tuple[int, int]:
    """``maxBox16/32``: the maximum of the box and its saturated pixels, per box."""
    height, width = pixels.shape
    code = 0xFFFFFFFF if pixels.dtype.itemsize == 4 else 0xFFFF
    lo_y, hi_y, lo_x, hi_x = halves
    d, saturated = 0, 0
    m = int(k - lo_y)
    while m < k + hi_y:
        n = int(l - lo_x)
        while n < l + hi_x:
            if 0 <= m < height and 0 <= n < width and not bad[m, n]:
                value = int(pixels[m, n])
                d = max(d, value)
                saturated += value == code
            n += 1
        m += 1
    return d, saturated


def spec_bin(col: int, row: int, bx: float, by: float, *, low: float, top: float) -> int:
    """``get_bin_number``: (int)((16.0 / (max - min)) * (d2 - min)), clamped."""
    d2 = (col - bx) * (col - bx) + (row - by) * (row - by)
    with np.errstate(all="ignore"):
        scaled = float(np.float64(16.0) / (np.float64(top) - low) * (np.float64(d2) - low))
    if math.isnan(scaled) or not -(2.0**31) < scaled < 2.0**31:
        return 0  # cvttsd2si gives INT_MIN
    return min(max(int(scaled), 0), BINS - 1)


def spec_stats(
    view: SpecView,
    beam: tuple[float, float],
    *,
    sensitivity: float = 1.5,
    wrap_squares: bool = False,
) -> dict[str, Any]:
    """``set_up_bins`` .. ``calc_stats`` and the spot loop, for the view's beam centre
    ``beam`` (source pixels, as in the raw meta)."""
    dst_height, dst_width = view.pixels.shape
    with np.errstate(all="ignore"):
        bx = float((np.float64(beam[0]) - view.x0) / (np.float64(view.win_width) / dst_width))
        by = float((np.float64(beam[1]) - view.y0) / (np.float64(view.win_height) / dst_height))
    corners = [
        (x - bx) * (x - bx) + (y - by) * (y - by)
        for x, y in ((0, 0), (dst_width, 0), (0, dst_height), (dst_width, dst_height))
    ]
    top = max(corners)
    low = 0.0 if (0 <= bx < dst_width and 0 <= by < dst_height) else min(corners)
    n, total, squares = [0] * BINS, [0] * BINS, [0] * BINS
    low_value, high_value = SENTINEL, 0
    bins = np.zeros(view.pixels.shape, int)
    for row in range(dst_height):
        for col in range(dst_width):
            b = bins[row, col] = spec_bin(col, row, bx, by, low=low, top=top)
            if not view.in_stats[row, col]:
                continue
            pix = int(view.pixels[row, col])
            n[b] += 1
            total[b] += pix
            squares[b] += (pix * pix) & 0xFFFFFFFF if wrap_squares else pix * pix
            low_value, high_value = min(low_value, pix), max(high_value, pix)
    mean_bin = [total[b] / n[b] if n[b] else 0.0 for b in range(BINS)]
    rms_bin = [math.sqrt(squares[b] / n[b]) if n[b] else 0.0 for b in range(BINS)]
    spots_bin = [0] * BINS
    for row in range(dst_height):
        for col in range(dst_width):
            b = bins[row, col]
            spots_bin[b] += (
                float(int(view.pixels[row, col])) - mean_bin[b] > sensitivity * rms_bin[b]
            )
    spots = sum(spots_bin)
    view.rings = [(n[b], mean_bin[b], rms_bin[b], spots_bin[b]) for b in range(BINS)]
    count = sum(n)
    if count == 0:
        stats: dict[str, Any] = {"n": 0, "mean": 0.0, "rms": 0.0, "stddev": 0.0}
    else:
        mean = sum(total) / count
        stats = {"n": count, "mean": mean, "rms": math.sqrt(sum(squares) / count)}
        variance = sum(squares) / count - mean * mean
        if variance >= 0:
            stats["stddev"] = math.sqrt(variance)
    as_int = [v - (1 << 32) if v >= 1 << 31 else v for v in (low_value, high_value)]
    stats.update(min=as_int[0], max=as_int[1], spots=spots)
    view.stats = stats
    return stats
