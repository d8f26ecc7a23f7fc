"""Write DECTRIS Eiger datasets the way the instrument does, for tests, benchmarks and demos.

Layout (DECTRIS/NXmx): ``<prefix>_master.h5`` holds the metadata and external links
``/entry/data/data_NNNNNN`` -> ``<prefix>_data_NNNNNN.h5:/entry/data/data``; each data
stack is ``[n, rows, cols]``, one frame per chunk, bitshuffle+LZ4 (filter 32008), tagged
with ``image_nr_low`` / ``image_nr_high``. Everything is seeded and vectorised, so an
Eiger2 X 16M frame takes about a second.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from ops.testdata.eiger_master import MasterSpec, write_master

#: Eiger2 X 16M frame (rows, cols): 8 x 4 modules of 512 x 1028 with 38-row, 12-col gaps.
EIGER2_16M_SHAPE = (4362, 4148)
EIGER2_MODULE = (512, 1028)
EIGER2_GAP = (38, 12)
#: A real EIGER 4M data file (see shared/testdata/README.md), located next to the repo.
REAL_DATA_FILE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "testdata"
    / "eiger4m_bslz4_data_000001.h5"
)
REAL_DATA_SHAPE = (2167, 2070)

#: NeXus pixel_mask bits (field notes 5.1). Bits 0-7 invalidate a pixel; 30/31 do not.
GAP_BIT, DEAD_BIT, HOT_BIT, NOISY_BIT = 1 << 0, 1 << 1, 1 << 3, 1 << 4
MODULE_EDGE_BIT, VIRTUAL_BIT = 1 << 30, 1 << 31


@dataclass(frozen=True)
class ModuleTiling:
    """Module tiling of the sensor: module and gap sizes (rows, cols)."""

    module: tuple[int, int] = EIGER2_MODULE
    gap: tuple[int, int] = EIGER2_GAP


def gap_pixels(
    shape: tuple[int, int], geometry: ModuleTiling = ModuleTiling()
) -> npt.NDArray[np.bool_]:
    """True on the inter-module gap pixels of a frame of ``shape``."""
    rows = (np.arange(shape[0]) % (geometry.module[0] + geometry.gap[0])) >= geometry.module[0]
    cols = (np.arange(shape[1]) % (geometry.module[1] + geometry.gap[1])) >= geometry.module[1]
    return rows[:, None] | cols[None, :]


def make_pixel_mask(
    shape: tuple[int, int], rng: np.random.Generator, geometry: ModuleTiling = ModuleTiling()
) -> npt.NDArray[np.uint32]:
    """A DECTRIS-like pixel_mask: gaps (bit 0), dead/hot/noisy pixels, and pixels with only
    informational high bits (30, 31) which must stay valid."""
    mask = np.where(gap_pixels(shape, geometry), np.uint32(GAP_BIT), np.uint32(0))
    flat = mask.reshape(-1)
    count = max(4, flat.size // 50_000)
    for bit in (DEAD_BIT, HOT_BIT, NOISY_BIT | DEAD_BIT, VIRTUAL_BIT, MODULE_EDGE_BIT):
        flat[rng.integers(0, flat.size, count)] |= np.uint32(bit)
    return mask


def _background(shape: tuple[int, int], center: tuple[float, float]) -> npt.NDArray[np.float32]:
    """Mean counts per pixel: flat level plus diffuse scatter falling off from the beam."""
    rows = np.arange(shape[0], dtype=np.float32)[:, None] - np.float32(center[1])
    cols = np.arange(shape[1], dtype=np.float32)[None, :] - np.float32(center[0])
    scale = np.float32(0.12 * min(shape))
    falloff = np.float32(25.0) / (np.float32(1.0) + (rows**2 + cols**2) / scale**2)
    return (falloff + np.float32(0.4)).astype(np.float32, copy=False)


def _add_spots(frame: npt.NDArray[np.int64], rng: np.random.Generator) -> None:
    """Bragg-like spots: 5x5 Gaussian blobs and single-pixel spots, added in place."""
    rows, cols = frame.shape
    count = max(20, frame.size // 20_000)
    offsets = np.arange(-2, 3)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 2.0).reshape(-1)
    centre_r = rng.integers(2, rows - 2, count)
    centre_c = rng.integers(2, cols - 2, count)
    peak = rng.uniform(50, 5000, count)
    index_r = (centre_r[:, None] + np.repeat(offsets, 5)[None, :]).reshape(-1)
    index_c = (centre_c[:, None] + np.tile(offsets, 5)[None, :]).reshape(-1)
    values = (peak[:, None] * kernel[None, :]).astype(np.int64).reshape(-1)
    np.add.at(frame, (index_r, index_c), values)
    single = max(5, count // 4)
    frame.reshape(-1)[rng.integers(0, frame.size, single)] += rng.integers(200, 20_000, single)


def make_frame(
    shape: tuple[int, int],
    dtype: npt.DTypeLike,
    rng: np.random.Generator,
    *,
    center: tuple[float, float],
    invalid: npt.NDArray[np.bool_] | None,
    background: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """One diffraction-like frame; invalid pixels and a few saturated ones hold 2^bd - 1."""
    kind = np.dtype(dtype)
    flag = np.iinfo(kind).max
    lam = _background(shape, center) if background is None else background
    counts = rng.poisson(lam).astype(np.int64)
    _add_spots(counts, rng)
    frame = np.minimum(counts, flag - 1).astype(kind)
    frame.reshape(-1)[rng.integers(0, frame.size, 5)] = flag  # saturated
    if invalid is not None:
        frame[invalid] = flag  # pixel_mask_applied: DECTRIS writes masked pixels as 2^bd - 1
    return frame


def create_frame_stack(
    parent: h5py.Group, name: str, count: int, shape: tuple[int, ...], dtype: npt.DTypeLike
) -> h5py.Dataset:
    """The ``[count, rows, cols]`` frame stack as DECTRIS' and Odin's writers make it: one
    bitshuffle-LZ4 chunk per frame (the readers' fast path depends on that layout)."""
    return parent.create_dataset(
        name,
        shape=(count, *shape),
        dtype=dtype,
        chunks=(1, *shape),
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )


def write_data_file(
    path: Path,
    frames: list[npt.NDArray[Any]],
    first_frame: int,
    *,
    image_nr_attrs: bool = True,
) -> None:
    """One ``<prefix>_data_NNNNNN.h5``: the stack, one bslz4 chunk per frame."""
    with h5py.File(path, "w") as file:
        entry = file.create_group("entry")
        entry.attrs["NX_class"] = np.bytes_(b"NXentry")
        data = entry.create_group("data")
        data.attrs["NX_class"] = np.bytes_(b"NXdata")
        stack = create_frame_stack(data, "data", len(frames), frames[0].shape, frames[0].dtype)
        for index, frame in enumerate(frames):
            stack[index] = frame
        if image_nr_attrs:
            stack.attrs["image_nr_low"] = np.int32(first_frame)
            stack.attrs["image_nr_high"] = np.int32(first_frame + len(frames) - 1)


def data_file_name(prefix: str, number: int) -> str:
    """DECTRIS data-file name for 1-based file ``number``."""
    return f"{prefix}_data_{number:06d}.h5"


def write_eiger(
    directory: Path,
    prefix: str = "demo",
    *,
    nimages: int = 4,
    frames_per_file: int = 2,
    shape: tuple[int, int] = (512, 514),
    dtype: type = np.uint32,
    dcu: str = "1.8",
    ntrigger: int = 1,
    seed: int = 0,
    with_mask: bool = True,
    image_nr_attrs: bool = True,
    module: tuple[int, int] = EIGER2_MODULE,
    gap: tuple[int, int] = EIGER2_GAP,
) -> Path:
    """Write a master + data files for ``nimages * ntrigger`` frames; return the master path.

    ``dcu`` is the DCU software version the master claims ("1.6.6" for an Eiger 9M, "1.8.0"
    for an Eiger2; a bare "1.6" is written as "1.6.0") and picks its metadata layout.
    ``module``/``gap`` set the module tiling (Eiger2 X by default; a frame smaller than a
    module has no gaps, so tests pass a smaller tiling to see them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    geometry = ModuleTiling(module, gap)
    center = (shape[1] / 2 + 3.5, shape[0] / 2 - 7.25)
    mask = make_pixel_mask(shape, rng, geometry) if with_mask else None
    invalid = None if mask is None else (mask & 0xFF) != 0
    background = _background(shape, center)
    total = nimages * ntrigger
    links: list[tuple[str, str]] = []
    for number, first in enumerate(range(1, total + 1, frames_per_file), start=1):
        count = min(frames_per_file, total - first + 1)
        frames = [
            make_frame(shape, dtype, rng, center=center, invalid=invalid, background=background)
            for _ in range(count)
        ]
        name = data_file_name(prefix, number)
        write_data_file(directory / name, frames, first, image_nr_attrs=image_nr_attrs)
        links.append((f"data_{number:06d}", name))
    spec = MasterSpec(
        shape=shape,
        bit_depth=8 * np.dtype(dtype).itemsize,
        nimages=nimages,
        ntrigger=ntrigger,
        dcu=dcu,
        beam_center=center,
    )
    master = directory / f"{prefix}_master.h5"
    write_master(master, spec, links, mask)
    return master


def write_eiger_live(
    directory: Path,
    prefix: str = "live",
    *,
    nimages: int = 4,
    frames_per_file: int = 2,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    frame_delay_s: float = 0.2,
    on_file_done: Callable[[Path], None] | None = None,
) -> Path:
    """Write a dataset as the detector does while users watch: the master first (its links
    name data files that do not exist yet), then each data file frame by frame, flushed
    after every frame and ``frame_delay_s`` apart, tagged with ``image_nr_low/high`` from
    its creation. ``on_file_done(path)`` runs as each data file is closed. The master path."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    center = (shape[1] / 2 + 3.5, shape[0] / 2 - 7.25)
    firsts = list(range(1, nimages + 1, frames_per_file))
    links = [(f"data_{n:06d}", data_file_name(prefix, n)) for n in range(1, len(firsts) + 1)]
    spec = MasterSpec(shape, 32, nimages, 1, "1.8", center)
    master = directory / f"{prefix}_master.h5"
    write_master(master, spec, links, make_pixel_mask(shape, rng))
    background = _background(shape, center)
    for (_, name), first in zip(links, firsts, strict=True):
        count = min(frames_per_file, nimages - first + 1)
        path = directory / name
        with h5py.File(path, "w") as file:
            stack = create_frame_stack(file, "entry/data/data", count, shape, np.uint32)
            stack.attrs["image_nr_low"] = np.int32(first)
            stack.attrs["image_nr_high"] = np.int32(first + count - 1)
            for index in range(count):
                time.sleep(frame_delay_s)
                stack[index] = make_frame(
                    shape, np.uint32, rng, center=center, invalid=None, background=background
                )
                file.flush()
        if on_file_done is not None:
            on_file_done(path)
    return master


def write_eiger2_16m(
    directory: Path,
    prefix: str = "eiger2_16m",
    *,
    nimages: int = 2,
    frames_per_file: int = 100,
    seed: int = 0,
) -> Path:
    """An Eiger2 X 16M dataset (4362 x 4148 uint32, bslz4) for benchmarks."""
    return write_eiger(
        directory,
        prefix,
        nimages=nimages,
        frames_per_file=frames_per_file,
        shape=EIGER2_16M_SHAPE,
        dtype=np.uint32,
        seed=seed,
    )


def wrap_real_data_file(
    directory: Path, data_file: Path = REAL_DATA_FILE, prefix: str = "real"
) -> Path:
    """Copy the real DECTRIS data file as ``<prefix>_data_000001.h5`` and write a master.

    The mask marks the frame's 0xFFFFFFFF gap pixels (bit 0). Raises FileNotFoundError
    when the shared test data is absent.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = data_file_name(prefix, 1)
    shutil.copyfile(data_file, directory / name)
    with h5py.File(directory / name, "r") as file:
        frame = file["/entry/data/data"][0]
    mask = np.where(frame == np.iinfo(np.uint32).max, np.uint32(GAP_BIT), np.uint32(0))
    rows, cols = frame.shape
    spec = MasterSpec(
        shape=(rows, cols),
        bit_depth=32,
        nimages=1,
        ntrigger=1,
        dcu="1.8",
        beam_center=(cols / 2, rows / 2),
        description="Dectris EIGER 4M",
    )
    master = directory / f"{prefix}_master.h5"
    write_master(master, spec, [("data_000001", name)], mask)
    return master
