"""JPEG encoding of an 8-bit view (spec 5.8): bytes plus their media type.

simplejpeg (libjpeg-turbo bundled in its wheel) with baseline defaults: JFIF, 4:2:0 chroma
subsampling for RGB, standard Huffman tables, the same output settings Pillow used here.
Why not Pillow: its encode-to-memory holds the GIL (field notes section 4), so a worker's
task threads encode one at a time; simplejpeg encodes ``with nogil``. Measured here
(``python -m bench jpeg``: 1024 x 1024, q90, 2-core machine under load):
RGB Pillow-SIMD 6.2 ms, 139/s on 1 thread, 94/s on 2 threads; simplejpeg 5.1 ms, 196/s
and 240/s. GRAY Pillow-SIMD 4.7 ms, 238/s and 206/s; simplejpeg 3.9 ms, 264/s and 295/s.
The original used quality 100; the service default is 90 (setting ``IS_JPEG_QUALITY``):
on a random 1024 x 1024 RGB image q100 took 9.6 ms and 2.0 MB, q90 5.1 ms and 0.94 MB,
with no visible difference on diffraction images. Greyscale input is encoded as a
one-component JPEG, cheaper than RGB for the same look.

A view with red (saturated) pixels is handed to libjpeg as YCbCr 4:2:0 planes made from
the grey view (:func:`encode_view`): the image an RGB encode makes, to within rounding
(RGB->YCbCr and the 2x2 chroma averaging are done here, on the few red pixels only),
without building a 3-byte RGB image for libjpeg to convert back. Measured on the 16M
test frame at 1024 px (4 red pixels): contrast + encode 4.1 ms instead of 6.9 ms.

A large view is encoded in row bands on the core's threads (:mod:`istasks.core.bands`)
and the bands are joined into one baseline JPEG with restart markers (ITU T.81: a DRI
segment, then ``RSTn`` between the bands' entropy-coded data). Every 8 x 8 block is
coded the same as in one whole encode and a restart resets the DC prediction as a fresh
encoder starts it, so the decoded picture is the whole encode's, pixel for pixel (tested);
only the bytes differ, by the markers. Measured on 2 cores (zoom tiles of the 16M test
frame, 1024 px grey, alternating with the one-piece encode): 4.2-4.7 -> 2.7-2.9 ms.
Bands cut at multiples of the MCU height, so no band pads a partial MCU row; when the
bands' headers ever disagree (they come from the same encoder settings, so they never
should; TurboJPEG reads a one-row 4:2:0 band as 4:2:2, though), the view is encoded
whole instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import simplejpeg

from istasks.core import bands
from istasks.core.contrast import MarkedView
from istasks.errors import EncodeError

#: Largest side libjpeg accepts.
MAX_JPEG_SIDE = 65500
#: Pure red (255, 0, 0) in JFIF YCbCr, rounded as libjpeg rounds it.
RED_Y, RED_CB, RED_CR = 76, 85, 255
#: Neutral chroma (grey).
NEUTRAL = 128
#: MCU height in rows: 8 for one-component grey, 16 for YCbCr 4:2:0.
GREY_MCU, YCC420_MCU = 8, 16
#: A restart interval is a 16-bit count of MCUs (T.81 B.2.4.4).
MAX_RESTART_MCUS = 0xFFFF
#: Markers: start of frame (baseline), define restart interval, start of scan, end.
SOF0, DRI, SOS, EOI = 0xC0, 0xDD, 0xDA, b"\xff\xd9"


@dataclass(frozen=True)
class Encoded:
    """Encoded image bytes and their media type, so nothing downstream guesses."""

    data: bytes
    media_type: str = "image/jpeg"


def encode_jpeg(rgb: npt.NDArray[np.uint8], *, quality: int) -> Encoded:
    """Encode an 8-bit image: (height, width) grey or (height, width, 3) RGB.

    Raises EncodeError for an unusable array, a quality outside 1..100, or a codec failure.
    """
    _check_image(rgb)
    _check_quality(quality)
    pixels = np.ascontiguousarray(rgb)
    try:
        if pixels.ndim == 2:
            data = _encode_grey(pixels, quality)
        else:
            data = simplejpeg.encode_jpeg(
                pixels, quality=quality, colorspace="RGB", colorsubsampling="420"
            )
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise EncodeError(f"jpeg compression error: {exc}") from exc
    return Encoded(data)


def _encode_grey(pixels: npt.NDArray[np.uint8], quality: int) -> bytes:
    """A one-component JPEG of a C-contiguous grey image, in bands when large."""

    def rows(start: int, stop: int) -> bytes:
        band: bytes = simplejpeg.encode_jpeg(
            pixels[start:stop, :, np.newaxis],
            quality=quality,
            colorspace="GRAY",
            colorsubsampling="Gray",
        )
        return band

    return encode_in_bands(rows, pixels.shape[0], pixels.shape[1], GREY_MCU)


def encode_view(view: MarkedView, *, quality: int) -> Encoded:
    """Encode a grey view with red pixels: a grey JPEG when there are none, else colour.

    Raises EncodeError like :func:`encode_jpeg`.
    """
    if not view.red.size:
        return encode_jpeg(view.grey, quality=quality)
    _check_image(view.grey)
    _check_quality(quality)
    luma = _even_luma(view.grey, view.red)
    cb, cr = _red_chroma(luma.shape, view.red)

    def ycc_rows(start: int, stop: int) -> bytes:
        # Bands start on even rows, so the chroma rows of rows start..stop are these.
        half = slice(start // 2, (stop + 1) // 2)
        band: bytes = simplejpeg.encode_jpeg_yuv_planes(
            luma[start:stop], cb[half], cr[half], quality=quality
        )
        return band

    try:
        data = encode_in_bands(ycc_rows, luma.shape[0], luma.shape[1], YCC420_MCU)
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise EncodeError(f"jpeg compression error: {exc}") from exc
    return Encoded(data)


def encode_in_bands(
    encode_rows: Callable[[int, int], bytes], height: int, width: int, mcu: int
) -> bytes:
    """One JPEG of ``height x width`` pixels from ``encode_rows(start, stop)``, the JPEG
    of those rows alone: whole for a small image or one core, else in bands of whole MCU
    rows on the core's threads, joined with restart markers (module docstring)."""
    cuts = mcu_bands(height, width, mcu)
    if len(cuts) == 1:
        return encode_rows(0, height)
    parts = bands.run(encode_rows, cuts)
    interval = (cuts[0][1] // mcu) * -(-width // mcu)
    try:
        return join_bands(parts, height, interval)
    except ValueError:
        return encode_rows(0, height)


def mcu_bands(height: int, width: int, mcu: int) -> list[tuple[int, int]]:
    """Row ranges for :func:`encode_in_bands`: as many as :func:`bands.count` gives the
    image, each the same whole number of MCU rows (the last takes the rest) and at most
    a restart interval's worth of MCUs (a very wide image gets more bands than threads).
    One range when :func:`bands.count` gives one: no restarts, no limit."""
    parts = bands.count(height, width)
    if parts == 1:
        return [(0, height)]
    mcu_rows, mcu_cols = -(-height // mcu), -(-width // mcu)
    per_band = min(-(-mcu_rows // parts), MAX_RESTART_MCUS // mcu_cols)
    return [
        (first * mcu, min((first + per_band) * mcu, height))
        for first in range(0, mcu_rows, per_band)
    ]


def join_bands(parts: list[bytes], height: int, interval: int) -> bytes:
    """One baseline JPEG of ``height`` rows from the JPEGs of its bands, in order, each
    band but the last ``interval`` MCUs: the first band's headers with the full height
    and a restart interval, then each band's entropy-coded data, ``RSTn`` between them.
    ValueError when a band is not a JPEG whose headers match the first band's."""
    first = _Header.of(parts[0])
    shared = first.shared()
    pieces = [
        first.data[: first.sof + 5], struct.pack(">H", height),
        first.data[first.sof + 7 : first.sos], struct.pack(">BBHH", 0xFF, DRI, 4, interval),
        first.data[first.sos :],
    ]  # fmt: skip
    for number, part in enumerate(parts):
        header = _Header.of(part) if number else first
        if header.shared() != shared or not part.endswith(EOI):
            raise ValueError("bands with different JPEG headers")
        if number:
            pieces.append(bytes((0xFF, 0xD0 + (number - 1) % 8)))
        pieces.append(part[len(header.data) : -len(EOI)])
    pieces.append(EOI)
    return b"".join(pieces)


@dataclass(frozen=True)
class _Header:
    """A JPEG's bytes up to its entropy-coded data, with the offsets of its SOF0 and SOS
    segments."""

    data: bytes
    sof: int
    sos: int

    @classmethod
    def of(cls, jpeg: bytes) -> _Header:
        """The header of ``jpeg``; ValueError unless it is a baseline JPEG with a scan."""
        if not jpeg.startswith(b"\xff\xd8"):
            raise ValueError("not a JPEG")
        offset, sof = 2, -1
        while offset + 4 <= len(jpeg) and jpeg[offset] == 0xFF:
            marker = jpeg[offset + 1]
            end = offset + 2 + struct.unpack_from(">H", jpeg, offset + 2)[0]
            if marker == SOF0:
                sof = offset
            elif marker == SOS and sof >= 0:
                return cls(jpeg[:end], sof, offset)
            offset = end
        raise ValueError("no baseline frame and scan in the JPEG")

    def shared(self) -> bytes:
        """The header without its frame height: what every band of one image shares."""
        return self.data[: self.sof + 5] + self.data[self.sof + 7 :]


def _even_luma(grey: npt.NDArray[np.uint8], red: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    """The luma plane: ``grey`` with its red pixels at red's luma, as a view into a buffer
    of even height and width whose extra row/column repeats the last one.

    TurboJPEG reads a 4:2:0 luma plane of the image size rounded up to even (its YUV
    format notes), one row and one column more than an odd-sized plane holds: without
    the buffer it read past the array, so the last row of an odd-height colour view
    depended on whatever memory followed it (and could touch an unmapped page). The
    repeated edge is what libjpeg's own 4:2:0 subsampling of the RGB image pads with.
    """
    height, width = grey.shape
    buffer = np.empty((height + height % 2, width + width % 2), np.uint8)
    luma = buffer[:height, :width]
    luma[...] = grey
    luma[np.divmod(red, width)] = RED_Y
    buffer[height:, :width] = luma[-1:]
    buffer[:, width:] = buffer[:, width - 1 : width]
    return luma


def _red_chroma(
    shape: tuple[int, ...], red: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Cb and Cr planes at half resolution: grey, except the 2x2 blocks holding red
    pixels, whose chroma is the block average as libjpeg's downsampling computes it (an
    odd last row or column is replicated, so its pixels count twice)."""
    height, width = shape
    rows, cols = np.divmod(red, width)
    weight = (1 + ((width % 2 == 1) & (cols == width - 1))) * (
        1 + ((height % 2 == 1) & (rows == height - 1))
    )
    plane_width = (width + 1) // 2
    blocks, where = np.unique((rows // 2) * plane_width + cols // 2, return_inverse=True)
    share = np.bincount(where, weights=weight) / 4.0
    planes = []
    for red_value in (RED_CB, RED_CR):
        plane = np.full(((height + 1) // 2, plane_width), NEUTRAL, np.uint8)
        plane.reshape(-1)[blocks] = np.rint(NEUTRAL + share * (red_value - NEUTRAL))
        planes.append(plane)
    return planes[0], planes[1]


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise EncodeError(f"JPEG quality must be an integer in 1..100, got {quality!r}")


def _check_image(rgb: npt.NDArray[np.uint8]) -> None:
    """EncodeError unless the array is a grey or RGB 8-bit image libjpeg can take."""
    if rgb.dtype != np.uint8:
        raise EncodeError(f"JPEG input must be uint8, got {rgb.dtype}")
    if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise EncodeError(f"JPEG input must be (h, w) or (h, w, 3), got {rgb.shape}")
    height, width = rgb.shape[:2]
    if not (0 < height <= MAX_JPEG_SIDE and 0 < width <= MAX_JPEG_SIDE):
        raise EncodeError(f"JPEG size {width} x {height} is outside 1..{MAX_JPEG_SIDE}")
