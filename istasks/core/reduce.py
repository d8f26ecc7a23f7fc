"""Reduction of a full-depth frame to the requested view size (spec 5.5).

A view is a zoom window of the detector image (``trunc(W / zoom)`` x ``trunc(H / zoom)``
source pixels starting at ``trunc(win * segcol)``, ``trunc(win * segrow)``) mapped onto
``xsize`` output columns. Each axis is handled on its own:

* **max-of-box** when the window is longer than the output on that axis: output pixel
  ``i`` is the maximum of source pixels ``floor(i * win / dst) .. floor((i + 1) * win / dst)
  - 1``. These boxes *tile* the window, so every source pixel lands in exactly one box
  and a single bright pixel always survives. (The original used boxes of
  ``win div dst`` pixels centred on ``i * win / dst``, which leave gaps between boxes
  whenever the ratio is not an integer: spots could vanish. We fix that.)
* **nearest** otherwise (zoomed in, upsampling): output pixel ``i`` is the source pixel
  containing the output pixel's centre, ``floor((i + 0.5) * win / dst)``. The original
  rounded ``i * win / dst`` instead, which shifts the picture by half an output pixel.

Window parts outside the image are 0. Masked pixels are zeroed in place beforehand, so a
box with only masked pixels is 0 ("nothing valid"), as in the original. Everything stays
at the source depth; the saturation code (the dtype's maximum) is the largest value, so
max-of-box keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core.params import MIN_XSIZE, ViewParams
from istasks.core.readers.base import PixelMask
from istasks.errors import DataUnavailable, InvalidView

Pixels = npt.NDArray[np.unsignedinteger[Any]]
Index = npt.NDArray[np.intp]

#: Source dtypes the pipeline accepts (spec: image_depth 2 or 4).
PIXEL_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))
#: Source pixels per block of reduced rows (about 1 MB of uint32 per block).
_ROW_BLOCK_PIXELS = 1 << 18
#: Pixels per block when scanning the window for saturated pixels.
_SCAN_BLOCK_PIXELS = 1 << 20
#: Above this many saturated output pixels, one scan of the window beats box-by-box.
_MAX_BOX_SCANS = 1000


@dataclass(frozen=True)
class Window:
    """Source window ``[x0, x0 + width) x [y0, y0 + height)`` and the output size."""

    x0: int
    y0: int
    width: int
    height: int
    out_width: int
    out_height: int

    def to_output(self, x: float, y: float) -> tuple[float, float]:
        """Map a source position (e.g. the beam centre) into output pixel coordinates."""
        return (
            (x - self.x0) / (self.width / self.out_width),
            (y - self.y0) / (self.height / self.out_height),
        )


@dataclass(frozen=True)
class AxisPlan:
    """How one axis is reduced: output range ``[out_lo, out_hi)`` that sees the image.

    ``src_lo:src_hi`` is the source slice it reads; ``index`` holds, relative to
    ``src_lo``, the box starts (``box``) or the sampled pixels (nearest).
    """

    box: bool
    out_lo: int
    out_hi: int
    src_lo: int
    src_hi: int
    index: Index

    @property
    def empty(self) -> bool:
        """True when no output pixel on this axis sees the image."""
        return self.out_hi <= self.out_lo


def usable_pixels(pixels: Pixels) -> Pixels:
    """The frame's array in native byte order; DataUnavailable if the core cannot use it.

    Refuses anything but a non-empty 2-D uint16/uint32 image (a reader bug or a corrupt
    file); a byte-swapped array (e.g. from a big-endian TIFF) is converted.
    """
    if pixels.ndim != 2 or pixels.size == 0:
        raise DataUnavailable(f"frame must be a non-empty 2-D image, got shape {pixels.shape}")
    native = pixels.dtype.newbyteorder("=")
    if native not in PIXEL_DTYPES:
        raise DataUnavailable(f"unsupported pixel type {pixels.dtype} (need uint16 or uint32)")
    return pixels if pixels.dtype.isnative else pixels.astype(native)


def plan_window(shape: tuple[int, int], params: ViewParams, *, max_xsize: int) -> Window:
    """Window and output size of ``params`` on an image of ``shape`` (rows, columns).

    The actual array shape is used, not the metadata's ``x/y_pixels_in_detector``. The
    output is square unless ``keep_aspect`` (then the height follows the window's aspect).
    Raises InvalidView for a width (or height) above ``max_xsize`` or non-finite values.
    """
    zoom, segcol, segrow = params.zoom, params.segcol, params.segrow
    if not all(math.isfinite(v) for v in (zoom, segcol, segrow)) or zoom < 1.0:
        raise InvalidView(f"bad zoom window zoom={zoom} segcol={segcol} segrow={segrow}")
    out_width = max(params.xsize, MIN_XSIZE)
    if out_width > max_xsize:
        raise InvalidView(f"xsize {params.xsize} is over the limit {max_xsize}")
    src_height, src_width = shape
    # A zoom larger than the image still shows one source pixel rather than nothing.
    width = max(math.trunc(src_width / zoom), 1)
    height = max(math.trunc(src_height / zoom), 1)
    out_height = out_width
    if params.keep_aspect:
        out_height = max(round(out_width * height / width), 1)
        if out_height > max_xsize:
            raise InvalidView(f"output height {out_height} is over the limit {max_xsize}")
    # Segments beyond +-1e9 are off the image anyway; clamping keeps width * seg finite.
    segcol, segrow = (min(max(seg, -1e9), 1e9) for seg in (segcol, segrow))
    return Window(
        x0=math.trunc(width * segcol),
        y0=math.trunc(height * segrow),
        width=width,
        height=height,
        out_width=out_width,
        out_height=out_height,
    )


def plan_axis(origin: int, win: int, dst: int, size: int) -> AxisPlan:
    """Plan one axis: window ``[origin, origin + win)`` of ``size`` pixels onto ``dst``."""
    box = win > dst
    if origin >= size or origin + win <= 0:
        return AxisPlan(box, 0, 0, 0, 0, np.empty(0, np.intp))
    steps = np.arange(dst + 1, dtype=np.int64)
    if box:
        edges = origin + steps * win // dst
        # Output i sees the image when its box [edges[i], edges[i+1]) meets [0, size).
        out_lo = int(np.searchsorted(edges[1:], 0, side="right"))
        out_hi = int(np.searchsorted(edges[:-1], size, side="left"))
        starts = np.clip(edges[out_lo:out_hi], 0, size)
        src_lo, src_hi = int(starts[0]), min(int(edges[out_hi]), size)
        return AxisPlan(True, out_lo, out_hi, src_lo, src_hi, (starts - src_lo).astype(np.intp))
    centres = origin + (2 * steps[:-1] + 1) * win // (2 * dst)
    out_lo = int(np.searchsorted(centres, 0, side="left"))
    out_hi = int(np.searchsorted(centres, size, side="left"))
    picks = centres[out_lo:out_hi]
    if picks.size == 0:
        return AxisPlan(False, 0, 0, 0, 0, np.empty(0, np.intp))
    src_lo, src_hi = int(picks[0]), int(picks[-1]) + 1
    return AxisPlan(False, out_lo, out_hi, src_lo, src_hi, (picks - src_lo).astype(np.intp))


def zero_masked(pixels: Pixels, mask: PixelMask | None) -> Pixels:
    """Zero the masked pixels in place (the pipeline owns the frame's array).

    Returns the array that was modified: a copy when ``pixels`` is read-only or not
    C-contiguous, so the caller must use the returned array.
    """
    if mask is None or mask.count == 0:
        return pixels
    if mask.bad.shape != pixels.shape:
        raise DataUnavailable(f"mask shape {mask.bad.shape} differs from image {pixels.shape}")
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):
        pixels = np.array(pixels, order="C")
    # A scatter over the cached flat index costs ~1 ms for an Eiger2 16M gap mask, far
    # less than a boolean-mask pass over the whole frame.
    pixels.reshape(-1)[mask.flat_index] = 0
    return pixels


def clamp_to_saturation(pixels: Pixels, saturation: int) -> Pixels:
    """Make the saturation code the largest value, so max-of-box keeps it.

    Readers give the dtype's maximum (0xFFFF / 0xFFFFFFFF) and nothing happens. For a
    lower code, counts above it are saturated too and are clamped to it (a full pass).
    """
    if saturation >= np.iinfo(pixels.dtype).max or saturation < 0:
        return pixels
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    np.minimum(pixels, pixels.dtype.type(saturation), out=pixels)
    return pixels


def reduce_pixels(pixels: Pixels, window: Window) -> Pixels:
    """The reduced image (out_height x out_width, source dtype) of ``window``.

    Works in blocks of output rows: rows first (contiguous reads), then columns while the
    row-reduced block is still in cache; no temporary larger than a block.
    """
    rows = plan_axis(window.y0, window.height, window.out_height, pixels.shape[0])
    cols = plan_axis(window.x0, window.width, window.out_width, pixels.shape[1])
    shape = (window.out_height, window.out_width)
    if rows.empty or cols.empty:
        return np.zeros(shape, pixels.dtype)
    covered = (rows.out_lo, rows.out_hi, cols.out_lo, cols.out_hi) == (0, shape[0], 0, shape[1])
    out = np.empty(shape, pixels.dtype) if covered else np.zeros(shape, pixels.dtype)
    target = out[rows.out_lo : rows.out_hi, cols.out_lo : cols.out_hi]
    source = pixels[rows.src_lo : rows.src_hi, cols.src_lo : cols.src_hi]
    gathers = _column_gathers(cols, source.shape[1])
    step = max(_ROW_BLOCK_PIXELS // source.shape[1], 1)
    for start in range(0, target.shape[0], step):
        stop = min(start + step, target.shape[0])
        _reduce_columns(_reduce_rows(source, rows, start, stop), gathers, target[start:stop])
    return out


def _reduce_rows(source: Pixels, plan: AxisPlan, start: int, stop: int) -> Pixels:
    """Output rows ``start:stop`` reduced along axis 0 (max of each box of rows, or picked)."""
    if not plan.box:
        return np.take(source, plan.index[start:stop], axis=0)
    out = np.empty((stop - start, source.shape[1]), source.dtype)
    firsts = plan.index[start:stop].tolist()
    ends = plan.index[start + 1 : stop + 1].tolist()
    if len(ends) < len(firsts):
        ends.append(source.shape[0])
    # One reduce per output row over contiguous rows: ~5 ms for Eiger2 16M -> 1024,
    # where np.maximum.reduceat along axis 0 takes ~70 ms.
    for i, (first, end) in enumerate(zip(firsts, ends, strict=True)):
        np.maximum.reduce(source[first:end], axis=0, out=out[i])
    return out


def _column_gathers(plan: AxisPlan, width: int) -> list[Index]:
    """Column index arrays whose elementwise maximum is the column reduction.

    For boxes, array ``k`` holds column ``k`` of every box, repeating a box's last column
    when the box is shorter (harmless for a maximum). Nearest mode is one array.
    """
    if not plan.box:
        return [plan.index]
    last = np.empty_like(plan.index)
    last[:-1] = plan.index[1:] - 1
    last[-1] = width - 1
    widest = int((last - plan.index).max()) + 1
    return [np.minimum(plan.index + offset, last) for offset in range(widest)]


def _reduce_columns(part: Pixels, gathers: list[Index], out: Pixels) -> None:
    """Write the column reduction of ``part`` into ``out``.

    Gathering whole columns and keeping a running maximum takes ~4 ms for 1024 boxes of
    4-5 columns, half of np.maximum.reduceat along axis 1.
    """
    np.take(part, gathers[0], axis=1, out=out, mode="clip")
    for columns in gathers[1:]:
        np.maximum(out, np.take(part, columns, axis=1, mode="clip"), out=out)


def count_saturated(pixels: Pixels, window: Window, saturation: int, reduced: Pixels) -> int:
    """Saturated source pixels inside the window (masked ones are already zero).

    With tiling boxes on both axes every window pixel reaches the output, so only the
    boxes of saturated output pixels are scanned (none in the usual case). When an axis
    samples (nearest), the window is at most ``xsize`` pixels on that axis and is scanned.
    """
    if saturation > np.iinfo(pixels.dtype).max or saturation < 0:
        return 0
    code = pixels.dtype.type(saturation)
    if window.width > window.out_width and window.height > window.out_height:
        hits = np.argwhere(reduced == code)
        if hits.shape[0] <= _MAX_BOX_SCANS:
            return sum(
                int(np.count_nonzero(pixels[_box(window, row, column, pixels.shape)] == code))
                for row, column in hits.tolist()
            )
    return _count_in_window(pixels, window, code)


def _box(window: Window, row: int, column: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Source slices of output pixel (row, column) in max-of-box mode, clipped to the image."""
    y0, x0 = window.y0, window.x0
    top = y0 + row * window.height // window.out_height
    bottom = y0 + (row + 1) * window.height // window.out_height
    left = x0 + column * window.width // window.out_width
    right = x0 + (column + 1) * window.width // window.out_width
    return (
        slice(max(top, 0), min(bottom, shape[0])),
        slice(max(left, 0), min(right, shape[1])),
    )


def _count_in_window(pixels: Pixels, window: Window, code: np.unsignedinteger[Any]) -> int:
    """Pixels equal to ``code`` in the window, scanned in row blocks."""
    y_lo, y_hi = max(window.y0, 0), min(window.y0 + window.height, pixels.shape[0])
    x_lo, x_hi = max(window.x0, 0), min(window.x0 + window.width, pixels.shape[1])
    if y_lo >= y_hi or x_lo >= x_hi:
        return 0
    step = max(_SCAN_BLOCK_PIXELS // (x_hi - x_lo), 1)
    # Row blocks keep the boolean temporary small (the window can be a whole frame).
    return sum(
        int(np.count_nonzero(pixels[y : min(y + step, y_hi), x_lo:x_hi] == code))
        for y in range(y_lo, y_hi, step)
    )
