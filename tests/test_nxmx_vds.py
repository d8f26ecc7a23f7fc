"""NXmx masters written by nexgen: virtual datasets, data_NNNNNN links, or both.

The masters come from Diamond's own writer (nexgen, a dev dependency) at test time; the
data files are laid out as Diamond's Odin writer does (bslz4, ``/data``). A missing data
file must surface as FrameNotFound for its frames only, never as a frame of fill values.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import pytest

from istasks.core.readers import detect_format, open_reader
from istasks.errors import FrameNotFound
from ops.testdata import nxmx
from ops.testdata.nxmx import gap_rows_cols, nxmx_frame, write_nxmx, write_odin_data_file

SHAPE = (16, 12)
FRAMES = 2100  # three data files: 1000 + 1000 + 100 frames


def _expected(number: int, dtype: npt.DTypeLike = np.int32) -> npt.NDArray[np.integer]:
    """Frame ``number`` as the reader must give it: gaps zeroed."""
    frame = nxmx_frame(number, SHAPE, dtype).astype(np.int64)
    frame[gap_rows_cols(SHAPE)] = 0
    return frame


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One nexgen master per layout, with all data files."""
    found = {}
    for layout in ("both", "links", "vds"):
        directory = tmp_path_factory.mktemp(layout)
        found[layout] = write_nxmx(directory, frames=FRAMES, shape=SHAPE, layout=layout)
    return found


@pytest.mark.parametrize("layout", ["both", "links", "vds"])
def test_every_layout_reads_every_file(masters: dict[str, Path], layout: str) -> None:
    master = masters[layout]
    assert detect_format(str(master)) == "eiger"
    with closing(open_reader(str(master))) as reader:
        assert reader.frame_count == FRAMES
        for number in (1, 999, 1000, 1001, 2000, 2001, FRAMES):
            frame = reader.read_frame(number)
            assert frame.pixels.dtype == np.uint32
            np.testing.assert_array_equal(frame.pixels, _expected(number))
            assert frame.mask is not None
            np.testing.assert_array_equal(frame.mask.bad, gap_rows_cols(SHAPE))
            assert frame.meta["frame"] == number
        with pytest.raises(FrameNotFound, match="beyond the last frame"):
            reader.read_frame(FRAMES + 1)


def test_meta_under_the_eiger_names(masters: dict[str, Path]) -> None:
    with closing(open_reader(str(masters["both"]))) as reader:
        meta = reader.meta()
    assert meta["wavelength"] == pytest.approx(nxmx.WAVELENGTH_A)
    assert meta["detector_distance"] == pytest.approx(nxmx.DISTANCE_M)
    assert meta["x_pixel_size"] == meta["y_pixel_size"] == pytest.approx(nxmx.PIXEL_SIZE_M)
    assert meta["count_time"] == pytest.approx(nxmx.COUNT_TIME_S)
    assert meta["beam_center_x"] == pytest.approx(SHAPE[1] / 2 + 1.5)
    assert meta["beam_center_y"] == pytest.approx(SHAPE[0] / 2 - 2.25)
    assert (meta["x_pixels_in_detector"], meta["y_pixels_in_detector"]) == (SHAPE[1], SHAPE[0])
    assert meta["image_depth"] == 4
    assert (meta["first_frame"], meta["last_frame"]) == (1, FRAMES)


def test_vds_offset_starts_inside_the_first_file(tmp_path: Path) -> None:
    """mx-bluesky skips the first images with nexgen's vds_offset: the VDS is the truth."""
    master = write_nxmx(tmp_path, frames=FRAMES, shape=SHAPE, vds_offset=5)
    with closing(open_reader(str(master))) as reader:
        assert reader.frame_count == FRAMES - 5
        np.testing.assert_array_equal(reader.read_frame(1).pixels, _expected(6))
        np.testing.assert_array_equal(reader.read_frame(996).pixels, _expected(1001))
        np.testing.assert_array_equal(reader.read_frame(FRAMES - 5).pixels, _expected(FRAMES))


@pytest.mark.parametrize("layout", ["both", "vds"])
def test_missing_data_files_are_missing_frames_not_fill_values(tmp_path: Path, layout: str) -> None:
    master = write_nxmx(tmp_path, frames=FRAMES, shape=SHAPE, layout=layout, data=False)
    vds_path = master if layout == "both" else tmp_path / "xtal_1_vds.h5"
    with h5py.File(vds_path, "r") as file:  # what a plain h5py read serves: fill values
        vds = file["/entry/data/data" if layout == "both" else "data"]
        assert vds.is_virtual
        assert (vds[0] == -1).all()
    with closing(open_reader(str(master))) as reader:
        assert reader.frame_count == FRAMES
        assert reader.meta()["image_depth"] == 4  # from the VDS's type
        with pytest.raises(FrameNotFound, match=r"xtal_1_000001\.h5\): data file missing"):
            reader.read_frame(1)
        with pytest.raises(FrameNotFound, match=r"xtal_1_000003\.h5\): data file missing"):
            reader.read_frame(FRAMES)


def test_one_missing_file_hides_only_its_frames_until_it_appears(tmp_path: Path) -> None:
    master = write_nxmx(tmp_path, frames=FRAMES, shape=SHAPE)
    second = tmp_path / "xtal_1_000002.h5"
    second.unlink()
    with closing(open_reader(str(master))) as reader:
        np.testing.assert_array_equal(reader.read_frame(1000).pixels, _expected(1000))
        with pytest.raises(FrameNotFound, match=r"xtal_1_000002\.h5"):
            reader.read_frame(1001)
        np.testing.assert_array_equal(reader.read_frame(2001).pixels, _expected(2001))
        write_odin_data_file(second, [nxmx_frame(n, SHAPE) for n in range(1001, 2001)])
        np.testing.assert_array_equal(reader.read_frame(1500).pixels, _expected(1500))


def test_signed_16_bit_gaps_are_masked(tmp_path: Path) -> None:
    master = write_nxmx(tmp_path, frames=3, shape=SHAPE, dtype=np.int16)
    with closing(open_reader(str(master))) as reader:
        assert reader.meta()["image_depth"] == 2
        frame = reader.read_frame(2)
    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels, _expected(2, np.int16))
    assert frame.mask is not None and frame.mask.count == int(gap_rows_cols(SHAPE).sum())
    assert frame.saturation == 0xFFFF


def _tiled_master(directory: Path, frames: int) -> Path:
    """A VDS tiling two half-detector files per frame (as nexgen's Jungfrau layout)."""
    half = (SHAPE[0] // 2, SHAPE[1])
    layout = h5py.VirtualLayout(shape=(frames, *SHAPE), dtype=np.int32)
    for index, name in enumerate(("top.h5", "bottom.h5")):
        stack = [
            nxmx_frame(n, SHAPE)[index * half[0] : (index + 1) * half[0]]
            for n in range(1, frames + 1)
        ]
        with h5py.File(directory / name, "w") as file:
            file["data"] = np.stack(stack)
        source = h5py.VirtualSource(name, "data", shape=(frames, *half))
        layout[:, index * half[0] : (index + 1) * half[0], :] = source
    master = directory / "tiled.nxs"
    with h5py.File(master, "w") as file:
        group = file.create_group("entry/data")
        group.create_virtual_dataset("data", layout, fillvalue=-1)
    return master


def test_tiled_vds_is_read_through_hdf5_after_checking_its_files(tmp_path: Path) -> None:
    master = _tiled_master(tmp_path, frames=4)
    with closing(open_reader(str(master))) as reader:
        assert reader.frame_count == 4
        np.testing.assert_array_equal(reader.read_frame(3).pixels, _expected(3))
    (tmp_path / "bottom.h5").unlink()
    with closing(open_reader(str(master))) as reader, pytest.raises(FrameNotFound, match="bottom"):
        reader.read_frame(3)


def test_plain_data_beside_links_is_not_counted_twice(tmp_path: Path) -> None:
    """A master holding ``data`` (not virtual) and ``data_000001`` reads the links only."""
    master = write_nxmx(tmp_path, frames=5, shape=SHAPE, layout="links")
    with h5py.File(master, "r+") as file:
        file["/entry/data/data"] = np.stack([nxmx_frame(n, SHAPE) for n in range(1, 6)])
    with closing(open_reader(str(master))) as reader:
        assert reader.frame_count == 5
        np.testing.assert_array_equal(reader.read_frame(5).pixels, _expected(5))
