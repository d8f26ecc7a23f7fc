"""Pilatus mini-CBF reader (spec Appendix A, the 2025 fork's CBF support).

The CIF text and the MIME header of the binary section are parsed here, and the
byte-offset pixels are decoded by fabio's compression codec. fabio's own ``CbfImage``
reader is not used: it raises IndexError on any one-word mini-header line and leaks its
file on that path, whereas a header oddity here only drops the key concerned. Pixels are
int32 in the file; -1 (module gaps) and -2 (bad pixels) become masked zeros in uint32.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fabio.compression import decByteOffset

from istasks.core.readers.base import Frame, Meta, SingleImage, check_frame_size
from istasks.core.readers.detect import CBF_MAGIC, FileProbe
from istasks.core.readers.negatives import unsigned_with_mask
from istasks.errors import DataUnavailable, UnknownFormat

log = logging.getLogger(__name__)

SATURATION = 0xFFFFFFFF
IMAGE_DEPTH = 4
HC_EV_ANGSTROM = 12398.4193
#: The fork's fixed strings (LS-CAT's PILATUS3 X 6M at 21-ID).
DEFAULT_DETECTOR = "PILATUS3X 6M"
COMMENT = "LS-CAT APS Sector 21"

_BINARY_SECTION = b"--CIF-BINARY-FORMAT-SECTION--"
_STARTER = b"\x0c\x1a\x04\xd5"
#: Pilatus headers are a few kB; give up looking for the binary section after this.
_MAX_HEADER_BYTES = 1 << 20
_FIRST_READ_BYTES = 64 * 1024

_MINI_HEADER = re.compile(r"_array_data\.header_contents\s*\r?\n;(.*?)\r?\n;", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ELEMENT_TYPES = {
    "signed 32-bit integer": "int32",
    "unsigned 32-bit integer": "uint32",
    "signed 16-bit integer": "int16",
    "unsigned 16-bit integer": "uint16",
    "signed 8-bit integer": "int8",
    "unsigned 8-bit integer": "uint8",
}


@dataclass(frozen=True)
class BinarySection:
    """Where and how the pixels of a CBF are stored (its MIME header)."""

    data_offset: int
    size_bytes: int
    element_type: str
    fast: int
    slow: int


def mini_header_fields(cif_text: str) -> dict[str, str]:
    """Pilatus mini-header lines as ``{keyword: rest of line}`` (first occurrence wins).

    ``# Exposure_time 0.2 s`` gives ``{"Exposure_time": "0.2 s"}``; a trailing colon of
    the keyword (``# Detector: ...``) is dropped. Lines that are not ``#`` comments are
    ignored.
    """
    found = _MINI_HEADER.search(cif_text)
    fields: dict[str, str] = {}
    for line in (found.group(1) if found else "").splitlines():
        body = line.strip()
        if not body.startswith("#"):
            continue
        keyword, _, rest = body.lstrip("#").strip().partition(" ")
        fields.setdefault(keyword.rstrip(":"), rest.strip())
    return fields


def header_numbers(fields: dict[str, str], keyword: str, count: int) -> tuple[float, ...] | None:
    """The first ``count`` numbers of a mini-header line, or None if absent or malformed."""
    text = fields.get(keyword)
    numbers = _NUMBER.findall(text) if text is not None else []
    if len(numbers) < count:
        if text is not None:
            log.debug("ignoring malformed CBF header line %s %r", keyword, text)
        return None
    return tuple(float(n) for n in numbers[:count])


def cbf_meta(fields: dict[str, str], fast: int, slow: int) -> Meta:
    """Appendix A metadata from the mini-header; keys whose line is missing are left out.

    The beam centre defaults to the image centre: the reduction needs one.
    """
    detector = fields.get("Detector", "").split(",")[0].strip()
    meta: Meta = {
        "detector": detector or DEFAULT_DETECTOR,
        "comment": COMMENT,
        "x_pixels_in_detector": fast,
        "y_pixels_in_detector": slow,
        "image_depth": IMAGE_DEPTH,
        "beam_center_x": fast / 2,
        "beam_center_y": slow / 2,
    }
    _put(meta, ("x_pixel_size", "y_pixel_size"), header_numbers(fields, "Pixel_size", 2))
    _put(meta, ("beam_center_x", "beam_center_y"), header_numbers(fields, "Beam_xy", 2))
    _put(meta, ("detector_distance",), header_numbers(fields, "Detector_distance", 1))
    _put(meta, ("startPhi",), header_numbers(fields, "Start_angle", 1))
    rotation = header_numbers(fields, "Angle_increment", 1)
    _put(meta, ("rotationRange",), rotation or header_numbers(fields, "Omega_increment", 1))
    _put(meta, ("integrationTime",), header_numbers(fields, "Exposure_time", 1))
    wavelength = header_numbers(fields, "Wavelength", 1)
    _put(meta, ("wavelength",), wavelength)
    if wavelength is not None and wavelength[0] > 0:
        meta["photon_energy"] = HC_EV_ANGSTROM / wavelength[0]
    return meta


def _put(meta: Meta, names: tuple[str, ...], values: tuple[float, ...] | None) -> None:
    if values is not None:
        meta.update(zip(names, values, strict=True))


def parse_binary_header(mime: str, data_offset: int) -> BinarySection:
    """The binary section's MIME header; only byte-offset compression is supported."""
    conversions = re.search(r'conversions\s*=\s*"([^"]*)"', mime)
    if conversions is None or conversions.group(1) != "x-CBF_BYTE_OFFSET":
        found = conversions.group(1) if conversions else "none"
        raise UnknownFormat(f"CBF compression {found!r} is not supported")
    element = _mime_value(mime, "X-Binary-Element-Type").strip('"')
    if element not in _ELEMENT_TYPES:
        raise UnknownFormat(f"CBF element type {element!r} is not supported")
    return BinarySection(
        data_offset=data_offset,
        size_bytes=_mime_int(mime, "X-Binary-Size"),
        element_type=_ELEMENT_TYPES[element],
        fast=_mime_int(mime, "X-Binary-Size-Fastest-Dimension"),
        slow=_mime_int(mime, "X-Binary-Size-Second-Dimension"),
    )


def _mime_value(mime: str, key: str) -> str:
    found = re.search(rf"^\s*{re.escape(key)}\s*:\s*(.*?)\s*$", mime, re.MULTILINE)
    if found is None:
        raise DataUnavailable(f"CBF binary header lacks {key}")
    return found.group(1)


def _mime_int(mime: str, key: str) -> int:
    text = _mime_value(mime, key)
    if not text.isdigit() or int(text) == 0:
        raise DataUnavailable(f"CBF binary header has a bad {key}: {text!r}")
    return int(text)


class CbfReader(SingleImage):
    """One Pilatus CBF image: ``frame_count`` 1, negatives masked, saturation 0xFFFFFFFF.

    Thread-safe: reads use ``pread`` and decoding shares no state.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._probe = FileProbe(path)
        try:
            cif_text, self._section = self._read_header()
        except BaseException:
            self._probe.close()
            raise
        meta = cbf_meta(mini_header_fields(cif_text), self._section.fast, self._section.slow)
        self._meta: Meta = {**meta, "fn": path, "first_frame": 1, "last_frame": 1}

    def _read_header(self) -> tuple[str, BinarySection]:
        """CIF text before the binary section, and the section's layout."""
        head = self._probe.read_at(0, _FIRST_READ_BYTES)
        if not head.startswith(CBF_MAGIC):
            raise UnknownFormat(f"not a CBF file (no ###CBF magic): {self.path!r}")
        if _STARTER not in head and len(head) == _FIRST_READ_BYTES:
            head = self._probe.read_at(0, _MAX_HEADER_BYTES)
        section_at = head.find(_BINARY_SECTION)
        starter_at = head.find(_STARTER, max(section_at, 0))
        if section_at < 0 or starter_at < 0:
            raise DataUnavailable(f"CBF without a readable binary section: {self.path!r}")
        mime = head[section_at:starter_at].decode("latin-1")
        section = parse_binary_header(mime, starter_at + len(_STARTER))
        return head[:section_at].decode("utf-8", errors="replace"), section

    def read_frame(self, frame: int) -> Frame:
        """The image as fresh uint32 with its gap/bad-pixel mask. ``frame`` is ignored."""
        values = self._decode()
        pixels, mask = unsigned_with_mask(values, IMAGE_DEPTH)
        return Frame(
            pixels=pixels, mask=mask, saturation=SATURATION, meta={**self._meta, "frame": 1}
        )

    def _decode(self) -> npt.NDArray[np.integer[Any]]:
        section = self._section
        available = self._probe.size_bytes - section.data_offset
        if section.size_bytes > available:
            raise DataUnavailable(f"CBF truncated: {available} of {section.size_bytes} bytes")
        count = section.fast * section.slow
        if count > section.size_bytes:
            # Byte-offset needs at least one byte per pixel: the dimensions are corrupt,
            # and trusting them would allocate an arbitrarily large array.
            raise DataUnavailable(f"CBF dimensions {section.fast}x{section.slow} exceed its data")
        # A (sparse) file as large as its header claims still must not be read whole.
        check_frame_size(section.slow, section.fast, self.path)
        raw = self._probe.read_at(section.data_offset, section.size_bytes)
        try:
            # "int32" selects fabio's 32-bit decoder; any other type decodes to int64.
            values = np.asarray(decByteOffset(raw, size=count, dtype=section.element_type))
        except Exception as exc:  # third-party codec: corrupt stream means unreadable data
            raise DataUnavailable(f"CBF pixels undecodable in {self.path!r}: {exc}") from exc
        if values.size != count:
            raise DataUnavailable(f"CBF holds {values.size} pixels, header says {count}")
        return values.reshape(section.slow, section.fast)

    def close(self) -> None:
        """Release the file."""
        self._probe.close()
