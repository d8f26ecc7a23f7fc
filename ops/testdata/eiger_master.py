"""The ``<prefix>_master.h5`` of a generated Eiger dataset: NXmx groups and DECTRIS metadata.

Datasets carry the types the detector writes (float32 scalars and arrays, fixed ASCII,
fixed and variable-length UTF-8 strings, unsigned integers), so the reader's conversion
of every kind is exercised. ``MasterSpec.dcu`` is the DCU software version the file
claims ("1.6", "1.6.6", "1.7.4", "1.8", "1.8.0", "2.1.0"...): versions below 1.8 get the
DCU 1.6 layout (Eiger 9M), 1.8 and later the 1.8 layout (Eiger2); both also get a few
fields the other mapping reads, to check they stay out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

D = "entry/instrument/detector"
DS = f"{D}/detectorSpecific"
G = "entry/sample/goniometer"

NX_CLASSES = {
    "entry": "NXentry",
    "entry/data": "NXdata",
    "entry/instrument": "NXinstrument",
    "entry/instrument/beam": "NXbeam",
    D: "NXdetector",
    DS: "NXcollection",
    f"{D}/geometry": "NXgeometry",
    f"{D}/geometry/orientation": "NXorientation",
    f"{D}/geometry/translation": "NXtranslation",
    f"{D}/goniometer": "NXtransformations",
    f"{D}/module": "NXdetector_module",
    f"{D}/transformations": "NXtransformations",
    "entry/sample": "NXsample",
    G: "NXtransformations",
}

#: Saturation cut-off the detector reports (counts), as in a DECTRIS Eiger2 master.
COUNT_CUTOFF = 1_207_074
PIXEL_SIZE_M = 7.5e-5
DISTANCE_M = 0.2
OSCILLATION_DEG = 0.1


@dataclass(frozen=True)
class MasterSpec:
    """What the master describes: frame shape and depth, counts, DCU version, beam.

    ``dcu`` is written as ``software_version``, with ".0" added to a bare "major.minor"
    ("1.6" -> "1.6.0"), as the DCU spells it.
    """

    shape: tuple[int, int]
    bit_depth: int
    nimages: int
    ntrigger: int
    dcu: str
    beam_center: tuple[float, float]
    description: str = "Dectris EIGER2 Si 16M – LS-CAT 21-ID"

    @property
    def software_version(self) -> str:
        """The version string the DCU writes."""
        return f"{self.dcu}.0" if self.dcu.count(".") == 1 else self.dcu

    @property
    def layout(self) -> str:
        """The layout written: "1.6" for DCU versions below 1.8, "1.8" from 1.8 on."""
        major, minor = (int(part) for part in self.dcu.split(".")[:2])
        return "1.6" if (major, minor) < (1, 8) else "1.8"


@dataclass(frozen=True)
class _Text:
    """A string dataset written as variable-length (``vlen``) or fixed-length, ASCII or UTF-8."""

    value: str
    utf8: bool = True
    vlen: bool = True


def _common(spec: MasterSpec, excluded: int) -> dict[str, Any]:
    """Fields of both DCU versions (spec 5.2 common table plus a few unmapped ones)."""
    cx, cy = spec.beam_center
    rows, cols = spec.shape
    return {
        f"{DS}/auto_summation": np.uint8(1),
        f"{D}/beam_center_x": np.float32(cx),
        f"{D}/beam_center_y": np.float32(cy),
        f"{D}/bit_depth_image": np.uint32(spec.bit_depth),
        f"{D}/bit_depth_readout": np.uint32(16),
        f"{D}/count_time": np.float32(0.0099999),
        f"{DS}/data_collection_date": np.bytes_(b"2024-05-17T09:30:12.345+01:00"),
        f"{D}/description": _Text(spec.description),
        f"{D}/detector_distance": np.float32(DISTANCE_M),
        f"{D}/detector_number": _Text("E-32-0117", utf8=False),
        f"{D}/geometry/orientation/value": np.array([-1, 0, 0, 0, -1, 0], dtype=np.float64),
        f"{D}/detector_readout_time": np.float32(1e-7),
        f"{D}/geometry/translation/distances": np.array(
            [cx * PIXEL_SIZE_M, cy * PIXEL_SIZE_M, -DISTANCE_M], dtype=np.float32
        ),
        f"{DS}/element": _Text("Cu", vlen=False),
        f"{D}/flatfield_correction_applied": np.int32(1),
        f"{DS}/frame_count_time": np.float32(0.0099999),
        f"{DS}/frame_period": np.float32(0.01),
        f"{D}/frame_time": np.float32(0.01),
        f"{DS}/nimages": np.uint64(spec.nimages),
        f"{DS}/ntrigger": np.uint64(spec.ntrigger),
        f"{DS}/number_of_excluded_pixels": np.uint32(excluded),
        f"{DS}/photon_energy": np.float32(12661.0),
        f"{D}/pixel_mask_applied": np.int32(1),
        f"{D}/sensor_material": np.bytes_(b"Si"),
        f"{D}/sensor_thickness": np.float32(4.5e-4),
        f"{DS}/software_version": np.bytes_(spec.software_version.encode()),
        f"{D}/threshold_energy": np.float32(6330.5),
        f"{DS}/trigger_mode": np.bytes_(b"exts"),
        f"{D}/virtual_pixel_correction_applied": np.int32(1),
        "entry/instrument/beam/incident_wavelength": np.float32(0.97918),
        f"{D}/x_pixel_size": np.float32(PIXEL_SIZE_M),
        f"{D}/y_pixel_size": np.float32(PIXEL_SIZE_M),
        f"{DS}/x_pixels_in_detector": np.uint32(cols),
        f"{DS}/y_pixels_in_detector": np.uint32(rows),
        f"{DS}/eiger_fw_version": np.bytes_(b"release-2022.1.2"),
        f"{DS}/countrate_correction_count_cutoff": np.uint32(COUNT_CUTOFF),
        "entry/definition": np.bytes_(b"NXmx"),
    }


def _rotation(prefix: str, axis: str, start: float, frames: int, step: float) -> dict[str, Any]:
    """Per-frame start/end angles (float32 arrays) plus average and total range."""
    angles = (start + step * np.arange(frames)).astype(np.float32)
    return {
        f"{prefix}/{axis}": angles,
        f"{prefix}/{axis}_end": (angles + np.float32(step)).astype(np.float32),
        f"{prefix}/{axis}_range_average": np.float32(step),
        f"{prefix}/{axis}_range_total": np.float32(step * frames),
    }


def _dcu_1_8(spec: MasterSpec) -> dict[str, Any]:
    """DCU 1.8 (Eiger2) fields."""
    frames = spec.nimages * spec.ntrigger
    lookup = np.linspace(0, COUNT_CUTOFF, 32).astype(np.uint32)
    table = np.stack([np.linspace(0, 1e6, 8), np.linspace(0, 1.2e6, 8)]).astype(np.float32)
    return {
        f"{DS}/type": np.bytes_(b"EIGER2"),
        f"{D}/distance": np.float32(DISTANCE_M),
        f"{D}/saturation_value": np.uint32(COUNT_CUTOFF),
        f"{D}/transformations/translation": np.float64(DISTANCE_M),
        **_rotation(f"{D}/goniometer", "two_theta", 0.0, frames, 0.0),
        **_rotation(G, "omega", 10.0, frames, OSCILLATION_DEG),
        **_rotation(G, "chi", 0.0, frames, 0.0),
        **_rotation(G, "phi", 0.0, frames, 0.0),
        f"{DS}/countrate_correction_lookup_table": lookup,
        f"{DS}/countrate_correction_table": table,
        f"{D}/module/data_origin": np.array([0, 0], dtype=np.int32),
        f"{D}/module/data_size": np.array([spec.shape[1], spec.shape[0]], dtype=np.int32),
        f"{D}/module/fast_pixel_direction": np.float32(PIXEL_SIZE_M),
        f"{D}/module/module_index": np.int64(0),
        f"{D}/module/module_offset": np.float64(0.0),
        f"{D}/module/slow_pixel_direction": np.float32(PIXEL_SIZE_M),
    }


def _dcu_1_6(spec: MasterSpec) -> dict[str, Any]:
    """DCU 1.6 (Eiger 9M) fields; the per-frame omega array is written but not mapped."""
    frames = spec.nimages * spec.ntrigger
    fields: dict[str, Any] = {
        f"{DS}/calibration_type": np.bytes_(b"standard"),
        f"{DS}/countrate_correction_bunch_mode": _Text("continuous", utf8=False),
        f"{DS}/detector_readout_period": np.float32(0.0100001),
        f"{D}/efficiency_correction_applied": np.int32(0),
        f"{DS}/nframes_sum": np.uint32(1),
        f"{DS}/summation_nimages": np.uint32(1),
        f"{D}/goniometer/two_theta_increment": np.float32(0.0),
        f"{D}/goniometer/two_theta_start": np.float32(0.0),
        f"{G}/omega": (10.0 + OSCILLATION_DEG * np.arange(frames)).astype(np.float32),
    }
    for axis, start, step in (("chi", 0.0, 0.0), ("kappa", 0.0, 0.0), ("omega", 10.0, 0.1)):
        fields[f"{G}/{axis}_increment"] = np.float32(step)
        fields[f"{G}/{axis}_start"] = np.float32(start)
    fields[f"{G}/phi_increment"] = np.float32(0.0)
    fields[f"{G}/phi_start"] = np.float32(0.0)
    return fields


def _write_value(file: h5py.File, path: str, value: Any) -> None:
    """One dataset, creating parent groups; strings keep the requested HDF5 string type."""
    if isinstance(value, _Text):
        encoding = "utf-8" if value.utf8 else "ascii"
        raw = value.value.encode(encoding)
        length = None if value.vlen else len(raw)
        file.create_dataset(path, data=raw, dtype=h5py.string_dtype(encoding, length))
    else:
        file.create_dataset(path, data=value)


def _write_links(file: h5py.File, links: Iterable[tuple[str, str]]) -> None:
    """``/entry/data/data_NNNNNN`` external links to each data file's stack."""
    data = file.require_group("entry/data")
    for name, data_file in links:
        data[name] = h5py.ExternalLink(data_file, "/entry/data/data")


def write_master(
    path: Path,
    spec: MasterSpec,
    links: Iterable[tuple[str, str]],
    mask: npt.NDArray[np.uint32] | None,
) -> None:
    """Write the master file: metadata in the layout of ``spec.dcu``, links, mask."""
    excluded = 0 if mask is None else int(np.count_nonzero(mask & 0xFF))
    fields = _common(spec, excluded)
    fields.update(_dcu_1_6(spec) if spec.layout == "1.6" else _dcu_1_8(spec))
    with h5py.File(path, "w") as file:
        for name, value in fields.items():
            _write_value(file, name, value)
        _write_links(file, links)
        if mask is not None:
            file.create_dataset(f"{DS}/pixel_mask", data=mask, compression="gzip", chunks=True)
        for group, nx_class in NX_CLASSES.items():
            file.require_group(group).attrs["NX_class"] = np.bytes_(nx_class.encode())
