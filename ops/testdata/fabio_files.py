"""Image files of other facilities' formats, written by fabio's own writers.

SMV as ADSC writes it (``fabio.adscimage``), MAR345 (pck-compressed, with its overflow
records), Bruker v100 and EDF. Each writer states a known geometry in the header's own
names and units, so a test can check the reader's conversion to our names and units
(:data:`GEOMETRY`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ops.testdata.pattern import diffraction_pattern

#: What every header written here says, in our units (A, m, pixels, s, degrees).
GEOMETRY = {
    "wavelength": 0.97918,
    "detector_distance": 0.25,
    "pixel_size": 1e-4,
    "beam_center_x": 1030.5,  # fast axis, pixels
    "beam_center_y": 1010.25,  # slow axis, pixels
    "count_time": 0.5,
    "startPhi": 30.0,
    "rotationRange": 0.5,
}
#: The saturation an SMV header declares (ADSC Quantum CCDs: 65535; lower here to test it).
SMV_SATURATION = 60000


def pattern(shape: tuple[int, int], seed: int = 0, top: int = 0xFFFF) -> npt.NDArray[np.int64]:
    """A seeded diffraction-like frame clipped to ``top``."""
    counts = diffraction_pattern(shape, np.random.default_rng(seed))
    return np.minimum(counts, top)


def write_smv(path: Path, pixels: npt.NDArray[Any]) -> Path:
    """An ADSC SMV ``.img`` (uint16) with ADSC's header keys (mm, A, s, deg)."""
    from fabio.adscimage import AdscImage

    g = GEOMETRY
    pixel_mm = g["pixel_size"] * 1e3
    header = {
        "DETECTOR_SN": "928",
        "DIM": "2",
        "BYTE_ORDER": "little_endian",
        "TYPE": "unsigned_short",
        "PIXEL_SIZE": f"{pixel_mm:.6f}",
        "DISTANCE": f"{g['detector_distance'] * 1e3:.3f}",
        "WAVELENGTH": f"{g['wavelength']:.5f}",
        # ADSC: BEAM_CENTER_X runs along the slow axis, BEAM_CENTER_Y along the fast one.
        "BEAM_CENTER_X": f"{g['beam_center_y'] * pixel_mm:.6f}",
        "BEAM_CENTER_Y": f"{g['beam_center_x'] * pixel_mm:.6f}",
        "TIME": f"{g['count_time']:.3f}",
        "OSC_START": f"{g['startPhi']:.3f}",
        "OSC_RANGE": f"{g['rotationRange']:.3f}",
        "PHI": f"{g['startPhi']:.3f}",
        "SATURATED_VALUE": str(SMV_SATURATION),
    }
    AdscImage(data=np.ascontiguousarray(pixels, dtype=np.uint16), header=header).write(str(path))
    return path


def write_mar345(path: Path, pixels: npt.NDArray[Any]) -> Path:
    """A MAR345 image (pck-compressed; values over 65535 go to fabio's overflow records)."""
    from fabio.mar345image import Mar345Image

    g = GEOMETRY
    header = {
        "PIXEL_LENGTH": str(round(g["pixel_size"] * 1e6)),
        "PIXEL_HEIGHT": str(round(g["pixel_size"] * 1e6)),
        "WAVELENGTH": str(g["wavelength"]),
        "DISTANCE": str(g["detector_distance"] * 1e3),
        "CENTER_X": str(g["beam_center_x"]),
        "CENTER_Y": str(g["beam_center_y"]),
        "TIME": str(g["count_time"]),
        "PHI_START": str(g["startPhi"]),
        "PHI_END": str(g["startPhi"] + g["rotationRange"]),
    }
    image = Mar345Image(data=np.ascontiguousarray(pixels, dtype=np.int32), header=header)
    image.byteorder = "<"  # fabio 2026.6 leaves "|" there and fails to write without it
    image.write(str(path))
    return path


def write_bruker100(path: Path, pixels: npt.NDArray[Any]) -> Path:
    """A Bruker v100 frame (fabio encodes the overflow tables itself)."""
    from fabio.bruker100image import Bruker100Image

    g = GEOMETRY
    per_cm = 0.01 / g["pixel_size"] * 512 / max(pixels.shape)  # stated for 512 x 512
    header = {
        "WAVELEN": f"{g['wavelength']} {g['wavelength']} {g['wavelength']}",
        "DISTANC": f"{g['detector_distance'] * 100} {g['detector_distance'] * 100}",
        "CENTER": f"{g['beam_center_x']} {g['beam_center_y']} 0 0",
        "DETTYPE": f"CCD-PXL-KAF2 PIXPERCM {per_cm:.4f} CMTOGRID 0.800",
        "CUMULAT": f"{g['count_time']}",
        "START": f"{g['startPhi']}",
        "INCREME": f"{g['rotationRange']}",
    }
    Bruker100Image(data=np.ascontiguousarray(pixels, dtype=np.int32), header=header).write(
        str(path)
    )
    return path


def write_edf(path: Path, frames: list[npt.NDArray[Any]]) -> Path:
    """An EDF file holding ``frames`` (one or more images of the same type)."""
    from fabio.edfimage import EdfImage

    image = EdfImage(data=frames[0], header={"ExposureTime": "0.5"})
    for extra in frames[1:]:
        image.append_frame(data=extra)
    image.write(str(path))
    return path


def write_raxis(path: Path, pixels: npt.NDArray[Any], ratio: float = 8.0) -> Path:
    """An R-AXIS image, written here (fabio has no R-AXIS writer) in the layout fabio's
    ``raxisimage`` reads: the big-endian header of ``RIGAKU_KEYS`` padded to 2048 bytes,
    then uint16 pixels in which a set top bit means ``(value & 0x7FFF) * ratio`` (the
    "Photomultiplier Ratio"). Counts above 32767 must be multiples of ``ratio``.
    """
    import struct

    from fabio.raxisimage import RIGAKU_KEYS

    g = GEOMETRY
    rows, cols = pixels.shape
    values: dict[str, Any] = {
        "InstrumentType": b"R-AXIS4",
        "Wavelength": g["wavelength"],
        "Crystal-to-detector Distance": g["detector_distance"] * 1e3,
        "Phi Oscillation Start": g["startPhi"],
        "Phi Oscillation Stop": g["startPhi"] + g["rotationRange"],
        "Exposure Time": g["count_time"] / 60.0,
        "Direct beam X position": g["beam_center_x"],
        "Direct beam Y position": g["beam_center_y"],
        "X Pixels": cols,
        "Y Pixels": rows,
        "X Pixel Length": g["pixel_size"] * 1e3,
        "Y Pixel Length": g["pixel_size"] * 1e3,
        "Photomultiplier Ratio": ratio,
    }
    header = bytearray()
    for key, kind in RIGAKU_KEYS.items():
        if kind == "float":
            header += struct.pack(">f", float(values.get(key, 0.0)))
        elif kind == "long":
            header += struct.pack(">l", int(values.get(key, 0)))
        elif isinstance(kind, int) and kind > 0:
            header += bytes(values.get(key, b"")).ljust(kind, b"\0")[:kind]
        else:
            break
    counts = np.asarray(pixels, dtype=np.int64)
    high = counts > 0x7FFF
    encoded = np.where(high, (counts // int(ratio)) | 0x8000, counts).astype(">u2")
    path.write_bytes(bytes(header).ljust(2048, b"\0") + encoded.tobytes())
    return path
