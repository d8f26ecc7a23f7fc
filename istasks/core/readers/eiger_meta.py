"""Eiger master-file metadata: the spec's HDF5 path -> JSON name tables and the conversion.

Spec 5.2 lists one table for DCU 1.6 (Eiger 9M) and one for DCU 1.8 (Eiger2 X 16M). As in
the 2025 fork, 1.8 is the default and 1.6 is used only when ``software_version`` is
exactly ``"1.6.0"``. Unlike the original (bug 14) every element type converts correctly,
UTF-8 and variable-length strings are kept, and a missing or unreadable dataset is
silently skipped.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import h5py
import numpy as np

from istasks.core.readers.base import Meta

log = logging.getLogger(__name__)

DETECTOR = "/entry/instrument/detector"
SPECIFIC = f"{DETECTOR}/detectorSpecific"
GONIOMETER = "/entry/sample/goniometer"
PIXEL_MASK_PATH = f"{SPECIFIC}/pixel_mask"
SOFTWARE_VERSION_PATH = f"{SPECIFIC}/software_version"

#: json name -> HDF5 path(s); the first path that exists wins.
Mapping = dict[str, tuple[str, ...]]


def _same(prefix: str, *names: str) -> Mapping:
    """Entries whose JSON name is the dataset's own name under ``prefix``."""
    return {name: (f"{prefix}/{name}",) for name in names}


def _rotation(prefix: str, axis: str) -> Mapping:
    """The four per-axis goniometer entries of DCU 1.8 (``omega``, ``omega_end``...)."""
    names = (axis, f"{axis}_end", f"{axis}_range_average", f"{axis}_range_total")
    return _same(prefix, *names)


COMMON: Mapping = {
    **_same(SPECIFIC, "auto_summation", "data_collection_date", "element"),
    **_same(SPECIFIC, "frame_count_time", "frame_period", "nimages", "ntrigger"),
    **_same(SPECIFIC, "number_of_excluded_pixels", "photon_energy", "software_version"),
    **_same(SPECIFIC, "trigger_mode", "x_pixels_in_detector", "y_pixels_in_detector"),
    **_same(DETECTOR, "beam_center_x", "beam_center_y", "bit_depth_image"),
    **_same(DETECTOR, "bit_depth_readout", "count_time", "description", "detector_distance"),
    **_same(DETECTOR, "detector_number", "detector_readout_time"),
    **_same(DETECTOR, "flatfield_correction_applied", "frame_time", "pixel_mask_applied"),
    **_same(DETECTOR, "sensor_material", "sensor_thickness", "threshold_energy"),
    **_same(DETECTOR, "virtual_pixel_correction_applied", "x_pixel_size", "y_pixel_size"),
    "detector_orientation": (f"{DETECTOR}/geometry/orientation/value",),
    "detector_translation": (f"{DETECTOR}/geometry/translation/distances",),
    "wavelength": ("/entry/instrument/beam/incident_wavelength",),
}

DCU_1_6: Mapping = {
    **COMMON,
    **_same(SPECIFIC, "calibration_type", "countrate_correction_bunch_mode"),
    **_same(SPECIFIC, "detector_readout_period", "nframes_sum", "summation_nimages"),
    **_same(DETECTOR, "efficiency_correction_applied"),
    **_same(GONIOMETER, "chi_increment", "chi_start", "kappa_increment", "kappa_start"),
    **_same(GONIOMETER, "omega_increment", "omega_start", "phi_increment", "phi_start"),
    **_same(f"{DETECTOR}/goniometer", "two_theta_increment", "two_theta_start"),
}

DCU_1_8: Mapping = {
    **COMMON,
    "definition": ("/entry/definition",),
    "type": (f"{SPECIFIC}/type",),
    **_same(DETECTOR, "distance", "saturation_value"),
    "translation": (f"{DETECTOR}/transformations/translation",),
    **_rotation(f"{DETECTOR}/goniometer", "two_theta"),
    **_rotation(GONIOMETER, "omega"),
    **_rotation(GONIOMETER, "chi"),
    **_rotation(GONIOMETER, "phi"),
    # Appendix A: DECTRIS spells the dataset with an underscore, the JSON name has none.
    "countrate_correction_lookuptable": (
        f"{SPECIFIC}/countrate_correction_lookup_table",
        f"{SPECIFIC}/countrate_correction_lookuptable",
    ),
    **_same(SPECIFIC, "countrate_correction_table"),
    **_same(f"{DETECTOR}/module", "data_origin", "data_size", "fast_pixel_direction"),
    **_same(f"{DETECTOR}/module", "module_index", "module_offset", "slow_pixel_direction"),
}

#: First DCU software version that writes the 1.8 layout; every later one does too.
DCU_1_8_VERSION = (1, 8)
#: ``major.minor`` at the start of a version string ("1.6.6", "1.8.0", " 2.1.0-rc1").
_VERSION_RE = re.compile(r"\s*v?(\d+)\.(\d+)")

#: Errors h5py raises for unreadable objects (broken links, unknown filters, bad types).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


class _Skip:
    """Marker for a value that has no JSON form (compound, opaque, empty dataspace)."""


SKIP = _Skip()


def dcu_version(software_version: object) -> tuple[int, int] | None:
    """``(major, minor)`` of a ``software_version`` value, or None when it has none."""
    if isinstance(software_version, bool) or not isinstance(software_version, str | int | float):
        return None
    match = _VERSION_RE.match(str(software_version))
    return None if match is None else (int(match[1]), int(match[2]))


def mapping_for(software_version: object) -> Mapping | None:
    """The table for a DCU version: 1.6 below 1.8 (1.6.x, 1.7.x), 1.8 for 1.8.0 and every
    newer version (newer DCUs write the 1.8 layout). None when the version is missing or
    unparseable: :func:`layout_mapping` decides then."""
    version = dcu_version(software_version)
    if version is None:
        return None
    return DCU_1_6 if version < DCU_1_8_VERSION else DCU_1_8


def layout_mapping(master: h5py.File) -> Mapping:
    """The table whose own datasets the file has more of, for a master without a usable
    version (not written by a DCU, or edited). On a tie, e.g. neither layout's datasets,
    the 1.6 table, as the original chose for any version other than "1.8.0"."""

    def present(table: Mapping) -> int:
        own = (paths for name, paths in table.items() if name not in COMMON)
        return sum(any(_exists(master, path) for path in group) for group in own)

    return DCU_1_8 if present(DCU_1_8) > present(DCU_1_6) else DCU_1_6


def _exists(master: h5py.File, path: str) -> bool:
    """True when ``path`` names a dataset (a broken link or a group does not count)."""
    try:
        return isinstance(master.get(path), h5py.Dataset)
    except H5_ERRORS:
        return False


def _decode(raw: bytes) -> str:
    """HDF5 string bytes -> str (UTF-8, undecodable bytes replaced, C padding dropped)."""
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def _plain(value: Any) -> Any:
    """Python value from ``ndarray.tolist()`` output, recursively made JSON-safe."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, bytes):
        return _decode(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; the original's jansson refused them too
    return value


def convert(value: Any, dtype: np.dtype[Any]) -> Any:
    """One dataset's value -> JSON value: int, float, bool, str, or nested lists (C order).

    A one-element array becomes a scalar. Returns SKIP for types JSON cannot hold.
    """
    if isinstance(value, h5py.Empty):
        return SKIP
    is_string = h5py.check_string_dtype(dtype) is not None
    if not is_string and dtype.kind not in "iufb":
        return SKIP
    array = np.asarray(value)
    if array.dtype.kind == "O" and not is_string:
        return SKIP
    listed = array.reshape(-1)[0].tolist() if array.size == 1 else array.tolist()
    if isinstance(listed, str):
        return listed.rstrip("\x00")
    return _plain(listed)


def read_value(file: h5py.File, path: str) -> Any:
    """The converted value at ``path``, or SKIP when missing, unreadable or not JSON-able."""
    try:
        dataset = file.get(path)
        if not isinstance(dataset, h5py.Dataset):
            return SKIP
        return convert(dataset[()], dataset.dtype)
    except H5_ERRORS as exc:
        log.debug("eiger meta: skipping %s (%s)", path, exc)
        return SKIP


def read_detector_meta(master: h5py.File) -> Meta:
    """Detector metadata of a master file with the spec's JSON names (no derived keys)."""
    mapping = mapping_for(read_value(master, SOFTWARE_VERSION_PATH)) or layout_mapping(master)
    meta: Meta = {}
    for name, paths in mapping.items():
        for path in paths:
            value = read_value(master, path)
            if value is not SKIP:
                meta[name] = value
                break
    return meta
