"""Eiger pixel_mask decoding and sharing (eiger_mask), on real HDF5 files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt
import pytest

from istasks.core.readers import eiger_mask
from istasks.core.readers.eiger import EigerReader
from istasks.core.readers.eiger_mask import cache_stats, invalid_pixels, read_mask
from ops.testdata.eiger import write_eiger

DS = "/entry/instrument/detector/detectorSpecific"
SHAPE = (70, 83)  # not a multiple of the chunk shapes below: edge chunks are cut
TILING: dict[str, Any] = {"module": (24, 30), "gap": (4, 3)}

STORAGES: dict[str, dict[str, Any]] = {
    "gzip": {"compression": "gzip", "chunks": (16, 20)},
    "gzip-one-chunk": {"compression": "gzip", "chunks": SHAPE},
    "gzip-auto-chunks": {"compression": "gzip", "chunks": True},
    "shuffle-gzip": {"compression": "gzip", "shuffle": True, "chunks": (16, 20)},
    "shuffle": {"shuffle": True, "chunks": (16, 20)},
    "chunked-plain": {"chunks": (16, 20)},
    "contiguous": {},
    "bslz4": {"chunks": (16, 24), **hdf5plugin.Bitshuffle(cname="lz4")},
    "lz4": {"chunks": (16, 20), **hdf5plugin.LZ4()},  # not decoded here: h5py reads it
    "fletcher-gzip": {"compression": "gzip", "fletcher32": True, "chunks": (16, 20)},
}
DTYPES = ["<u4", ">u4", "<i4", "<u2", ">u2", "u1", "<u8"]


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    eiger_mask.clear_cache()
    yield
    eiger_mask.clear_cache()


def _bits(rng: np.random.Generator, dtype: str, shape: tuple[int, int] = SHAPE) -> Any:
    """Random mask words: mostly 0, some with low bits, some with only high bits."""
    kind = np.dtype(dtype)
    top = min(kind.itemsize * 8, 63 if kind.kind == "i" else 64)
    words = np.zeros(shape, dtype=np.uint64)
    flat = words.reshape(-1)
    for bit in rng.integers(0, top, 400):
        flat[rng.integers(0, flat.size, 20)] |= np.uint64(1) << np.uint64(bit)
    return words.astype(kind)


def _write(path: Path, bits: Any, *, userblock_size: int = 0, **storage: Any) -> None:
    with h5py.File(path, "w", userblock_size=userblock_size) as file:
        file.create_dataset("mask", data=bits, **storage)


def _plain_rule(path: Path, driver: str | None = None) -> npt.NDArray[np.bool_]:
    """The reference: h5py's plain read, low 8 bits set."""
    with h5py.File(path, "r", driver=driver) as file:
        return np.asarray((file["mask"][()].astype(np.uint64) & 0xFF) != 0)


def _read(path: Path, driver: str | None = None) -> npt.NDArray[np.bool_]:
    with h5py.File(path, "r", driver=driver) as file:
        return read_mask(file["mask"]).bad


@pytest.mark.parametrize("storage", list(STORAGES))
def test_every_storage_matches_h5py(tmp_path: Path, rng: np.random.Generator, storage: str) -> None:
    bits = _bits(rng, "<u4")
    _write(tmp_path / "m.h5", bits, **STORAGES[storage])
    np.testing.assert_array_equal(_read(tmp_path / "m.h5"), _plain_rule(tmp_path / "m.h5"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", ["gzip", "shuffle-gzip", "chunked-plain", "bslz4"])
def test_every_type_matches_h5py(
    tmp_path: Path, rng: np.random.Generator, dtype: str, storage: str
) -> None:
    bits = _bits(rng, dtype)
    _write(tmp_path / "m.h5", bits, **STORAGES[storage])
    np.testing.assert_array_equal(_read(tmp_path / "m.h5"), _plain_rule(tmp_path / "m.h5"))


def test_low_eight_bits_invalidate_higher_bits_do_not(tmp_path: Path) -> None:
    bits = np.zeros((4, 32), dtype=np.uint32)
    bits[0, :] = np.uint32(1) << np.arange(32, dtype=np.uint32)  # one bit per column
    bits[1, :] = 0xFFFFFF00
    bits[2, :] = 0x80000001
    _write(tmp_path / "m.h5", bits, compression="gzip", chunks=(2, 16))
    bad = _read(tmp_path / "m.h5")
    assert bad[0, :8].all() and not bad[0, 8:].any()
    assert not bad[1].any() and bad[2].all() and not bad[3].any()
    np.testing.assert_array_equal(invalid_pixels(bits), bad)
    np.testing.assert_array_equal(invalid_pixels(bits.astype(">u4")), bad)


def test_read_through_hdf5_when_addresses_are_not_file_offsets(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A user block (and an in-memory driver) make the reader fall back to HDF5's reads."""
    bits = _bits(rng, "<u4")
    _write(tmp_path / "ub.h5", bits, userblock_size=512, **STORAGES["gzip"])
    _write(tmp_path / "core.h5", bits, **STORAGES["shuffle-gzip"])
    np.testing.assert_array_equal(_read(tmp_path / "ub.h5"), _plain_rule(tmp_path / "ub.h5"))
    np.testing.assert_array_equal(
        _read(tmp_path / "core.h5", "core"), _plain_rule(tmp_path / "core.h5")
    )


def test_same_stored_mask_is_decoded_once(tmp_path: Path, rng: np.random.Generator) -> None:
    bits = _bits(rng, "<u4")
    _write(tmp_path / "a.h5", bits, **STORAGES["gzip"])
    _write(tmp_path / "b.h5", bits, **STORAGES["gzip"])
    before = cache_stats()
    with h5py.File(tmp_path / "a.h5", "r") as first, h5py.File(tmp_path / "b.h5", "r") as second:
        shared = read_mask(first["mask"])
        assert read_mask(second["mask"]) is shared
    after = cache_stats()
    assert (after.decodes - before.decodes, after.hits - before.hits) == (1, 1)


def test_other_content_or_layout_is_decoded_separately(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    bits = _bits(rng, "<u4")
    changed = bits.copy()
    changed[5, 7] ^= 0x4  # one pixel: same size, same layout, other content
    _write(tmp_path / "a.h5", bits, **STORAGES["gzip"])
    _write(tmp_path / "b.h5", changed, **STORAGES["gzip"])
    _write(tmp_path / "c.h5", bits, **STORAGES["shuffle-gzip"])
    masks = []
    for name in ("a.h5", "b.h5", "c.h5"):
        with h5py.File(tmp_path / name, "r") as file:
            masks.append(read_mask(file["mask"]))
    assert len({id(mask) for mask in masks}) == 3
    assert masks[0].bad[5, 7] != masks[1].bad[5, 7]
    np.testing.assert_array_equal(masks[0].bad, masks[2].bad)


def test_cache_is_bounded(tmp_path: Path, rng: np.random.Generator) -> None:
    paths = []
    for index in range(eiger_mask.CACHE_ENTRIES + 1):
        paths.append(tmp_path / f"{index}.h5")
        _write(paths[-1], _bits(rng, "<u4"), **STORAGES["gzip"])
    for path in paths:
        with h5py.File(path, "r") as file:
            read_mask(file["mask"])
    before = cache_stats().decodes
    with h5py.File(paths[-1], "r") as file:
        read_mask(file["mask"])  # still cached
    with h5py.File(paths[0], "r") as file:
        read_mask(file["mask"])  # evicted by the newer ones
    assert cache_stats().decodes - before == 1


def test_corrupt_chunk_gives_unmasked_frame_not_a_crash(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, nimages=1, shape=SHAPE, **TILING)
    with h5py.File(master, "r+") as file:
        dataset = file[f"{DS}/pixel_mask"]
        dataset.id.write_direct_chunk((0, 0), b"not a deflate stream", filter_mask=0)
    with EigerReader(str(master)) as reader:
        assert reader.read_frame(1).mask is None


def test_two_masters_of_a_detector_share_one_mask(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, "run", nimages=2, shape=SHAPE, **TILING)
    second = tmp_path / "run2_master.h5"
    shutil.copyfile(master, second)  # same data links, same mask: the next run
    before = cache_stats().decodes
    with EigerReader(str(master)) as first_reader, EigerReader(str(second)) as second_reader:
        first, other = first_reader.read_frame(1), second_reader.read_frame(2)
    assert first.mask is not None and first.mask is other.mask
    assert cache_stats().decodes - before == 1
    with h5py.File(master, "r") as file:
        expected = (file[f"{DS}/pixel_mask"][()] & 0xFF) != 0
    np.testing.assert_array_equal(first.mask.bad, expected)
    assert not first.mask.bad.flags.writeable
