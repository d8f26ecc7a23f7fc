"""The view pipeline: frame -> reduced image (+ stats) -> 8-bit view -> JPEG (spec 2.2, 5.4-5.8).

Pure functions over plain values. :func:`reduce_frame` is the expensive step (done once per
geometry and cached as :class:`Reduced`, see :meth:`Reduced.to_bytes`); :func:`render_jpeg`
is the cheap per-request step; :func:`render_blank` is the grey fallback of spec 2.2.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core.contrast import Levels, contrast_levels, marked_view, saturated_indices
from istasks.core.jpeg import Encoded, encode_jpeg, encode_view
from istasks.core.label import banner_height, banner_text, draw_banner
from istasks.core.params import MIN_XSIZE, ContrastParams, LabelParams, ViewParams
from istasks.core.readers.base import Frame, Meta
from istasks.core.reduce import (
    PIXEL_DTYPES,
    clamp_to_saturation,
    fold_edges,
    plan_window,
    reduce_window,
    usable_pixels,
    zero_masked,
)
from istasks.core.stats import Ring, analyse
from istasks.errors import DataUnavailable

Pixels = npt.NDArray[np.unsignedinteger[Any]]

#: Grey level of the blank fallback image (RGB 0xF0F0F0).
BLANK_GREY = 0xF0
#: Binary form of a Reduced: magic, header length, JSON header, raw pixels. The magic
#: names the reduction: "ISR1" held the tiling boxes, "ISR2" the original's centred boxes
#: (issue 11); an entry of another reduction is undecodable, hence recomputed.
_MAGIC = b"ISR2"
_HEADER = struct.Struct("<4sI")
_WIRE_DTYPES = {d.newbyteorder("<").str: d.newbyteorder("<") for d in PIXEL_DTYPES}


@dataclass
class Reduced:
    """A reduced image at full depth with the meta sent to clients (spec 5.4).

    ``meta`` is the frame's meta plus ``n, mean, rms, stddev, min, max, spots`` and
    ``nSaturated`` of this reduction. ``saturation`` is the code drawn red; ``sentinel``
    the stored value the statistics left out (None: none was, a 16-bit nearest view).
    """

    pixels: Pixels
    saturation: int
    meta: dict[str, Any]
    sentinel: int | None = None
    #: Each ring bin's numbers (:func:`ring_dicts`); not in ``meta``, so the replies
    #: is.js gets stay the original's. None: an image cached before rings were kept.
    rings: list[dict[str, Any]] | None = None
    #: Flat indices of the saturated pixels, found on first use (then every new
    #: contrast of a cached image skips that pass).
    _saturated: npt.NDArray[np.intp] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def saturated(self) -> npt.NDArray[np.intp]:
        """Flat indices of the pixels at the saturation code (computed once)."""
        if self._saturated is None:
            self._saturated = saturated_indices(usable_pixels(self.pixels), self.saturation)
        return self._saturated

    def to_bytes(self) -> bytes:
        """Compact binary form for the cache: a small JSON header, then the raw pixels."""
        pixels = np.ascontiguousarray(self.pixels, dtype=self.pixels.dtype.newbyteorder("<"))
        header = json.dumps(
            {
                "dtype": pixels.dtype.str,
                "shape": list(pixels.shape),
                "saturation": self.saturation,
                "sentinel": self.sentinel,
                "meta": self.meta,
                "rings": self.rings,
            },
            separators=(",", ":"),
            default=_json_default,
        ).encode()
        return b"".join((_HEADER.pack(_MAGIC, len(header)), header, pixels.data))

    @classmethod
    def from_bytes(cls, data: bytes) -> Reduced:
        """Inverse of :meth:`to_bytes`; DataUnavailable for anything malformed.

        The pixels are a read-only view of ``data`` (no copy).
        """
        header, offset = _read_header(data)
        dtype, shape = _header_geometry(header)
        expected = shape[0] * shape[1] * dtype.itemsize
        if len(data) - offset != expected:
            raise DataUnavailable(
                f"cached image holds {len(data) - offset} pixel bytes, expected {expected}"
            )
        pixels = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
        native = pixels.astype(dtype.newbyteorder("="), copy=False)
        return cls(native, *_header_rest(header), rings=_header_rings(header))

    @property
    def nbytes(self) -> int:
        """Bytes held by the pixel buffer (what a cache should account for)."""
        return int(self.pixels.nbytes)


@dataclass(frozen=True)
class Rendered:
    """A rendered view and the contrast levels actually used (echoed to is.js)."""

    jpeg: Encoded
    wval_used: int
    bval_used: int


def prepare_frame(frame: Frame) -> Frame:
    """``frame`` ready to be reduced any number of times: native order, masked pixels
    zeroed, counts clamped to the saturation code (the first steps of
    :func:`reduce_frame`), its array read-only and no mask left to apply. Reducing the
    result gives exactly what reducing ``frame`` gives; a worker keeps it in its frame
    LRU so that the tiles of one frame (zoom, pan) need one decode, and being read-only
    it can be shared by the worker's threads.
    """
    pixels = usable_pixels(frame.pixels)
    pixels = zero_masked(pixels, frame.mask)
    pixels = clamp_to_saturation(pixels, frame.saturation)
    pixels.flags.writeable = False
    return Frame(pixels, None, frame.saturation, frame.meta)


def reduce_frame(
    frame: Frame,
    params: ViewParams,
    *,
    spot_sensitivity: float = 1.5,
    max_xsize: int = 10000,
    fold: bool = False,
) -> Reduced:
    """Reduce ``frame`` to the view ``params`` and compute its statistics (spec 5.5, 5.6),
    as the original did. ``fold`` (``IS_FOLD_EDGES``) then adds our edge fold to the
    picture, after the statistics, so the numbers stay the original's (see
    :mod:`istasks.core.reduce`; off by default: the recorded replies are the original's
    pictures, and at small sizes the fold visibly changes a whole edge row/column).

    Masked pixels of ``frame.pixels`` are zeroed in place (the pipeline owns the array).
    Raises InvalidView for an ``xsize`` over ``max_xsize``, DataUnavailable for a frame
    the core cannot use.
    """
    pixels = usable_pixels(frame.pixels)
    window = plan_window((pixels.shape[0], pixels.shape[1]), params, max_xsize=max_xsize)
    pixels = zero_masked(pixels, frame.mask)
    pixels = clamp_to_saturation(pixels, frame.saturation)
    reduction = reduce_window(pixels, window, frame.saturation)
    centre = window.to_output(*_beam_centre(frame.meta, pixels.shape))
    stats, rings = analyse(
        reduction.pixels, centre, sentinel=reduction.sentinel, sensitivity=spot_sensitivity
    )
    meta = dict(frame.meta)
    meta.update(stats)
    # This reduction's own count; the original sent an earlier reduction's (bug 15).
    meta["nSaturated"] = reduction.saturated
    if fold:
        fold_edges(pixels, window, reduction.pixels)
    scale = window.width / window.out_width if window.out_width else 1.0
    return Reduced(
        reduction.pixels, frame.saturation, meta, reduction.sentinel, ring_dicts(rings, scale)
    )


def ring_dicts(rings: list[Ring], scale: float) -> list[dict[str, Any]]:
    """The rings as JSON objects, radii in detector pixels (``scale``: detector pixels
    per view pixel across): what the gateway's meta endpoint and viewer panel show."""

    def detector(radius: float | None) -> float | None:
        return None if radius is None else round(radius * scale, 2)

    return [
        {"ring": b, "n": r.n, "mean": r.mean, "rms": r.rms, "spots": r.spots,
         "inner_px": detector(r.inner), "outer_px": detector(r.outer)}
        for b, r in enumerate(rings)
    ]  # fmt: skip


def render_jpeg(
    reduced: Reduced, contrast: ContrastParams, label: LabelParams, *, quality: int = 90
) -> Rendered:
    """The JPEG of a reduced image: contrast to 8 bits, label banner on top (spec 5.7, 5.8).

    The JPEG is ``width x (height + banner)`` pixels; quality 90 is the service default.
    Raises EncodeError when encoding fails, DataUnavailable for an unusable pixel array.
    """
    pixels = usable_pixels(reduced.pixels)
    levels: Levels = contrast_levels(contrast, reduced.meta)
    rows = banner_height(label.height)
    view = marked_view(pixels, levels, reduced.saturated(), top_rows=rows)
    if rows:
        view.grey[:rows] = draw_banner(
            view.grey.shape[1], rows, banner_text(label.text, reduced.meta)
        )
    return Rendered(encode_view(view, quality=quality), levels.white, levels.black)


def render_blank(
    xsize: int, label: LabelParams, *, quality: int = 90, max_xsize: int = 10000
) -> Encoded:
    """The grey fallback (spec 2.2): a 0xF0F0F0 square of width clamp(xsize, 8, max_xsize).

    The label banner (text only, no frame number) is drawn when the label has a height
    and text. The upper clamp fixes bug 23 (an unbounded allocation in the original).
    """
    width = min(max(xsize, MIN_XSIZE), max(max_xsize, MIN_XSIZE))
    text = banner_text(label.text)
    rows = banner_height(label.height) if text else 0
    view = np.full((rows + width, width), BLANK_GREY, np.uint8)
    if rows:
        view[:rows] = draw_banner(width, rows, text)
    return encode_jpeg(view, quality=quality)


def _beam_centre(meta: Meta, shape: tuple[int, ...]) -> tuple[float, float]:
    """Beam centre (x, y) in source pixels; the image centre when meta lacks it.

    The original exited the worker when ``beam_center_x/y`` was missing (bug 4).
    """
    x, y = _finite_number(meta.get("beam_center_x")), _finite_number(meta.get("beam_center_y"))
    if x is not None and y is not None:
        return x, y
    return shape[1] / 2.0, shape[0] / 2.0


def _finite_number(value: object) -> float | None:
    """A finite JSON number as float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_default(value: object) -> Any:
    """numpy scalars and arrays in meta become plain JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON")


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header of a cached Reduced and the offset of its pixel bytes."""
    if len(data) < _HEADER.size:
        raise DataUnavailable("cached image is truncated")
    magic, length = _HEADER.unpack_from(data)
    end = _HEADER.size + length
    if magic != _MAGIC or end > len(data):
        raise DataUnavailable("cached image has a bad header")
    try:
        header = json.loads(bytes(data[_HEADER.size : end]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataUnavailable(f"cached image header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise DataUnavailable("cached image header is not an object")
    return header, end


def _header_geometry(header: dict[str, Any]) -> tuple[np.dtype[Any], tuple[int, int]]:
    name, shape = header.get("dtype"), header.get("shape")
    dtype = _WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise DataUnavailable(f"cached image has dtype {header.get('dtype')!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DataUnavailable(f"cached image has shape {shape!r}")
    return dtype, (shape[0], shape[1])


def _header_rings(header: dict[str, Any]) -> list[dict[str, Any]] | None:
    rings = header.get("rings")
    if rings is None:
        return None
    if not isinstance(rings, list) or not all(isinstance(r, dict) for r in rings):
        raise DataUnavailable("cached image rings are not a list of objects")
    return rings


def _header_rest(header: dict[str, Any]) -> tuple[int, dict[str, Any], int | None]:
    saturation, meta = header.get("saturation"), header.get("meta")
    sentinel = header.get("sentinel")
    if isinstance(saturation, bool) or not isinstance(saturation, int):
        raise DataUnavailable(f"cached image has saturation {saturation!r}")
    if not isinstance(meta, dict):
        raise DataUnavailable("cached image meta is not an object")
    if sentinel is not None and (isinstance(sentinel, bool) or not isinstance(sentinel, int)):
        raise DataUnavailable(f"cached image has sentinel {sentinel!r}")
    return saturation, meta, sentinel
