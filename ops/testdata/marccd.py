"""Write MarCCD / Rayonix TIFF files laid out as the instrument writes them.

Byte 0: a TIFF header and one IFD (13 entries, as in real MarCCD files, StripOffsets =
4096 and private tag 34710 pointing at the frame header); byte 1024: the 3072-byte
MarCCD ``frame_header``; byte 4096: the uint16 pixels in one strip. Built with
``struct`` so every offset is the instrument's; tifffile and the reader read it back.
Field names below are the C struct's (marccd ``frame_header``), offsets relative to
byte 1024, values raw as stored (micrometres, milli-degrees, femtometres...).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ops.testdata.pattern import diffraction_pattern

HEADER_OFFSET = 1024
HEADER_BYTES = 3072
DATA_OFFSET = 4096
SATURATED = 0xFFFF
#: marccd's byte-order flags (header_byte_order / data_byte_order).
LITTLE_ENDIAN_FLAG, BIG_ENDIAN_FLAG = 1234, 4321
MARCCD_TAG = 34710

# name -> (offset, struct code); "Ns" codes are NUL-padded text of N bytes.
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "header_type": (0, "I"),
    "header_name": (4, "16s"),
    "header_major_version": (20, "I"),
    "header_minor_version": (24, "I"),
    "header_byte_order": (28, "I"),
    "data_byte_order": (32, "I"),
    "header_size": (36, "I"),
    "nheaders": (76, "I"),
    "nfast": (80, "I"),
    "nslow": (84, "I"),
    "depth": (88, "I"),
    "record_length": (92, "I"),
    "signif_bits": (96, "I"),
    "saturated_value": (104, "I"),
    "nimages": (112, "I"),
    "saturation_level": (204, "I"),
    "min": (280, "I"),
    "max": (284, "I"),
    "mean": (288, "I"),
    "rms": (292, "I"),
    "n_zeros": (296, "I"),
    "n_saturated": (300, "I"),
    "stats_uptodate": (304, "I"),
    "xtal_to_detector": (640, "i"),
    "beam_x": (644, "i"),
    "beam_y": (648, "i"),
    "integration_time": (652, "i"),
    "exposure_time": (656, "i"),
    "readout_time": (660, "i"),
    "nreads": (664, "i"),
    "start_phi": (684, "i"),
    "end_phi": (716, "i"),
    "rotation_axis": (732, "i"),
    "rotation_range": (736, "i"),
    "detector_type": (768, "i"),
    "pixelsize_x": (772, "i"),
    "pixelsize_y": (776, "i"),
    "mean_bias": (780, "i"),
    "source_type": (896, "i"),
    "source_wavelength": (908, "i"),
    "filetitle": (1024, "128s"),
    "filepath": (1152, "128s"),
    "filename": (1280, "64s"),
    "acquire_timestamp": (1344, "32s"),
    "header_timestamp": (1376, "32s"),
    "save_timestamp": (1408, "32s"),
    "file_comment": (1440, "512s"),
    "dataset_comment": (2048, "512s"),
}

_SHORT, _LONG, _RATIONAL = 3, 4, 5


def marccd_header_values(size: int, comment: str) -> dict[str, int | str]:
    """Realistic raw header values of an LS-CAT MX-300 frame binned to ``size`` pixels.

    The statistics fields (min, max, mean, rms, n_saturated...) are filled from the
    pixels by :func:`write_marccd`.
    """
    pixel_nm = round(300e6 / size)  # the MX-300 is 300 mm wide whatever the binning
    return {
        "header_type": 2,
        "header_name": "MMX",
        "header_major_version": 1,
        "header_minor_version": 0,
        "header_size": HEADER_BYTES,
        "nheaders": 1,
        "nfast": size,
        "nslow": size,
        "depth": 2,
        "record_length": size,
        "signif_bits": 16,
        "saturated_value": SATURATED,
        "nimages": 1,
        "saturation_level": SATURATED,
        "xtal_to_detector": 250_000,  # 250 mm in micrometres
        "beam_x": round((size / 2 + 3.25) * 1000),  # 1/1000 pixel
        "beam_y": round((size / 2 - 1.5) * 1000),
        "integration_time": 1000,  # ms
        "exposure_time": 1000,
        "readout_time": 120,
        "nreads": 2,
        "start_phi": 45_000,  # milli-degrees
        "end_phi": 45_500,
        "rotation_axis": 4,  # phi
        "rotation_range": 500,
        "detector_type": 6,
        "pixelsize_x": pixel_nm,  # nanometres
        "pixelsize_y": pixel_nm,
        "mean_bias": 10_000,  # 1000 * ADU
        "source_type": 1,
        "source_wavelength": 97_872,  # femtometres: 0.97872 Angstrom
        "filepath": "/pf/esaf12345/lysozyme",
        "filename": "lyso_1_00001.mccd",
        "acquire_timestamp": "111412302025.07",
        "header_timestamp": "111412302025.09",
        "save_timestamp": "111412302025.11",
        "file_comment": comment,
        "dataset_comment": "lysozyme test collection",
    }


def marccd_pixels(size: int, seed: int = 0) -> npt.NDArray[np.uint16]:
    """The seeded uint16 image :func:`write_marccd` stores (spots, a few saturated)."""
    rng = np.random.default_rng(seed)
    counts = diffraction_pattern((size, size), rng, background=12.0, spot_peak=9000.0)
    flat = counts.reshape(-1)
    flat[rng.choice(flat.size, 5, replace=False)] = SATURATED
    return np.minimum(counts, SATURATED).astype(np.uint16)


def write_marccd(
    path: Path,
    *,
    size: int = 1024,
    byteorder: str = "<",
    seed: int = 0,
    comment: str = "detector='Rayonix MX-300' LS_CAT_Beamline='21-ID-D'",
    header_byteorder: str | None = None,
    **header_overrides: int | str,
) -> Path:
    """Write a ``size`` x ``size`` MarCCD TIFF to ``path`` and return ``path``.

    ``byteorder`` ("<" or ">") applies to the TIFF structure and pixels, and to the
    frame header unless ``header_byteorder`` says otherwise (to test swapped headers).
    ``header_overrides`` set raw header fields by their C names (see HEADER_FIELDS).
    """
    header_order = header_byteorder or byteorder
    pixels = marccd_pixels(size, seed)
    values = {**marccd_header_values(size, comment), **_statistics(pixels)}
    values["header_byte_order"] = _order_flag(header_order)
    values["data_byte_order"] = _order_flag(byteorder)
    unknown = set(header_overrides) - set(HEADER_FIELDS)
    if unknown:
        raise ValueError(f"unknown MarCCD header fields: {sorted(unknown)}")
    values.update(header_overrides)
    pixel_nm = int(values["pixelsize_x"])
    content = b"".join(
        (
            _tiff_header(size, byteorder, pixel_nm),
            frame_header(values, header_order),
            pixels.astype(byteorder + "u2").tobytes(),
        )
    )
    path.write_bytes(content)
    return path


def frame_header(values: dict[str, int | str], byteorder: str) -> bytes:
    """The 3072-byte MarCCD frame header holding ``values`` (zero elsewhere)."""
    header = bytearray(HEADER_BYTES)
    for name, value in values.items():
        offset, code = HEADER_FIELDS[name]
        raw: Any = value.encode() if isinstance(value, str) else value
        struct.pack_into(byteorder + code, header, offset, raw)
    return bytes(header)


def _statistics(pixels: npt.NDArray[np.uint16]) -> dict[str, int | str]:
    """The header's statistics block as marccd fills it (mean and rms times 1000)."""
    return {
        "min": int(pixels.min()),
        "max": int(pixels.max()),
        "mean": round(float(pixels.mean()) * 1000),
        "rms": round(float(pixels.std()) * 1000),
        "n_zeros": int(np.count_nonzero(pixels == 0)),
        "n_saturated": int(np.count_nonzero(pixels == SATURATED)),
        "stats_uptodate": 1,
    }


def _order_flag(byteorder: str) -> int:
    return LITTLE_ENDIAN_FLAG if byteorder == "<" else BIG_ENDIAN_FLAG


def _tiff_header(size: int, order: str, pixel_nm: int) -> bytes:
    """TIFF header + first IFD + resolution rationals, padded to the 1024 bytes."""
    n_entries = 13
    rationals_at = 8 + 2 + 12 * n_entries + 4  # right after the IFD, as marccd does
    entries = [
        (256, _LONG, size),  # ImageWidth
        (257, _LONG, size),  # ImageLength
        (258, _SHORT, 16),  # BitsPerSample
        (259, _SHORT, 1),  # Compression: none
        (262, _SHORT, 1),  # PhotometricInterpretation: min-is-black
        (273, _LONG, DATA_OFFSET),  # StripOffsets
        (274, _SHORT, 1),  # Orientation
        (278, _LONG, size),  # RowsPerStrip: one strip
        (279, _LONG, size * size * 2),  # StripByteCounts
        (282, _RATIONAL, rationals_at),  # XResolution (pixels per cm)
        (283, _RATIONAL, rationals_at + 8),  # YResolution
        (296, _SHORT, 3),  # ResolutionUnit: cm
        (MARCCD_TAG, _LONG, HEADER_OFFSET),  # where the MarCCD header is
    ]
    out = bytearray(b"II*\0" if order == "<" else b"MM\0*")
    out += struct.pack(order + "IH", 8, n_entries)
    for tag, kind, value in entries:
        # SHORT values sit left-justified in the 4-byte value field, in either order.
        field = (
            struct.pack(order + "HH", value, 0)
            if kind == _SHORT
            else struct.pack(order + "I", value)
        )
        out += struct.pack(order + "HHI", tag, kind, 1) + field
    out += struct.pack(order + "I", 0)  # no next IFD
    out += struct.pack(order + "IIII", 10_000_000, pixel_nm, 10_000_000, pixel_nm)
    return bytes(out.ljust(HEADER_OFFSET, b"\0"))
