"""EigerReader, the bslz4 fast path and the Eiger test-data writer, on real HDF5 files."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt
import pytest

from istasks.core import bslz4
from istasks.core.readers.base import FrameReader
from istasks.core.readers.eiger import EigerReader
from istasks.core.readers.eiger_meta import (
    COMMON,
    DCU_1_6,
    DCU_1_8,
    SKIP,
    dcu_version,
    mapping_for,
    read_value,
)
from istasks.errors import DataUnavailable, FrameNotFound, UnknownFormat
from ops.testdata.eiger import (
    REAL_DATA_FILE,
    REAL_DATA_SHAPE,
    VIRTUAL_BIT,
    data_file_name,
    wrap_real_data_file,
    write_data_file,
    write_eiger,
)

SMALL = (60, 70)
#: A module tiling small enough to put gaps inside SMALL frames.
SMALL_TILING: dict[str, Any] = {"module": (24, 30), "gap": (4, 3)}
DS = "/entry/instrument/detector/detectorSpecific"
G = "/entry/sample/goniometer"
#: The compatibility kit's data generator (replies recorded from the original on its data).
COMPAT_GENERATOR = Path(__file__).resolve().parents[2] / "shared" / "compat" / "make_testdata.py"

COMMON_KEYS = {
    "auto_summation", "beam_center_x", "beam_center_y", "bit_depth_image",
    "bit_depth_readout", "count_time", "data_collection_date", "description",
    "detector_distance", "detector_number", "detector_orientation", "detector_readout_time",
    "detector_translation", "element", "flatfield_correction_applied", "frame_count_time",
    "frame_period", "frame_time", "nimages", "ntrigger", "number_of_excluded_pixels",
    "photon_energy", "pixel_mask_applied", "sensor_material", "sensor_thickness",
    "software_version", "threshold_energy", "trigger_mode", "virtual_pixel_correction_applied",
    "wavelength", "x_pixel_size", "x_pixels_in_detector", "y_pixel_size", "y_pixels_in_detector",
}  # fmt: skip
DCU_1_6_KEYS = {
    "calibration_type", "countrate_correction_bunch_mode", "detector_readout_period",
    "efficiency_correction_applied", "nframes_sum", "summation_nimages", "chi_increment",
    "chi_start", "kappa_increment", "kappa_start", "omega_increment", "omega_start",
    "phi_increment", "phi_start", "two_theta_increment", "two_theta_start",
}  # fmt: skip
DCU_1_8_KEYS = {
    "definition", "type", "distance", "saturation_value", "translation",
    "two_theta", "two_theta_end", "two_theta_range_average", "two_theta_range_total",
    "omega", "omega_end", "omega_range_average", "omega_range_total",
    "chi", "chi_end", "chi_range_average", "chi_range_total",
    "phi", "phi_end", "phi_range_average", "phi_range_total",
    "countrate_correction_lookuptable", "countrate_correction_table", "data_origin",
    "data_size", "fast_pixel_direction", "module_index", "module_offset", "slow_pixel_direction",
}  # fmt: skip
DERIVED_KEYS = {"image_depth", "fn", "first_frame", "last_frame"}


def stack_frame(directory: Path, prefix: str, file_number: int, index: int) -> npt.NDArray[Any]:
    """Frame ``index`` of data file ``file_number`` read with plain h5py (the reference)."""
    with h5py.File(directory / data_file_name(prefix, file_number), "r") as file:
        return np.asarray(file["/entry/data/data"][index])


@pytest.fixture
def five_frames(tmp_path: Path) -> Path:
    """Master of 5 frames in 3 data files (2 + 2 + 1), with module gaps."""
    return write_eiger(tmp_path, nimages=5, frames_per_file=2, shape=SMALL, **SMALL_TILING)


def test_reader_implements_the_protocol(five_frames: Path) -> None:
    with EigerReader(str(five_frames)) as reader:
        assert isinstance(reader, FrameReader)
        assert reader.path == str(five_frames)


@pytest.mark.parametrize("attrs", [True, False], ids=["image_nr_attrs", "cumulative_shapes"])
def test_frames_found_in_every_data_file(tmp_path: Path, attrs: bool) -> None:
    master = write_eiger(tmp_path, nimages=5, frames_per_file=2, shape=SMALL, image_nr_attrs=attrs)
    where = {1: (1, 0), 2: (1, 1), 3: (2, 0), 4: (2, 1), 5: (3, 0)}
    with EigerReader(str(master)) as reader:
        assert reader.frame_count == 5
        for frame, (file_number, index) in where.items():
            expected = stack_frame(tmp_path, "demo", file_number, index)
            np.testing.assert_array_equal(reader.read_frame(frame).pixels, expected)
        assert (reader.meta()["first_frame"], reader.meta()["last_frame"]) == (1, 5)


@pytest.mark.parametrize("attrs", [True, False], ids=["image_nr_attrs", "cumulative_shapes"])
def test_missing_data_file_hides_only_its_frames(tmp_path: Path, attrs: bool) -> None:
    master = write_eiger(tmp_path, nimages=5, frames_per_file=2, shape=SMALL, image_nr_attrs=attrs)
    expected_5 = stack_frame(tmp_path, "demo", 3, 0)
    (tmp_path / data_file_name("demo", 2)).unlink()
    with EigerReader(str(master)) as reader:
        for frame in (3, 4):
            with pytest.raises(FrameNotFound, match="data file missing"):
                reader.read_frame(frame)
        assert reader.read_frame(1).pixels.shape == SMALL
        np.testing.assert_array_equal(reader.read_frame(5).pixels, expected_5)


def test_frames_written_after_opening_become_visible(tmp_path: Path) -> None:
    later = tmp_path / "later"
    master = write_eiger(tmp_path / "live", nimages=5, frames_per_file=2, shape=SMALL)
    write_eiger(later, nimages=5, frames_per_file=2, shape=SMALL)
    for number in (2, 3):
        (master.parent / data_file_name("demo", number)).unlink()
    with EigerReader(str(master)) as reader:
        assert reader.meta()["last_frame"] == 2
        with pytest.raises(FrameNotFound):
            reader.read_frame(5)
        for number in (2, 3):
            shutil.copyfile(
                later / data_file_name("demo", number),
                master.parent / data_file_name("demo", number),
            )
        np.testing.assert_array_equal(reader.read_frame(5).pixels, stack_frame(later, "demo", 3, 0))
        assert reader.meta()["last_frame"] == 5


def test_stack_still_being_written_is_reopened(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, nimages=4, frames_per_file=2, shape=SMALL)
    second = tmp_path / data_file_name("demo", 2)
    frames = [stack_frame(tmp_path, "demo", 2, index) for index in (0, 1)]
    with h5py.File(second, "w") as file:  # attributes promise frames 3-4, only 3 is there yet
        stack = file.create_dataset("/entry/data/data", data=frames[0][None])
        stack.attrs["image_nr_low"], stack.attrs["image_nr_high"] = 3, 4
    with EigerReader(str(master)) as reader:
        np.testing.assert_array_equal(reader.read_frame(3).pixels, frames[0])
        with pytest.raises(FrameNotFound):
            reader.read_frame(4)
        # The writer is another process in real life; HDF5 will not truncate a file this
        # process holds open, so the grown stack replaces the file instead.
        write_data_file(tmp_path / "grown.h5", frames, 3)
        (tmp_path / "grown.h5").replace(second)
        np.testing.assert_array_equal(reader.read_frame(4).pixels, frames[1])


@pytest.mark.parametrize("frame", [0, -1, 6, 10**9])
def test_out_of_range_frames(five_frames: Path, frame: int) -> None:
    with EigerReader(str(five_frames)) as reader, pytest.raises(FrameNotFound) as caught:
        reader.read_frame(frame)
    assert isinstance(caught.value, DataUnavailable)
    assert str(frame) in str(caught.value)


def test_unreadable_master_files(tmp_path: Path, five_frames: Path) -> None:
    truncated = tmp_path / "truncated_master.h5"
    truncated.write_bytes(five_frames.read_bytes()[:3000])
    text = tmp_path / "notes_master.h5"
    text.write_text("this is not HDF5\n")
    for path, reason in (
        (truncated, "not a readable HDF5 file"),
        (text, "not a readable HDF5 file"),
        (tmp_path / "absent_master.h5", "no such file"),
    ):
        with pytest.raises(DataUnavailable, match=reason):
            EigerReader(str(path))


def test_hdf5_that_is_not_eiger(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["entry/sample/temperature"] = 100.0
    with pytest.raises(UnknownFormat, match="no /entry/data"):
        EigerReader(str(other))


def test_truncated_data_file_is_unavailable_not_fatal(five_frames: Path) -> None:
    data = five_frames.parent / data_file_name("demo", 3)
    data.write_bytes(data.read_bytes()[:2000])
    with EigerReader(str(five_frames)) as reader:
        with pytest.raises(FrameNotFound, match="unreadable"):
            reader.read_frame(5)
        assert reader.read_frame(4).pixels.shape == SMALL


def test_mask_bits(five_frames: Path) -> None:
    with h5py.File(five_frames, "r") as file:
        bits = file[f"{DS}/pixel_mask"][()]
    with EigerReader(str(five_frames)) as reader:
        first, second = reader.read_frame(1), reader.read_frame(2)
    assert first.mask is not None and first.mask is second.mask
    np.testing.assert_array_equal(first.mask.bad, (bits & 0xFF) != 0)
    high_only = (bits & VIRTUAL_BIT != 0) & (bits & 0xFF == 0)
    assert high_only.any() and not first.mask.bad[high_only].any()
    assert first.mask.bad[24:28, :].all() and first.mask.bad[:, 30:33].all()  # module gaps
    assert (first.pixels[first.mask.bad] == first.saturation).all()


def test_missing_mask_means_no_masked_pixels(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, nimages=1, shape=SMALL, with_mask=False)
    with EigerReader(str(master)) as reader:
        assert reader.read_frame(1).mask is None


def test_mask_of_another_shape_is_ignored(five_frames: Path) -> None:
    with h5py.File(five_frames, "r+") as file:
        del file[f"{DS}/pixel_mask"]
        file[f"{DS}/pixel_mask"] = np.zeros((10, 10), dtype=np.uint32)
    with EigerReader(str(five_frames)) as reader:
        assert reader.read_frame(1).mask is None


def test_dcu_1_8_metadata(five_frames: Path) -> None:
    with EigerReader(str(five_frames)) as reader:
        meta = reader.meta()
    assert set(meta) == COMMON_KEYS | DCU_1_8_KEYS | DERIVED_KEYS
    assert meta["software_version"] == "1.8.0"
    assert meta["description"] == "Dectris EIGER2 Si 16M – LS-CAT 21-ID"  # vlen UTF-8
    assert meta["detector_number"] == "E-32-0117"  # vlen ASCII
    assert meta["element"] == "Cu"  # fixed-length UTF-8
    assert (meta["definition"], meta["type"]) == ("NXmx", "EIGER2")
    omega = (10.0 + 0.1 * np.arange(5)).astype(np.float32)
    assert meta["omega"] == [float(value) for value in omega]  # float32 array (bug 14)
    assert meta["omega_range_average"] == float(np.float32(0.1))
    assert meta["data_size"] == [SMALL[1], SMALL[0]]
    assert len(meta["countrate_correction_lookuptable"]) == 32
    assert np.array(meta["countrate_correction_table"]).shape == (2, 8)
    assert (meta["nimages"], meta["ntrigger"], meta["bit_depth_image"]) == (5, 1, 32)
    assert isinstance(meta["nimages"], int) and isinstance(meta["wavelength"], float)
    assert (meta["image_depth"], meta["fn"]) == (4, str(five_frames))


def test_dcu_1_6_metadata(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, nimages=3, frames_per_file=3, shape=SMALL, dcu="1.6")
    with EigerReader(str(master)) as reader:
        meta = reader.meta()
    assert set(meta) == COMMON_KEYS | DCU_1_6_KEYS | DERIVED_KEYS
    assert "omega" not in meta and "definition" not in meta  # in the file, not in the table
    assert meta["software_version"] == "1.6.0"
    assert meta["omega_increment"] == float(np.float32(0.1))
    assert meta["countrate_correction_bunch_mode"] == "continuous"


def test_dcu_1_6_6_master_has_the_16_keys_of_the_1_6_table(tmp_path: Path) -> None:
    # Issue 11: a DCU 1.6.6 master got the 1.8 table and lacked these 16 keys.
    master = write_eiger(tmp_path, nimages=2, frames_per_file=2, shape=SMALL, dcu="1.6.6")
    with EigerReader(str(master)) as reader:
        meta = reader.meta()
    assert meta["software_version"] == "1.6.6"
    assert {
        "calibration_type", "chi_increment", "chi_start", "countrate_correction_bunch_mode",
        "detector_readout_period", "efficiency_correction_applied", "kappa_increment",
        "kappa_start", "nframes_sum", "omega_increment", "omega_start", "phi_increment",
        "phi_start", "summation_nimages", "two_theta_increment", "two_theta_start",
    } == DCU_1_6_KEYS  # fmt: skip
    assert set(meta) == COMMON_KEYS | DCU_1_6_KEYS | DERIVED_KEYS


@pytest.mark.parametrize(
    ("version", "layout"),
    [("1.6.0", "1.6"), ("1.6.6", "1.6"), ("1.7.4", "1.6"), ("1.8.0", "1.8"),
     ("1.8.1", "1.8"), ("1.10.0", "1.8"), ("2.1.0", "1.8")],
)  # fmt: skip
def test_table_follows_the_dcu_version(tmp_path: Path, version: str, layout: str) -> None:
    # Both layouts' datasets are in the file, so only the version can pick the table.
    master = write_eiger(tmp_path, nimages=1, frames_per_file=1, shape=SMALL, dcu=version)
    _add_other_layout(master, layout)
    with EigerReader(str(master)) as reader:
        keys = set(reader.meta())
    assert keys == COMMON_KEYS | DERIVED_KEYS | (DCU_1_6_KEYS if layout == "1.6" else DCU_1_8_KEYS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1.6.6", (1, 6)), (" v1.7.4-rc2", (1, 7)), ("2.1", (2, 1)), (1.8, (1, 8)),
     ("", None), ("unknown", None), ("1", None), (None, None), ([1, 8], None), (True, None)],
)  # fmt: skip
def test_dcu_version_parsing(value: object, expected: tuple[int, int] | None) -> None:
    assert dcu_version(value) == expected
    table = mapping_for(value)
    if expected is None:
        assert table is None
    else:
        assert table is (DCU_1_6 if expected < (1, 8) else DCU_1_8)


@pytest.mark.parametrize("layout", ["1.6", "1.8"])
@pytest.mark.parametrize(
    "version", [None, "unknown", b"\xff\xfe"], ids=["missing", "text", "bytes"]
)
def test_no_usable_version_the_layout_decides(
    tmp_path: Path, layout: str, version: str | bytes | None
) -> None:
    master = write_eiger(tmp_path, nimages=2, frames_per_file=2, shape=SMALL, dcu=layout)
    with h5py.File(master, "r+") as file:
        del file[f"{DS}/software_version"]
        if version is not None:
            file[f"{DS}/software_version"] = np.bytes_(version)
    with EigerReader(str(master)) as reader:
        keys = set(reader.meta())
    own, other = (DCU_1_6_KEYS, DCU_1_8_KEYS) if layout == "1.6" else (DCU_1_8_KEYS, DCU_1_6_KEYS)
    assert own <= keys and not other & keys


def test_no_version_and_neither_layout_takes_the_1_6_table(tmp_path: Path) -> None:
    # The original's choice for anything but "1.8.0": common keys plus whatever 1.6 has.
    master = write_eiger(tmp_path, nimages=1, frames_per_file=1, shape=SMALL, dcu="1.8")
    with h5py.File(master, "r+") as file:
        for name in ("software_version", *DCU_1_8_KEYS):
            for path in (f"{DS}/{name}", *_paths_of(name)):
                if path in file:
                    del file[path]
        file[f"{G}/omega_increment"] = np.float32(0.25)
    with EigerReader(str(master)) as reader:
        meta = reader.meta()
    assert meta["omega_increment"] == 0.25
    assert not DCU_1_8_KEYS & set(meta)


def _paths_of(name: str) -> tuple[str, ...]:
    return DCU_1_8.get(name, ()) + DCU_1_6.get(name, ())


def _add_other_layout(master: Path, layout: str) -> None:
    """Write the other layout's own datasets too (as the compat data generator does)."""
    other = DCU_1_8 if layout == "1.6" else DCU_1_6
    with h5py.File(master, "r+") as file:
        for name, paths in other.items():
            if name not in COMMON and paths[0] not in file:
                file[paths[0]] = np.float32(1.0)


@pytest.mark.skipif(not COMPAT_GENERATOR.exists(), reason="../shared/compat absent")
def test_golden_dcu_1_6_6_meta_matches_the_original(tmp_path: Path) -> None:
    # The compat kit's small_1 master (DCU 1.6.6, both layouts' datasets in the file):
    # every detector key and value the original sent for it, nothing more.
    subprocess.run(
        [sys.executable, str(COMPAT_GENERATOR), str(tmp_path), "--which", "small"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    manifest = json.loads((COMPAT_GENERATOR.parent / "golden" / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == "small_f1_x512")
    master = tmp_path / "small_1_master.h5"
    with EigerReader(str(master)) as reader:
        meta = dict(reader.read_frame(1).meta)
    view_keys = {"n", "mean", "rms", "stddev", "min", "max", "spots", "nSaturated"}
    expected = {k: v for k, v in case["meta"].items() if k not in view_keys}
    expected["fn"] = str(master)
    assert meta == expected


def test_lookup_table_under_either_name(five_frames: Path) -> None:
    with h5py.File(five_frames, "r+") as file:
        file.move(
            f"{DS}/countrate_correction_lookup_table", f"{DS}/countrate_correction_lookuptable"
        )
        del file["/entry/instrument/detector/beam_center_x"]
    with EigerReader(str(five_frames)) as reader:
        meta = reader.meta()
    assert len(meta["countrate_correction_lookuptable"]) == 32
    assert "beam_center_x" not in meta  # missing datasets are skipped


def test_meta_has_frame_only_per_frame(five_frames: Path) -> None:
    with EigerReader(str(five_frames)) as reader:
        assert "frame" not in reader.meta()
        frame = reader.read_frame(4)
    assert frame.meta["frame"] == 4
    assert (frame.meta["first_frame"], frame.meta["last_frame"]) == (1, 5)


@pytest.mark.parametrize(
    ("dtype", "depth", "saturation"), [(np.uint16, 2, 0xFFFF), (np.uint32, 4, 0xFFFFFFFF)]
)
def test_pixel_depths(tmp_path: Path, dtype: type, depth: int, saturation: int) -> None:
    master = write_eiger(tmp_path, nimages=2, shape=SMALL, dtype=dtype, **SMALL_TILING)
    with EigerReader(str(master)) as reader:
        frame = reader.read_frame(2)
    assert frame.pixels.dtype == np.dtype(dtype)
    assert (frame.saturation, frame.meta["image_depth"]) == (saturation, depth)
    assert frame.meta["bit_depth_image"] == 8 * depth
    assert (frame.pixels == saturation).sum() >= 5


def test_unsupported_bit_depth(five_frames: Path) -> None:
    with h5py.File(five_frames, "r+") as file:
        file["/entry/instrument/detector/bit_depth_image"][()] = 8
    with pytest.raises(DataUnavailable, match="image depth 1 bytes"):
        EigerReader(str(five_frames))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_fast_path_matches_h5py(tmp_path: Path, dtype: type) -> None:
    # 600 x 520 x 4 bytes is above the split threshold: the blocks go to two threads.
    master = write_eiger(tmp_path, nimages=3, frames_per_file=3, shape=(600, 520), dtype=dtype)
    with EigerReader(str(master)) as reader:
        assert all(link.direct for link in reader._table._links.values())
        for frame in (1, 2, 3):
            np.testing.assert_array_equal(
                reader.read_frame(frame).pixels, stack_frame(tmp_path, "demo", 1, frame - 1)
            )


@pytest.mark.parametrize(
    "compression",
    [{"compression": "gzip"}, hdf5plugin.LZ4(), hdf5plugin.Bitshuffle(cname="zstd")],
    ids=["gzip", "lz4", "bitshuffle-zstd"],
)
def test_other_layouts_read_through_h5py(
    tmp_path: Path, rng: np.random.Generator, compression: Any
) -> None:
    master = write_eiger(tmp_path, nimages=2, frames_per_file=2, shape=SMALL)
    stack = rng.integers(0, 70_000, size=(2, *SMALL), dtype=np.uint32)
    data = tmp_path / data_file_name("demo", 1)
    with h5py.File(data, "w") as file:
        dataset = file.create_dataset(
            "/entry/data/data", data=stack, chunks=(1, 30, 70), **compression
        )
        dataset.attrs["image_nr_low"], dataset.attrs["image_nr_high"] = 1, 2
    with EigerReader(str(master)) as reader:
        np.testing.assert_array_equal(reader.read_frame(2).pixels, stack[1])
        assert not reader._table._links["data_000001"].direct


def test_fresh_writable_pixels(five_frames: Path) -> None:
    with EigerReader(str(five_frames)) as reader:
        first = reader.read_frame(1).pixels
        first[:] = 0
        again = reader.read_frame(1).pixels
    assert again.flags.writeable and again.any()


def test_reader_shared_between_threads(five_frames: Path) -> None:
    expected = {
        frame: stack_frame(five_frames.parent, "demo", (frame + 1) // 2, (frame + 1) % 2)
        for frame in range(1, 6)
    }
    failures: list[int] = []
    with EigerReader(str(five_frames)) as reader:

        def work(frame: int) -> None:
            for _ in range(5):
                if not np.array_equal(reader.read_frame(frame).pixels, expected[frame]):
                    failures.append(frame)

        threads = [threading.Thread(target=work, args=(frame,)) for frame in expected]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def _read_in_child(master: str, expected_sum: int) -> None:
    """Child process body: exit 0 when frame 1 decodes to the parent's checksum."""
    with EigerReader(master) as reader:
        ok = int(reader.read_frame(1).pixels.sum(dtype=np.uint64)) == expected_sum
    raise SystemExit(0 if ok else 1)


def test_fast_path_survives_fork(tmp_path: Path) -> None:
    # Celery's prefork pool forks workers; an OpenMP decoder used before a fork hangs the
    # child, so the parent decodes first (in threads) and the child must still finish.
    master = write_eiger(tmp_path, nimages=1, shape=(600, 520))
    with EigerReader(str(master)) as reader:
        expected = int(reader.read_frame(1).pixels.sum(dtype=np.uint64))
    child = multiprocessing.get_context("fork").Process(
        target=_read_in_child, args=(str(master), expected)
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("decoding hung in a forked child")
    assert child.exitcode == 0


def test_closed_reader_refuses(five_frames: Path) -> None:
    reader = EigerReader(str(five_frames))
    reader.close()
    reader.close()
    with pytest.raises(DataUnavailable, match="closed"):
        reader.read_frame(1)


def test_frame_count_is_nimages_times_ntrigger(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, nimages=2, ntrigger=3, frames_per_file=4, shape=SMALL)
    with EigerReader(str(master)) as reader:
        assert reader.frame_count == 6
        assert reader.meta()["last_frame"] == 6
        np.testing.assert_array_equal(
            reader.read_frame(6).pixels, stack_frame(tmp_path, "demo", 2, 1)
        )
        with pytest.raises(FrameNotFound, match="beyond the last frame"):
            reader.read_frame(7)


def test_data_file_opened_directly(five_frames: Path) -> None:
    data = five_frames.parent / data_file_name("demo", 2)
    with EigerReader(str(data)) as reader:
        frame = reader.read_frame(4)
    np.testing.assert_array_equal(frame.pixels, stack_frame(five_frames.parent, "demo", 2, 1))
    assert frame.mask is None and frame.meta["image_depth"] == 4


@pytest.mark.skipif(not REAL_DATA_FILE.exists(), reason="shared DECTRIS test data absent")
def test_real_dectris_data_file(tmp_path: Path) -> None:
    master = wrap_real_data_file(tmp_path)
    with EigerReader(str(master)) as reader:
        frame = reader.read_frame(1)
        assert reader._table._links["data_000001"].direct
    with h5py.File(REAL_DATA_FILE, "r") as file:
        expected = file["/entry/data/data"][0]
    assert frame.pixels.shape == REAL_DATA_SHAPE == (2167, 2070)
    np.testing.assert_array_equal(frame.pixels, expected)
    assert frame.mask is not None
    np.testing.assert_array_equal(frame.mask.bad, expected == 0xFFFFFFFF)
    assert frame.mask.count > 100_000
    assert (frame.meta["x_pixels_in_detector"], frame.meta["y_pixels_in_detector"]) == (2070, 2167)


# --- metadata conversion (bug 14) -------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
     np.float16, np.float32, np.float64],
)  # fmt: skip
def test_arrays_of_every_numeric_type(tmp_path: Path, dtype: type) -> None:
    values: npt.NDArray[Any] = np.arange(12).reshape(3, 4).astype(dtype) * np.array(3).astype(dtype)
    path = tmp_path / "values.h5"
    with h5py.File(path, "w") as file:
        file["array"] = values
        file["single"] = values[:1, :1]
        file["scalar"] = values[2, 3]
    with h5py.File(path, "r") as file:
        assert read_value(file, "array") == values.tolist()
        assert read_value(file, "single") == values[0, 0].item()
        assert read_value(file, "scalar") == values[2, 3].item()
        assert type(read_value(file, "scalar")) is (float if values.dtype.kind == "f" else int)


def test_string_and_special_values(tmp_path: Path) -> None:
    path = tmp_path / "strings.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("vlen_list", data=["α", "b"], dtype=h5py.string_dtype())
        file.create_dataset("fixed_ascii", data=np.bytes_(b"exts"))
        file.create_dataset("bad_utf8", data=np.bytes_(b"\xff\xfeok"))
        file["nan"] = np.array([1.0, np.nan], dtype=np.float32)
        file["flags"] = np.array([True, False])
        file["compound"] = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
    with h5py.File(path, "r") as file:
        assert read_value(file, "vlen_list") == ["α", "b"]
        assert read_value(file, "fixed_ascii") == "exts"
        assert read_value(file, "bad_utf8").endswith("ok")
        assert read_value(file, "nan") == [1.0, None]
        assert read_value(file, "flags") == [True, False]
        assert read_value(file, "compound") is SKIP  # no JSON form
        assert read_value(file, "absent") is SKIP


# --- bslz4 codec ----------------------------------------------------------------------------


def bslz4_chunk(frame: npt.NDArray[Any], tmp_path: Path) -> bytes:
    """The raw chunk h5py + hdf5plugin write for ``frame`` (the detector's format)."""
    path = tmp_path / "chunk.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset(
            "d", data=frame[None], chunks=(1, *frame.shape), **hdf5plugin.Bitshuffle(cname="lz4")
        )
    with h5py.File(path, "r") as file:
        return bytes(file["d"].id.read_direct_chunk((0, 0, 0))[1])


@pytest.mark.parametrize("shape", [(1, 13), (7, 11), (517, 1031), (1024, 1024)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decompress_any_size_and_thread_count(
    tmp_path: Path, rng: np.random.Generator, shape: tuple[int, int], threads: int
) -> None:
    frame = rng.integers(0, 2**20, size=shape, dtype=np.uint32)
    chunk = bslz4_chunk(frame, tmp_path)
    np.testing.assert_array_equal(bslz4.decompress(chunk, shape, np.uint32, threads=threads), frame)


@pytest.mark.parametrize("cut", [4, 12, 20, 5000, -1])
def test_corrupt_chunks_raise(tmp_path: Path, rng: np.random.Generator, cut: int) -> None:
    frame = rng.integers(0, 1000, size=(300, 300), dtype=np.uint32)
    chunk = bslz4_chunk(frame, tmp_path)
    with pytest.raises(DataUnavailable, match="bslz4"):
        bslz4.decompress(chunk[:cut], frame.shape, np.uint32, threads=2)


def test_corrupt_block_content_raises(tmp_path: Path, rng: np.random.Generator) -> None:
    frame = rng.integers(0, 1000, size=(300, 300), dtype=np.uint32)
    chunk = bytearray(bslz4_chunk(frame, tmp_path))
    chunk[16:40] = b"\xff" * 24  # inside the first LZ4 block, lengths left intact
    with pytest.raises(DataUnavailable, match="bslz4"):
        bslz4.decompress(bytes(chunk), frame.shape, np.uint32)


def test_header_must_match_frame(tmp_path: Path, rng: np.random.Generator) -> None:
    frame = rng.integers(0, 1000, size=(40, 40), dtype=np.uint16)
    chunk = bslz4_chunk(frame, tmp_path)
    with pytest.raises(DataUnavailable, match="the frame needs"):
        bslz4.decompress(chunk, (40, 41), np.uint16)
    bad_block = struct.pack(">QI", frame.nbytes, 6) + chunk[12:]
    with pytest.raises(DataUnavailable, match="block size"):
        bslz4.decompress(bad_block, frame.shape, np.uint16)
