"""Rayonix / MarCCD TIFF reader (spec 5.3, with bug 16 fixed).

A MarCCD image is a TIFF whose bytes 1024..4096 hold the 3072-byte MarCCD frame header;
16-bit pixels follow at 4096. Metadata come from that header with the original's JSON
names and unit conversions, read in the header's own byte order (the original assumed
the machine's). Text fields are decoded as text up to the first NUL, never used as
format strings. Pixels are read with tifffile.
"""

from __future__ import annotations

import re
import struct
import threading
from typing import Any

import numpy as np
import tifffile

from istasks.core.readers.base import Frame, Meta, SingleImage, check_frame_size
from istasks.core.readers.detect import (
    MARCCD_HEADER_BYTES,
    MARCCD_HEADER_OFFSET,
    FileProbe,
    marccd_byteorder,
    tiff_layout,
)
from istasks.errors import DataUnavailable, UnknownFormat

SATURATION = 0xFFFF
#: Photon energy (eV) times wavelength (Angstrom).
HC_EV_ANGSTROM = 12398.4193

# (json name, offset in the header, divisor): signed 32-bit fields, converted to floats.
_SCALED_INT32 = (
    ("detector_distance", 640, 1e6),  # micrometres -> metres
    ("beam_center_x", 644, 1000.0),  # 1/1000 pixel -> pixels
    ("beam_center_y", 648, 1000.0),
    ("integrationTime", 652, 1000.0),  # ms -> s
    ("exposureTime", 656, 1000.0),
    ("readoutTime", 660, 1000.0),
    ("startPhi", 684, 1000.0),  # millidegrees -> degrees
    ("rotationRange", 736, 1000.0),
    ("x_pixel_size", 772, 1e9),  # nanometres -> metres
    ("y_pixel_size", 776, 1e9),
    ("wavelength", 908, 1e5),  # femtometres -> Angstrom
)
# (json name, offset, divisor): unsigned 32-bit statistics.
_SCALED_UINT32 = (("meanValue", 288, 1000.0), ("rmsValue", 292, 1000.0))
# (json name, offset): unsigned 32-bit fields passed as they are.
_PLAIN_UINT32 = (
    ("nSaturated", 300),
    ("x_pixels_in_detector", 80),
    ("y_pixels_in_detector", 84),
    ("image_depth", 88),
    ("saturation", 204),
    ("minValue", 280),
    ("maxValue", 284),
)
# (json name, offset, length): NUL-padded text fields.
_TEXT = (("filename", 1280, 64), ("filepath", 1152, 128), ("comment", 1440, 512))
_WAVELENGTH_OFFSET = 908

_DETECTOR_IN_COMMENT = re.compile(r"\bdetector='([^']*)'?")
_BEAMLINE_IN_COMMENT = re.compile(r"\bLS_CAT_Beamline='([^']*)'?")
_DETECTOR_BY_NSLOW = {
    3072: "Rayonix MX-225",
    1536: "Rayonix MX-225",
    768: "Rayonix MX-225",
    4096: "Rayonix MX-300",
    2048: "Rayonix MX-300",
    1024: "Rayonix MX-300",
}
DEFAULT_BEAMLINE = "21-ID"


def header_text(raw: bytes) -> str:
    """A fixed-width header string: text up to the first NUL (there may be none)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def parse_marccd_header(header: bytes, byteorder: str) -> Meta:
    """Spec 5.3 metadata from the 3072-byte MarCCD header (offsets relative to 1024)."""
    if len(header) < MARCCD_HEADER_BYTES:
        raise DataUnavailable(f"MarCCD header truncated ({len(header)} bytes)")

    def field(offset: int, code: str) -> int:
        value: int = struct.unpack_from(byteorder + code, header, offset)[0]
        return value

    meta: Meta = {}
    for name, offset, divisor in _SCALED_INT32:
        meta[name] = field(offset, "i") / divisor
    for name, offset, divisor in _SCALED_UINT32:
        meta[name] = field(offset, "I") / divisor
    for name, offset in _PLAIN_UINT32:
        meta[name] = field(offset, "I")
    for name, offset, length in _TEXT:
        meta[name] = header_text(header[offset : offset + length])
    wavelength_raw = field(_WAVELENGTH_OFFSET, "i")
    if wavelength_raw > 0:  # a zero wavelength would put infinity in the JSON
        meta["photon_energy"] = HC_EV_ANGSTROM / wavelength_raw * 1e5
    meta.update(_names_from_comment(meta["comment"], meta["y_pixels_in_detector"]))
    return meta


def _names_from_comment(comment: str, nslow: int) -> dict[str, str]:
    """``detector`` and ``beamline`` from the comment, with the original's fallbacks."""
    detector = _DETECTOR_IN_COMMENT.search(comment)
    beamline = _BEAMLINE_IN_COMMENT.search(comment)
    return {
        "detector": detector.group(1) if detector else _DETECTOR_BY_NSLOW.get(nslow, "Unknown"),
        "beamline": beamline.group(1) if beamline else DEFAULT_BEAMLINE,
    }


class RayonixReader(SingleImage):
    """One MarCCD TIFF image: ``frame_count`` 1, no mask, saturation 0xFFFF. Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        # tifffile seeks and reads one shared handle: one page read at a time.
        self._lock = threading.Lock()
        self._probe = FileProbe(path)
        try:
            self._meta = self._read_meta()
            self._tiff = _open_tiff(self._probe)
        except BaseException:
            self._probe.close()
            raise

    def _read_meta(self) -> Meta:
        layout = tiff_layout(self._probe)
        order = marccd_byteorder(self._probe, layout) if layout is not None else None
        if order is None:
            raise UnknownFormat(f"not a MarCCD TIFF (no header at 1024): {self.path!r}")
        header = self._probe.read_at(MARCCD_HEADER_OFFSET, MARCCD_HEADER_BYTES)
        meta = parse_marccd_header(header, order)
        meta.update(fn=self.path, first_frame=1, last_frame=1)
        # The TIFF tags agree with these (marccd_byteorder checked): one check covers both.
        check_frame_size(meta["y_pixels_in_detector"], meta["x_pixels_in_detector"], self.path)
        return meta

    def read_frame(self, frame: int) -> Frame:
        """The image as fresh uint16. ``frame`` is ignored as in the original (always 1)."""
        with self._lock:
            pixels = _read_uint16(self._tiff, self.path)
        expected = (self._meta["y_pixels_in_detector"], self._meta["x_pixels_in_detector"])
        if pixels.shape != expected:
            raise DataUnavailable(f"image is {pixels.shape}, header says {expected}")
        return Frame(
            pixels=pixels, mask=None, saturation=SATURATION, meta={**self._meta, "frame": 1}
        )

    def close(self) -> None:
        """Release the file."""
        self._tiff.close()
        self._probe.close()


def _open_tiff(probe: FileProbe) -> tifffile.TiffFile:
    """tifffile on the already opened descriptor; its parse errors become DataUnavailable."""
    try:
        return tifffile.TiffFile(probe.file, name=probe.name)
    except Exception as exc:  # third-party parser: any failure means unreadable content
        raise DataUnavailable(f"unreadable TIFF {probe.path!r}: {exc}") from exc


def _read_uint16(tiff: tifffile.TiffFile, path: str) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """The first page as native uint16 (bigger or signed samples are refused)."""
    try:
        data = tiff.pages[0].asarray()
    except Exception as exc:  # truncated strips, bad compression...: unreadable content
        raise DataUnavailable(f"cannot read pixels of {path!r}: {exc}") from exc
    if data.dtype.kind != "u" or data.dtype.itemsize != 2:
        raise UnknownFormat(f"MarCCD pixels are {data.dtype}, expected uint16: {path!r}")
    pixels = np.ascontiguousarray(data, dtype=np.uint16)
    return pixels if pixels.flags.writeable else pixels.copy()
