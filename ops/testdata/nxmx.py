"""NXmx masters written by Diamond's ``nexgen`` (as ``mx-bluesky`` writes them), for tests.

The data files are written here the way Diamond's Odin writer lays them out (``/data``,
``[n, rows, cols]``, one bitshuffle/LZ4 chunk per frame, at most 1000 frames a file);
the master, its ``data_NNNNNN`` external links and the virtual dataset ``/entry/data/data``
are written by nexgen itself (``NXmxFileWriter.write`` and ``write_vds``, or
``vds_file_writer`` for a VDS in its own ``_vds.h5``). Layouts:

- ``"both"``: links and a VDS in the master (nexgen's default; the VDS's sources are the
  master's own links, source file ``"."``);
- ``"links"``: only the ``data_NNNNNN`` links;
- ``"vds"``: only the VDS, in ``<stem>_vds.h5`` whose sources name the data files; the
  links nexgen wrote are removed from the master.

Pixels are int32 with -1 in the module gaps (the Eiger2 writers' convention for signed
data) and frame ``n`` is ``n`` plus a seeded pattern, so a test can tell frames apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import numpy.typing as npt

from ops.testdata.eiger import create_frame_stack
from ops.testdata.pattern import diffraction_pattern

Layout = Literal["both", "links", "vds"]
#: nexgen's MAX_FRAMES_PER_DATASET: its VDS assumes full files of this many frames.
FRAMES_PER_FILE = 1000
GAP = -1
WAVELENGTH_A = 0.9762
DISTANCE_M = 0.25
PIXEL_SIZE_M = 75e-6
COUNT_TIME_S = 0.01


def gap_rows_cols(shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A horizontal and a vertical module gap through the frame (two pixels wide)."""
    gaps = np.zeros(shape, bool)
    gaps[shape[0] // 3 : shape[0] // 3 + 2, :] = True
    gaps[:, shape[1] // 3 : shape[1] // 3 + 2] = True
    return gaps


def nxmx_frame(
    number: int, shape: tuple[int, int], dtype: npt.DTypeLike = np.int32
) -> npt.NDArray[np.integer]:
    """Frame ``number`` (1-based): pattern + ``number``, -1 in the gaps."""
    counts = diffraction_pattern(shape, np.random.default_rng(7), spots=20) + number
    kind = np.dtype(dtype)
    frame = np.minimum(counts, np.iinfo(kind).max - 1).astype(kind)
    frame[gap_rows_cols(shape)] = GAP if kind.kind == "i" else np.iinfo(kind).max
    return frame


def write_odin_data_file(path: Path, frames: Sequence[npt.NDArray[np.integer]]) -> Path:
    """One data file: ``/data`` ``[n, rows, cols]``, a bslz4 chunk per frame."""
    with h5py.File(path, "w") as file:
        stack = create_frame_stack(file, "data", len(frames), frames[0].shape, frames[0].dtype)
        for index, frame in enumerate(frames):
            stack[index] = frame
    return path


def write_nxmx(
    directory: Path,
    stem: str = "xtal_1",
    *,
    frames: int = 12,
    shape: tuple[int, int] = (64, 48),
    dtype: npt.DTypeLike = np.int32,
    layout: Layout = "both",
    vds_offset: int = 0,
    data: bool = True,
) -> Path:
    """Data files (unless ``data`` is False) and a nexgen master ``<stem>.nxs``; its path.

    ``vds_offset`` starts the VDS that many frames into the data (nexgen's ``vds_offset``),
    as mx-bluesky does for a collection that skips its first images.
    """
    logging.getLogger("nexgen").setLevel(logging.WARNING)
    directory = directory.resolve()
    files: list[Path] = []
    for first in range(1, frames + 1, FRAMES_PER_FILE):
        path = directory / f"{stem}_{len(files) + 1:06d}.h5"
        if data:
            count = min(FRAMES_PER_FILE, frames - first + 1)
            stack = [nxmx_frame(n, shape, dtype) for n in range(first, first + count)]
            write_odin_data_file(path, stack)
        files.append(path)
    master = directory / f"{stem}.nxs"
    writer = _writer(master, frames, shape)
    writer.write(image_datafiles=files)
    if layout == "both":
        vds_shape = (frames - vds_offset, *shape)
        writer.write_vds(vds_offset=vds_offset, vds_shape=vds_shape, vds_dtype=np.dtype(dtype))
    elif layout == "vds":
        from nexgen.tools.vds_tools import vds_file_writer

        with h5py.File(master, "r+") as nxs:
            vds_file_writer(nxs, files, (frames, *shape), np.dtype(dtype))
            for name in [n for n in nxs["/entry/data"] if n.startswith("data_")]:
                del nxs["/entry/data"][name]
    return master


def _writer(master: Path, frames: int, shape: tuple[int, int]) -> Any:
    """nexgen's NXmxFileWriter for an Eiger 2X rotation of ``frames`` x 0.1 degree."""
    from nexgen.nxs_utils import (
        Attenuator,
        Axis,
        Beam,
        Detector,
        EigerDetector,
        Goniometer,
        Source,
        TransformationType,
    )
    from nexgen.nxs_utils.scan_utils import calculate_scan_points
    from nexgen.nxs_write.nxmx_writer import NXmxFileWriter
    from nexgen.utils import Point3D

    omega = Axis(
        "omega", ".", TransformationType.ROTATION, Point3D(-1, 0, 0),
        start_pos=0.0, increment=0.1, num_steps=frames,
    )  # fmt: skip
    det_z = Axis(
        "det_z", ".", TransformationType.TRANSLATION, Point3D(0, 0, 1),
        start_pos=DISTANCE_M * 1e3,
    )  # fmt: skip
    scan = calculate_scan_points(omega, rotation=True, tot_num_imgs=frames)
    eiger = EigerDetector("Eiger 2X 16M", shape, "CdTe", 50649, -1)
    beam_center = [shape[1] / 2 + 1.5, shape[0] / 2 - 2.25]
    detector = Detector(eiger, [det_z], beam_center, COUNT_TIME_S, [(-1, 0, 0), (0, -1, 0)])
    return NXmxFileWriter(
        master,
        Goniometer([omega], scan),
        detector,
        Source("I24"),
        Beam(WAVELENGTH_A),
        Attenuator(0.5),
        frames,
    )
