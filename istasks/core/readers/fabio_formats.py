"""Every other image format fabio reads (ADSC/Rigaku SMV, MAR345, Bruker, R-AXIS, EDF, ...).

Detection is by content only, with fabio's own magic-number table (``MAGIC_NUMBERS``) and
never by extension: formats fabio recognises only from a file name (MRC, SPE, raw
binary...) are not served. Formats with a reader of their own (TIFF/MarCCD, CBF, HDF5)
are matched before this module is consulted, and JPEG/JPEG 2000 are refused (pictures,
not detector frames).

Pixels reach the core as uint16 (8/16-bit samples) or uint32 (wider integers, floats):
negative values (the writers' gap/bad-pixel flags), NaN and -inf become masked zeros;
floats are rounded; values above the unsigned range (+inf too), and values at or above
a saturation the header declares (SMV ``SATURATED_VALUE``), become the saturation
marker 0xFFFF / 0xFFFFFFFF.

Metadata use the Eiger/MarCCD JSON names and units: ``wavelength`` in Angstrom,
``detector_distance``, ``x_pixel_size`` and ``y_pixel_size`` in metres, ``beam_center_x``
(fast axis) and ``beam_center_y`` (slow axis) in pixels, ``count_time`` in seconds,
``startPhi`` / ``rotationRange`` in degrees. Per format (fabio header names):

- SMV (ADSC, Rigaku; fabio ``dtrek``): ``WAVELENGTH`` (A), ``DISTANCE`` (mm),
  ``PIXEL_SIZE`` (mm), ``BEAM_CENTER_X`` / ``BEAM_CENTER_Y`` (mm; as in dxtbx's
  FormatSMVADSC, ``BEAM_CENTER_Y`` lies along the fast axis and ``BEAM_CENTER_X`` along
  the slow one), ``TIME`` (s), ``OSC_START`` / ``OSC_RANGE`` (deg), ``SATURATED_VALUE``.
- MAR345: ``WAVELENGTH`` (A), ``DISTANCE`` (mm), ``PIXEL_LENGTH`` / ``PIXEL_HEIGHT``
  (um), ``CENTER_X`` / ``CENTER_Y`` (pixels), ``TIME`` (s), ``PHI_START`` / ``PHI_END``
  (else the binary header's ``StartPhi`` / ``EndPhi``).
- Bruker (``bruker``, ``bruker100``): ``WAVELEN`` (first value, A), ``DISTANC`` (first
  value, cm), ``PIXPERCM`` of the ``DETTYPE`` line (pixels per cm at 512 x 512,
  scaled to the frame size),
  ``CENTER`` (pixels), ``CUMULAT`` (s), ``START`` / ``INCREME`` (deg).
- R-AXIS: ``Wavelength`` (A), ``Crystal-to-detector Distance`` (mm), ``X/Y Pixel
  Length`` (mm), ``Direct beam X/Y position`` (pixels), ``Exposure Time`` (minutes),
  ``Phi Oscillation Start`` / ``Stop``.
- Anything else (EDF, OXD, Esperanto, GE, ...): size and depth only.

A key whose header line is missing or not a number is left out; the beam centre
defaults to the image centre because the reduction needs one.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core.readers.base import Frame, Meta, PixelMask, check_frame_size
from istasks.core.readers.detect import FABIO_MAGIC_BYTES, FileProbe, fabio_format
from istasks.core.readers.negatives import unsigned_with_mask
from istasks.errors import DataUnavailable, FrameNotFound, UnknownFormat

log = logging.getLogger(__name__)

#: fabio reports SMV as d*TREK (same ``{\nHEADER_BYTES=`` start); that class reads both.
_CLASS_BY_FORMAT = {"dtrek": "DtrekImage"}
_TOP = {2: 0xFFFF, 4: 0xFFFFFFFF}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: Header (rows, columns) keys of the formats whose reader allocates what they say.
_SIZE_KEYS = (
    ("SIZE2", "SIZE1"),
    ("Dim_2", "Dim_1"),
    ("NROWS", "NCOLS"),
    ("NY", "NX"),
    ("Y Pixels", "X Pixels"),
)
#: Bruker PIXPERCM is given for a 512 x 512 frame.
_BRUKER_NOMINAL_SIZE = 512
HC_EV_ANGSTROM = 12398.4193


def _numbers(header: Mapping[str, Any], key: str) -> list[float]:
    """The finite numbers of header line ``key`` (empty when absent or not numeric)."""
    value = header.get(key)
    if value is None:
        return []
    if isinstance(value, int | float | np.number):
        found = [float(value)]
    else:
        found = [float(n) for n in _NUMBER.findall(str(value))]
    return [n for n in found if math.isfinite(n)]


def _first(header: Mapping[str, Any], key: str, scale: float = 1.0) -> float | None:
    found = _numbers(header, key)
    return found[0] * scale if found else None


def _smv_meta(header: Mapping[str, Any], shape: tuple[int, int]) -> Meta:
    pixel_mm = _first(header, "PIXEL_SIZE")
    meta: Meta = {
        "wavelength": _first(header, "WAVELENGTH"),
        "detector_distance": _first(header, "DISTANCE", 1e-3),
        "count_time": _first(header, "TIME"),
        "startPhi": _first(header, "OSC_START"),
        "rotationRange": _first(header, "OSC_RANGE"),
    }
    if pixel_mm is not None and pixel_mm > 0:
        meta["x_pixel_size"] = meta["y_pixel_size"] = pixel_mm * 1e-3
        beam_fast, beam_slow = _first(header, "BEAM_CENTER_Y"), _first(header, "BEAM_CENTER_X")
        meta["beam_center_x"] = None if beam_fast is None else beam_fast / pixel_mm
        meta["beam_center_y"] = None if beam_slow is None else beam_slow / pixel_mm
    return meta


def _either(header: Mapping[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` present with a number."""
    for key in keys:
        if (value := _first(header, key)) is not None:
            return value
    return None


def _mar345_meta(header: Mapping[str, Any], shape: tuple[int, int]) -> Meta:
    start = _either(header, "PHI_START", "StartPhi")
    end = _either(header, "PHI_END", "EndPhi")
    return {
        "wavelength": _first(header, "WAVELENGTH"),
        "detector_distance": _first(header, "DISTANCE", 1e-3),
        "x_pixel_size": _first(header, "PIXEL_LENGTH", 1e-6),
        "y_pixel_size": _first(header, "PIXEL_HEIGHT", 1e-6),
        "beam_center_x": _first(header, "CENTER_X"),
        "beam_center_y": _first(header, "CENTER_Y"),
        "count_time": _first(header, "TIME"),
        "startPhi": start,
        "rotationRange": None if start is None or end is None else end - start,
    }


def _dettype_value(header: Mapping[str, Any], name: str) -> float | None:
    """A ``NAME value`` pair of Bruker's DETTYPE line (``CCD-PXL PIXPERCM 56.02 ...``)."""
    words = str(header.get("DETTYPE", "")).split()
    for word, value in itertools.pairwise(words):
        if word == name and _NUMBER.fullmatch(value):
            return float(value)
    return None


def _bruker_meta(header: Mapping[str, Any], shape: tuple[int, int]) -> Meta:
    per_cm = _dettype_value(header, "PIXPERCM")
    pixel = None
    if per_cm is not None and per_cm > 0:
        pixel = 0.01 / per_cm * _BRUKER_NOMINAL_SIZE / max(shape)
    center = _numbers(header, "CENTER")
    return {
        "wavelength": _first(header, "WAVELEN"),
        "detector_distance": _first(header, "DISTANC", 1e-2),
        "x_pixel_size": pixel,
        "y_pixel_size": pixel,
        "beam_center_x": center[0] if len(center) >= 2 else None,
        "beam_center_y": center[1] if len(center) >= 2 else None,
        "count_time": _first(header, "CUMULAT"),
        "startPhi": _first(header, "START"),
        "rotationRange": _first(header, "INCREME"),
    }


def _raxis_meta(header: Mapping[str, Any], shape: tuple[int, int]) -> Meta:
    start = _first(header, "Phi Oscillation Start")
    stop = _first(header, "Phi Oscillation Stop")
    return {
        "wavelength": _first(header, "Wavelength"),
        "detector_distance": _first(header, "Crystal-to-detector Distance", 1e-3),
        "x_pixel_size": _first(header, "X Pixel Length", 1e-3),
        "y_pixel_size": _first(header, "Y Pixel Length", 1e-3),
        "beam_center_x": _first(header, "Direct beam X position"),
        "beam_center_y": _first(header, "Direct beam Y position"),
        "count_time": _first(header, "Exposure Time", 60.0),
        "startPhi": start,
        "rotationRange": None if start is None or stop is None else stop - start,
    }


#: fabio format name -> header to meta mapping (the module docstring lists the keys).
_META_BY_FORMAT: dict[str, Callable[[Mapping[str, Any], tuple[int, int]], Meta]] = {
    "dtrek": _smv_meta,
    "adsc": _smv_meta,
    "mar345": _mar345_meta,
    "bruker": _bruker_meta,
    "bruker100": _bruker_meta,
    "raxis": _raxis_meta,
}
#: ``detector`` of the meta: the format's usual name (fabio's name for the others).
_DETECTOR_NAMES = {
    "dtrek": "SMV",
    "adsc": "SMV",
    "mar345": "MAR345",
    "bruker": "Bruker",
    "bruker100": "Bruker v100",
    "raxis": "R-AXIS",
    "edf": "EDF",
}
#: Header keys declaring the saturation (overload) level, per format.
_SATURATION_KEYS = {"dtrek": "SATURATED_VALUE", "adsc": "SATURATED_VALUE"}


def format_meta(name: str, header: Mapping[str, Any], shape: tuple[int, int]) -> Meta:
    """The Eiger/MarCCD-named metadata of a fabio header (missing keys left out)."""
    convert = _META_BY_FORMAT.get(name)
    found = convert(header, shape) if convert is not None else {}
    meta = {key: value for key, value in found.items() if value is not None}
    wavelength = meta.get("wavelength")
    if isinstance(wavelength, float) and wavelength > 0:
        meta["photon_energy"] = HC_EV_ANGSTROM / wavelength
    return meta


def image_depth(dtype: np.dtype[Any]) -> int:
    """Bytes per output pixel: 2 for 8/16-bit integers, 4 for wider integers and floats."""
    if dtype.kind == "b" or (dtype.kind in "ui" and dtype.itemsize <= 2):
        return 2
    if dtype.kind in "uif":
        return 4
    raise UnknownFormat(f"pixels of type {dtype} are not supported")


def to_unsigned(
    values: npt.NDArray[Any], depth: int, saturation: float | None
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], PixelMask | None]:
    """Fresh uint16/uint32 pixels and the mask of flagged (negative, NaN) pixels.

    ``saturation``, when the header declares one, marks every pixel at or above it as
    saturated (set to the type's top, our marker). ``values`` may be modified.
    """
    top = _TOP[depth]
    if values.dtype.kind == "f":
        pixels, mask = _float_to_unsigned(values, top)
    else:
        if values.dtype.kind == "b":
            values = values.astype(np.uint16)
        elif not values.flags.writeable:
            values = values.copy()
        pixels, mask = unsigned_with_mask(values, depth)
    if saturation is not None and 0 < saturation < top:
        pixels[pixels >= saturation] = top
    return pixels, mask


def _float_to_unsigned(
    values: npt.NDArray[np.floating[Any]], top: int
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], PixelMask | None]:
    """Rounded floats as uint32: negatives, NaN and -inf masked (0), values from ``top``
    on (+inf included) saturated. In place where possible: few passes over 16M pixels."""
    bad = ~(values >= 0)  # NaN compares False: one pass finds negatives and NaN
    big = values >= top
    if not values.flags.writeable:
        values = values.copy()
    np.rint(values, out=values)
    values[bad | big] = 0
    pixels = values.astype(np.uint32)
    pixels[big] = top
    return pixels, PixelMask(bad) if bad.any() else None


class FabioReader:
    """An image file read by fabio (FrameReader); multi-frame files (EDF, GE...) too.

    The file is decoded once at open (fabio reads header and pixels together); the first
    ``read_frame`` hands those pixels out and later ones decode again, so a cached
    single-image reader holds no frame (a multi-frame file keeps fabio's object for
    ``getframe``, with what fabio caches). fabio objects are not thread-safe: reads take
    a lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        with FileProbe(path) as probe:  # regular file, readable (no FIFO reaches fabio)
            self.format = fabio_format(probe.read_at(0, FABIO_MAGIC_BYTES)) or ""
        if not self.format:
            raise UnknownFormat(f"no supported detector format in {path!r}")
        self._image = self._open()
        try:
            data = self._image.data  # EDF decodes here, on first access
        except MemoryError as exc:
            raise DataUnavailable(f"{path}: {self.format} data too large to read") from exc
        except Exception as exc:  # third-party decoder: corrupt or truncated data
            raise DataUnavailable(f"{path}: {self.format} pixels unreadable ({exc})") from exc
        if data is None or data.ndim != 2:
            shape = None if data is None else data.shape
            raise DataUnavailable(f"{path}: {self.format} image of shape {shape} is not 2-D")
        check_frame_size(data.shape[0], data.shape[1], path)
        self._pending: npt.NDArray[Any] | None = data
        self._frames = max(int(getattr(self._image, "nframes", 1) or 1), 1)
        header = dict(self._image.header)
        self._depth = image_depth(data.dtype)
        key = _SATURATION_KEYS.get(self.format)
        self._saturation = _first(header, key) if key else None
        rows, cols = data.shape
        self._meta: Meta = {
            "detector": _DETECTOR_NAMES.get(self.format, self.format),
            "x_pixels_in_detector": cols,
            "y_pixels_in_detector": rows,
            "image_depth": self._depth,
            "beam_center_x": cols / 2,
            "beam_center_y": rows / 2,
            **format_meta(self.format, header, (rows, cols)),
            "fn": path,
            "first_frame": 1,
            "last_frame": self._frames,
        }
        if self._frames == 1:
            self._image = None  # it holds the pixels too; frame 1 is decoded afresh

    def _open(self) -> Any:
        """fabio's reader class for the detected format, with the first frame read."""
        from fabio import fabioformats

        class_name = _CLASS_BY_FORMAT.get(self.format, self.format + "image")
        try:
            header_only = fabioformats.factory(class_name)
            header_only.readheader(self.path)
            self._check_declared_size(header_only)
            image = fabioformats.factory(class_name)
            return image.read(self.path)
        except DataUnavailable:
            raise
        except MemoryError as exc:  # a header claiming gigabytes fabio tried to allocate
            raise DataUnavailable(f"{self.path}: {self.format} data too large to read") from exc
        except Exception as exc:  # third-party parser: any failure is unreadable content
            # Only a magic number matched (some are two bytes: "No", "OD", "{"): a file
            # fabio cannot parse is not that format as far as anyone can tell.
            raise UnknownFormat(
                f"no supported detector format in {self.path!r} (starts like fabio's "
                f"{self.format!r}, which cannot read it: {exc})"
            ) from exc

    def _check_declared_size(self, image: Any) -> None:
        """DataUnavailable when the header declares a frame over MAX_FRAME_PIXELS.

        Checked on the header alone, before fabio allocates what the header claims (EDF
        reads its declared size in one go; MAR345 and Bruker allocate rows x columns).
        """
        header = image.header
        shapes = [getattr(image, "shape", None)]
        shapes += [(_first(header, rows), _first(header, cols)) for rows, cols in _SIZE_KEYS]
        for shape in shapes:
            if shape and len(shape) == 2 and None not in shape:
                check_frame_size(int(shape[0]), int(shape[1]), self.path)

    @property
    def frame_count(self) -> int:
        """Frames in the file (fabio's ``nframes``; 1 for most formats)."""
        return self._frames

    def meta(self) -> Meta:
        """A copy of the metadata read at open."""
        return dict(self._meta)

    def read_frame(self, frame: int) -> Frame:
        """Frame ``frame`` (1-based) as fresh uint16/uint32 with its flag mask."""
        if not 1 <= frame <= self._frames:
            raise FrameNotFound(f"{self.path}: frame {frame} outside 1..{self._frames}")
        values = self._values(frame)
        pixels, mask = to_unsigned(values, self._depth, self._saturation)
        return Frame(
            pixels=pixels,
            mask=mask,
            saturation=_TOP[self._depth],
            meta={**self._meta, "frame": frame},
        )

    def _values(self, frame: int) -> npt.NDArray[Any]:
        with self._lock:
            if frame == 1 and self._pending is not None:
                values, self._pending = self._pending, None
                return values
            try:
                image = self._open() if frame == 1 else self._image.getframe(frame - 1)
                values = np.asarray(image.data)
            except DataUnavailable:
                raise
            except MemoryError as exc:
                raise DataUnavailable(f"{self.path}: frame {frame} too large to read") from exc
            except Exception as exc:  # third-party decoder: corrupt or vanished data
                raise DataUnavailable(f"{self.path}: frame {frame} unreadable ({exc})") from exc
        expected = (self._meta["y_pixels_in_detector"], self._meta["x_pixels_in_detector"])
        if values.shape != expected:
            raise DataUnavailable(f"{self.path}: frame {frame} is {values.shape}, not {expected}")
        return values

    def close(self) -> None:
        """Drop fabio's image (fabio closes its files after each read)."""
        with self._lock:
            self._pending = None
