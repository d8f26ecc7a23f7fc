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

Speed: the bins of a view depend only on its size and beam centre, so they are computed
once per geometry and kept (every frame of a dataset shares them), as runs of equal bin
along the flattened image; the sums are per-run ``np.add.reduceat`` in uint64.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Pixels = npt.NDArray[np.unsignedinteger[Any]]
Bins = npt.NDArray[np.uint8]

#: Ring bins of the original (IS_OUTPUT_IMAGE_BINS).
RING_BINS = 16
#: Rows per block when computing bins: float64 temporaries of ~2 MB.
_BLOCK_PIXELS = 1 << 18
#: Ring layouts kept, and the largest view whose layout is kept (4 MB of bins).
_LAYOUTS_KEPT = 8
_MAX_KEPT_PIXELS = 1 << 22
#: Below this fraction of candidate pixels, spots are judged on the candidates only.
_CANDIDATE_FRACTION = 16
#: Pixels per block when summing (a 512 kB uint64 buffer stays in cache).
_SUM_BLOCK_PIXELS = 1 << 16

Stats = dict[str, int | float]


def ring_bins(shape: tuple[int, int], centre: tuple[float, float], bins: int = RING_BINS) -> Bins:
    """The bin of every pixel of a ``shape`` view with the beam at ``centre`` (spec 5.6).

    ``centre`` may be anything a double can be: a non-finite range (a zero-wide window
    puts the centre at infinity) puts every pixel in bin 0, as NaN -> INT_MIN did.
    """
    if not 1 <= bins <= 255:
        raise ValueError(f"ring bins must be in 1..255, got {bins}")
    height, width = shape
    bx, by = (np.float64(c) for c in centre)
    out = np.zeros(shape, np.uint8)
    with np.errstate(all="ignore"):
        dx = np.arange(width, dtype=np.float64) - bx
        dy = np.arange(height, dtype=np.float64) - by
        dx2, dy2 = dx * dx, dy * dy
        corners = [
            (x - bx) * (x - bx) + (y - by) * (y - by) for y in (0, height) for x in (0, width)
        ]
        top = max(corners)
        inside = 0 <= bx < width and 0 <= by < height
        low = np.float64(0.0) if inside else min(corners)
        scale = np.float64(bins) / (top - low)
    if not all(math.isfinite(v) for v in (top, low, scale)):
        return out
    step = max(_BLOCK_PIXELS // max(width, 1), 1)
    for start in range(0, height, step):
        scaled = np.add.outer(dy2[start : start + step], dx2)
        scaled -= low
        scaled *= scale
        # Within the corners d2 <= max, so the product is at most ``bins`` (by rounding);
        # truncation of a value in [0, bins - 1] is what (int) does, below 0 means bin 0.
        np.clip(scaled, 0.0, float(bins - 1), out=scaled)
        np.copyto(out[start : start + step], scaled, casting="unsafe")
    return out


@dataclass(frozen=True)
class RingLayout:
    """Bins of one view geometry, as runs of equal bin along the flattened image.

    Runs are also cut at every :data:`_SUM_BLOCK_PIXELS` so that sums can be taken one
    cache-sized block at a time; block ``k`` holds the runs ``block_runs[k]:
    block_runs[k + 1]``. ``order`` sorts the runs by bin; the runs of bin ``b`` are
    ``order[bin_starts[b]:bin_starts[b + 1]]``.
    """

    bins: Bins
    run_starts: npt.NDArray[np.intp]
    run_lengths: npt.NDArray[np.intp]
    block_runs: list[int]
    order: npt.NDArray[np.intp]
    bin_starts: list[int]

    @classmethod
    def of(cls, bins: Bins, count: int) -> RingLayout:
        """The layout of a bin image (``count`` bins)."""
        flat = bins.reshape(-1)
        begins = np.empty(flat.size, bool)
        begins[0] = True
        np.not_equal(flat[1:], flat[:-1], out=begins[1:])
        begins[::_SUM_BLOCK_PIXELS] = True
        starts = np.flatnonzero(begins)
        lengths = np.diff(starts, append=flat.size)
        edges = np.append(np.arange(0, flat.size, _SUM_BLOCK_PIXELS), flat.size)
        block_runs = np.searchsorted(starts, edges).tolist()
        run_bins = flat[starts]
        order = np.argsort(run_bins, kind="stable")
        bin_starts = np.searchsorted(run_bins[order], np.arange(count + 1)).tolist()
        for array in (flat, starts, lengths, order):
            array.setflags(write=False)
        return cls(flat, starts, lengths, block_runs, order, bin_starts)

    def blocks(self) -> Iterator[tuple[int, int, npt.NDArray[np.intp], slice]]:
        """Per block: first pixel, end pixel, run starts relative to the block, and the
        slice of the runs it holds."""
        for k in range(len(self.block_runs) - 1):
            runs = slice(self.block_runs[k], self.block_runs[k + 1])
            first = k * _SUM_BLOCK_PIXELS
            end = min(first + _SUM_BLOCK_PIXELS, self.bins.size)
            yield first, end, self.run_starts[runs] - first, runs

    def per_bin(self, per_run: npt.NDArray[Any]) -> list[int]:
        """Exact per-bin totals of a per-run integer array."""
        ordered = per_run[self.order]
        return [
            int(ordered[lo:hi].sum()) if hi > lo else 0
            for lo, hi in zip(self.bin_starts[:-1], self.bin_starts[1:], strict=True)
        ]


class _LayoutCache:
    """The last few ring layouts by (shape, centre, bins); thread-safe, small views only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[Any, ...], RingLayout] = OrderedDict()

    def get(self, shape: tuple[int, int], centre: tuple[float, float], bins: int) -> RingLayout:
        key = (shape, centre, bins)
        with self._lock:
            layout = self._kept.get(key)
            if layout is not None:
                self._kept.move_to_end(key)
                return layout
        layout = RingLayout.of(ring_bins(shape, centre, bins), bins)
        if shape[0] * shape[1] <= _MAX_KEPT_PIXELS and all(map(math.isfinite, centre)):
            with self._lock:
                self._kept[key] = layout
                while len(self._kept) > _LAYOUTS_KEPT:
                    self._kept.popitem(last=False)
        return layout

    def clear(self) -> None:
        """Forget every kept layout (benchmarks of a first view)."""
        with self._lock:
            self._kept.clear()


_LAYOUTS = _LayoutCache()


def forget_ring_layouts() -> None:
    """Drop the kept ring layouts, so the next view computes its bins."""
    _LAYOUTS.clear()


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
    def of(cls, flat: Pixels, layout: RingLayout, sentinel: int | None) -> BinSums:
        """Sums of ``flat`` per bin of ``layout``, leaving out pixels equal to ``sentinel``."""
        excluded = _positions(flat, sentinel)
        counts = layout.run_lengths
        if excluded.size:
            # Sentinels are few: take them out of their runs rather than mask every pixel.
            run_of = np.searchsorted(layout.run_starts, excluded, side="right") - 1
            counts = counts - np.bincount(run_of, minlength=counts.size)
        n = layout.per_bin(counts)
        if not sum(n):
            return cls(n, [0] * len(n), [0] * len(n), None, None)
        totals, squares, high = _run_sums(flat, excluded, layout)
        if high * high * sum(n) >= 1 << 64:  # uint64 squares wrapped: redo them wider
            total, square = _wide_sums(flat, excluded, layout)
        else:
            total, square = layout.per_bin(totals), layout.per_bin(squares)
        low = int(flat.min())
        if excluded.size and low == sentinel:  # only when values above the sentinel exist
            low = int(flat.min(where=flat != flat.dtype.type(low), initial=high))
        return cls(n, total, square, low, high)


def _positions(flat: Pixels, sentinel: int | None) -> npt.NDArray[np.intp]:
    """Flat positions of the sentinel (usually none: one max() settles that)."""
    if sentinel is None or not 0 <= sentinel <= int(flat.max()):
        return np.empty(0, np.intp)
    return np.flatnonzero(flat == flat.dtype.type(sentinel))


def _run_sums(
    flat: Pixels, excluded: npt.NDArray[np.intp], layout: RingLayout
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], int]:
    """Per-run sums of values and of squares (uint64, exact while totals stay below
    2**64) and the largest value, excluded pixels counting as 0. One cache-sized block at
    a time through one buffer."""
    totals = np.empty(layout.run_starts.size, np.uint64)
    squares = np.empty(layout.run_starts.size, np.uint64)
    buffer = np.empty(min(_SUM_BLOCK_PIXELS, flat.size), np.uint64)
    firsts = [first for first, *_ in layout.blocks()]
    cuts = np.searchsorted(excluded, [*firsts, flat.size]).tolist()
    high = 0
    for k, (first, end, starts, runs) in enumerate(layout.blocks()):
        values = buffer[: end - first]
        np.copyto(values, flat[first:end])
        values[excluded[cuts[k] : cuts[k + 1]] - first] = 0
        high = max(high, int(values.max()))
        np.add.reduceat(values, starts, out=totals[runs])
        np.multiply(values, values, out=values)
        np.add.reduceat(values, starts, out=squares[runs])
    return totals, squares, high


def _wide_sums(
    flat: Pixels, excluded: npt.NDArray[np.intp], layout: RingLayout
) -> tuple[list[int], list[int]]:
    """Per-bin sums for squares too large for 64 bits (bright 32-bit views): with
    ``v = h * 2**16 + l``, ``v^2 = h^2 * 2**32 + h * l * 2**17 + l^2``, three sums that
    each fit in 64 bits, combined exactly in Python integers."""
    values = flat.astype(np.uint64)
    values[excluded] = 0
    high, low = values >> np.uint64(16), values & np.uint64(0xFFFF)
    sums = [
        layout.per_bin(np.add.reduceat(part, layout.run_starts))
        for part in (values, high * high, high * low, low * low)
    ]
    squares = [(a << 32) + (b << 17) + c for a, b, c in zip(*sums[1:], strict=True)]
    return sums[0], squares


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
    flat = np.ascontiguousarray(pixels).reshape(-1)
    layout = _LAYOUTS.get((pixels.shape[0], pixels.shape[1]), centre, bins)
    sums = BinSums.of(flat, layout, sentinel)
    floors = [
        spot_floor(*_mean_rms(n, total, squares), sensitivity)
        for n, total, squares in zip(sums.count, sums.total, sums.squares, strict=True)
    ]
    return _summary(sums) | {"spots": count_spots(flat, layout.bins, floors)}


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


def count_spots(flat: Pixels, bins: Bins, floors: list[int | None]) -> int:
    """Pixels at or above their bin's spot floor (every stored pixel counts)."""
    top = int(np.iinfo(flat.dtype).max)
    # Spot iff v > floor - 1; a floor above the dtype can never be reached.
    cuts = [top if f is None or f > top else f - 1 for f in floors]
    if min(cuts) < 0:  # only with a negative sensitivity: a floor of 0
        table = np.array(cuts, np.int64)
        return int(np.count_nonzero(flat > np.take(table, bins)))
    table = np.array(cuts, flat.dtype)
    above = flat > table.min()
    found = int(np.count_nonzero(above))
    if found * _CANDIDATE_FRACTION < flat.size:
        where = np.flatnonzero(above)
        return int(np.count_nonzero(flat[where] > np.take(table, bins[where])))
    return int(np.count_nonzero(flat > np.take(table, bins)))


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
