"""Statistics, ring bins and spots of a reduced image, as the original computed them (spec 5.6).

* **Ring bins** (``set_up_bins``, ``get_bin_number``): with the beam centre ``(bx, by)`` in
  output pixels, ``d2 = (col - bx)^2 + (row - by)^2`` at integer pixel coordinates; the
  range runs from ``min`` (0 when the centre is inside the view, else the smallest ``d2``
  of the four *outer* corners ``(0|W, 0|H)``) to ``max`` (the largest of those corners);
  ``bin = (int)((16.0 / (max - min)) * (d2 - min))``, below 0 -> 0, 16 and up -> 15. All
  in doubles, in the original's order, so every pixel lands in the original's bin.
* **Statistics** (``add_to_stats``, ``calc_stats``): every pixel but the sentinel (the
  saturated marker, see :class:`istasks.core.reduce.Reduction`) enters ``n``, the sum and
  the sum of squares, per bin. Whole view: ``mean = sum / n``, ``rms = sqrt(sum2 / n)``,
  ``stddev = sqrt(sum2 / n - mean^2)``; ``min``/``max`` pass through a C ``int`` (so an
  empty view gives ``min`` -1); ``n = 0`` gives 0, 0, 0, -1, 0. A negative variance (NaN
  in the original) leaves ``stddev`` out, as the original did.
* **Spots**: every stored pixel, sentinel included, is a spot when ``(double)v -
  mean_bin > sensitivity * rms_bin`` (strict; the ring's rms, not its stddev).

The sums are exact integers and the doubles are formed from them as the original formed
its own, so the numbers are the original's bit for bit. One difference, on purpose: the
sum of squares is exact (64-bit and wider); the original summed squares wrapped to 32 bits,
which breaks ``rms``, ``stddev``, spots and automatic levels on 32-bit frames with values
above 65535 (bug 13).

Speed: a zoom tile has a geometry of its own, and all of this is on its 15 ms path (issue
13). No bin image is made: along a row the squared distance falls towards the beam
column and rises after it, so a row is at most two runs per bin, found by searching with
the exact bin formula; the sums and the spot count are then compiled loops over those
runs (:mod:`istasks.core._kernels`). Measured for a 1024 x 1037 view in one thread,
alternating with the bin image it replaced (made, then read by both passes): 3.1 -> 1.9 ms
on a quiet host, 4.6-5.2 -> 2.9-3.5 ms on a busy one; finding the runs is 0.3 ms of it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core import _kernels as kernels
from istasks.core import bands
from istasks.core._kernels import RingLayout

Pixels = npt.NDArray[np.unsignedinteger[Any]]
Bins = npt.NDArray[np.uint8]

#: Ring bins of the original (IS_OUTPUT_IMAGE_BINS).
RING_BINS = 16

Stats = dict[str, int | float]


def ring_bins(shape: tuple[int, int], centre: tuple[float, float], bins: int = RING_BINS) -> Bins:
    """The bin of every pixel of a ``shape`` view with the beam at ``centre`` (spec 5.6):
    the reference the run kernels are tested against.

    ``centre`` may be anything a double can be: a non-finite range (a zero-wide window
    puts the centre at infinity) puts every pixel in bin 0, as NaN -> INT_MIN did.
    """
    out = np.empty(shape, np.uint8)
    layout = ring_layout(shape, centre, bins)

    def band(start: int, stop: int) -> None:
        kernels.ring_bins(layout, start, out[start:stop])

    bands.over_rows(band, shape)
    return out


def ring_range(
    shape: tuple[int, int], centre: tuple[float, float], bins: int = RING_BINS
) -> tuple[float, float, float] | None:
    """``(min, max, scale)`` of the bins of a ``shape`` view with the beam at ``centre``:
    bin ``b`` holds the squared distances ``[min + b / scale, min + (b + 1) / scale)``
    (the last one up to ``max``); None when the range is not finite (every pixel is in
    bin 0). In the original's doubles and order (``set_up_bins``)."""
    if not 1 <= bins <= 255:
        raise ValueError(f"ring bins must be in 1..255, got {bins}")
    height, width = shape
    bx, by = (np.float64(c) for c in centre)
    with np.errstate(all="ignore"):
        corners = [
            (x - bx) * (x - bx) + (y - by) * (y - by) for y in (0, height) for x in (0, width)
        ]
        top = max(corners)
        inside = 0 <= bx < width and 0 <= by < height
        low = np.float64(0.0) if inside else min(corners)
        scale = np.float64(bins) / (top - low)
    if not all(math.isfinite(v) for v in (top, low, scale)):
        return None
    return float(low), float(top), float(scale)


@dataclass(frozen=True)
class Ring:
    """One ring bin of a view: the pixels in its statistics, their mean and rms (as the
    spot rule uses them), the spots in it, and its radii from the beam centre in view
    pixels (None when the view has no finite rings)."""

    n: int
    mean: float
    rms: float
    spots: int
    inner: float | None
    outer: float | None


def ring_layout(shape: tuple[int, int], centre: tuple[float, float], bins: int) -> RingLayout:
    """The ring geometry of a ``shape`` view with the beam at ``centre``, as the run
    kernels take it (the doubles of :func:`ring_bins`, so each pixel lands in the same
    bin). A view whose range is not finite has every pixel in bin 0: scale 0, top bin 0."""
    height, width = shape
    limits = ring_range(shape, centre, bins)
    if limits is None:
        return RingLayout(np.zeros(height), np.zeros(width), 0.0, 0, 0.0, 0.0, 0)
    low, _top, scale = limits
    # Within the corners d2 <= max, so the product is at most ``bins`` (by rounding);
    # truncation of a value in [0, bins - 1] is what (int) does, below 0 means bin 0.
    dx = np.arange(width, dtype=np.float64) - np.float64(centre[0])
    dy = np.arange(height, dtype=np.float64) - np.float64(centre[1])
    split = int(np.searchsorted(dx, 0.0, side="left"))  # the first column with dx >= 0
    return RingLayout(dy * dy, dx * dx, float(centre[0]), split, low, scale, bins - 1)


@dataclass(frozen=True)
class BinSums:
    """Exact per-bin count, sum and sum of squares of the pixels in the statistics, and
    their min/max (None when there are none)."""

    count: list[int]
    total: list[int]
    squares: list[int]
    low: int | None
    high: int | None

    @classmethod
    def of(cls, pixels: Pixels, layout: RingLayout, count: int, sentinel: int | None) -> BinSums:
        """Sums of ``pixels`` per bin (``count`` of them), leaving out pixels equal to
        ``sentinel``: one compiled pass per band of rows, exact in 64/128-bit integers."""
        left_out = -1 if sentinel is None or sentinel < 0 else sentinel

        def band(a: int, b: int) -> tuple[Any, ...]:
            return kernels.ring_sums(pixels[a:b], layout, a, count, left_out)

        parts = bands.over_rows(band, (pixels.shape[0], pixels.shape[1]))
        n, total, squares = (
            [sum(col) for col in zip(*(p[k] for p in parts), strict=True)] for k in range(3)
        )
        lows = [p[3] for p in parts if p[3] is not None]
        highs = [p[4] for p in parts if p[4] is not None]
        return cls(n, total, squares, min(lows, default=None), max(highs, default=None))


def image_stats(
    pixels: Pixels,
    centre: tuple[float, float],
    *,
    sentinel: int | None,
    sensitivity: float = 1.5,
    bins: int = RING_BINS,
) -> Stats:
    """``n, mean, rms, stddev, min, max, spots`` of a reduced image (spec 5.6).

    ``centre`` is the beam centre in output pixels (x, y); ``sentinel`` the stored value
    left out of the statistics (None: every pixel is in).
    """
    return analyse(pixels, centre, sentinel=sentinel, sensitivity=sensitivity, bins=bins)[0]


def analyse(
    pixels: Pixels,
    centre: tuple[float, float],
    *,
    sentinel: int | None,
    sensitivity: float = 1.5,
    bins: int = RING_BINS,
) -> tuple[Stats, list[Ring]]:
    """:func:`image_stats` and, from the same passes, each ring bin's own numbers (the
    viewer's "is my data any good" panel)."""
    pixels = np.ascontiguousarray(pixels)
    layout = ring_layout((pixels.shape[0], pixels.shape[1]), centre, bins)
    sums = BinSums.of(pixels, layout, bins, sentinel)
    levels = [
        _mean_rms(*bin_sums) for bin_sums in zip(sums.count, sums.total, sums.squares, strict=True)
    ]
    spots = spots_per_bin(pixels, layout, [spot_floor(m, r, sensitivity) for m, r in levels])
    radii = _ring_radii((pixels.shape[0], pixels.shape[1]), centre, bins)
    rings = [
        Ring(n, mean, rms, found, inner, outer)
        for n, (mean, rms), found, (inner, outer) in zip(
            sums.count, levels, spots, radii, strict=True
        )
    ]
    return _summary(sums) | {"spots": sum(spots)}, rings


def _ring_radii(
    shape: tuple[int, int], centre: tuple[float, float], bins: int
) -> list[tuple[float | None, float | None]]:
    """Inner and outer radius of each bin in view pixels (see :func:`ring_range`)."""
    limits = ring_range(shape, centre, bins)
    if limits is None:
        return [(None, None)] * bins
    low, top, scale = limits
    edges = [math.sqrt(max(low + b / scale, 0.0)) for b in range(bins)] + [math.sqrt(top)]
    return list(itertools.pairwise(edges))


def _mean_rms(n: int, total: int, squares: int) -> tuple[float, float]:
    """A bin's mean and rms as ``calc_stats`` computes them (0, 0 for an empty bin)."""
    if n == 0:
        return 0.0, 0.0
    return float(total) / n, math.sqrt(float(squares) / n)


def spot_floor(mean: float, rms: float, sensitivity: float) -> int | None:
    """The smallest integer ``v >= 0`` with ``(double)v - mean > sensitivity * rms``
    (exactly, in doubles), or None when no value qualifies."""
    limit = sensitivity * rms
    guess = mean + limit
    if math.isnan(guess) or guess == math.inf:
        return None
    if guess == -math.inf:
        return 0
    v = min(max(math.floor(guess), 0), 1 << 53)
    while v > 0 and float(v - 1) - mean > limit:
        v -= 1
    while not float(v) - mean > limit:
        v += 1
    return v


def spots_per_bin(pixels: Pixels, layout: RingLayout, floors: list[int | None]) -> list[int]:
    """Per bin, the pixels at or above its spot floor (every stored pixel counts)."""
    top = int(np.iinfo(pixels.dtype).max)
    # Spot iff v > floor - 1; a floor above the dtype can never be reached.
    cuts = [top if f is None or f > top else f - 1 for f in floors]
    table = np.zeros(256, np.int64)  # every uint8 bin indexes the table
    table[: len(cuts)] = cuts

    def band(a: int, b: int) -> list[int]:
        return kernels.count_above(pixels[a:b], layout, a, table)

    parts = bands.over_rows(band, (pixels.shape[0], pixels.shape[1]))
    return [sum(found) for found in zip(*parts, strict=True)][: len(floors)]


def _c_int(value: int) -> int:
    """A 32-bit unsigned value as the C ``int`` it was sent through."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _summary(sums: BinSums) -> Stats:
    """Whole-view statistics from the bin sums (``calc_stats``)."""
    n = sum(sums.count)
    if n == 0:
        return {"n": 0, "mean": 0.0, "rms": 0.0, "stddev": 0.0, "min": -1, "max": 0}
    mean = float(sum(sums.total)) / n
    mean_square = float(sum(sums.squares)) / n
    stats: Stats = {"n": n, "mean": mean, "rms": math.sqrt(mean_square)}
    variance = mean_square - mean * mean
    if variance >= 0:  # the original's NaN stddev was not written
        stats["stddev"] = math.sqrt(variance)
    stats["min"] = _c_int(sums.low if sums.low is not None else 0xFFFFFFFF)
    stats["max"] = _c_int(sums.high if sums.high is not None else 0)
    return stats
