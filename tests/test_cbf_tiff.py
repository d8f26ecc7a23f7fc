"""Pilatus CBF and generic TIFF readers: Appendix A metadata, masked flags, bad input."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import tifffile
from fabio.cbfimage import CbfImage

from istasks.core.readers.base import FrameReader
from istasks.core.readers.cbf import CbfReader
from istasks.core.readers.tiff import TiffReader
from istasks.errors import DataUnavailable, UnknownFormat
from ops.testdata import cbf as cbfdata
from ops.testdata.cbf import cbf_pixels, module_gaps, write_cbf

SHAPE = (430, 990)  # two module rows and two module columns of the 6M layout


def _cbf(path: Path) -> CbfReader:
    return CbfReader(str(path))


def _tiff(path: Path) -> TiffReader:
    return TiffReader(str(path))


# -- CBF --------------------------------------------------------------------------------


def test_cbf_meta_from_the_mini_header(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=SHAPE)
    with closing(_cbf(path)) as reader:
        assert isinstance(reader, FrameReader)
        assert reader.frame_count == 1
        meta = reader.meta()
    beam_x, beam_y = cbfdata.beam_centre_px(SHAPE)
    assert meta == {
        "detector": cbfdata.DETECTOR_NAME,
        "comment": "LS-CAT APS Sector 21",
        "x_pixels_in_detector": SHAPE[1],
        "y_pixels_in_detector": SHAPE[0],
        "image_depth": 4,
        "x_pixel_size": pytest.approx(172e-6),
        "y_pixel_size": pytest.approx(172e-6),
        "detector_distance": pytest.approx(cbfdata.DETECTOR_DISTANCE_M),
        "beam_center_x": pytest.approx(beam_x),
        "beam_center_y": pytest.approx(beam_y),
        "startPhi": pytest.approx(cbfdata.START_ANGLE_DEG),
        "rotationRange": pytest.approx(cbfdata.ANGLE_INCREMENT_DEG),
        "integrationTime": pytest.approx(cbfdata.EXPOSURE_TIME_S),
        "wavelength": pytest.approx(cbfdata.WAVELENGTH_A),
        "photon_energy": pytest.approx(12398.4193 / cbfdata.WAVELENGTH_A),
        "fn": str(path),
        "first_frame": 1,
        "last_frame": 1,
    }


def test_cbf_negative_flags_are_masked_not_huge(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=SHAPE, seed=3)
    written = cbf_pixels(SHAPE, seed=3)
    with closing(_cbf(path)) as reader:
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == np.dtype(np.uint32)
    assert frame.saturation == 0xFFFFFFFF
    assert frame.mask is not None
    negative = written < 0
    np.testing.assert_array_equal(frame.mask.bad, negative)
    assert frame.mask.count == int(np.count_nonzero(module_gaps(SHAPE))) + 5
    assert int(frame.pixels[negative].max()) == 0
    np.testing.assert_array_equal(frame.pixels[~negative], written[~negative])
    assert int(frame.pixels.max()) < 2**20  # no -1 read as 4294967295
    assert (frame.meta["frame"], frame.meta["first_frame"], frame.meta["last_frame"]) == (1, 1, 1)
    frame.pixels[:] = 7  # fresh and writable
    json.dumps(frame.meta, allow_nan=False)


def test_cbf_without_negative_pixels_has_no_mask(tmp_path: Path) -> None:
    counts = np.abs(cbf_pixels((60, 80)))  # smaller than a module: no gaps; no bad pixels
    path = tmp_path / "x.cbf"
    CbfImage(data=counts, header={}).write(str(path))
    with closing(_cbf(path)) as reader:
        frame = reader.read_frame(1)
    assert frame.mask is None
    np.testing.assert_array_equal(frame.pixels, counts)


def test_cbf_header_oddities_drop_only_their_keys(tmp_path: Path) -> None:
    header = "\r\n".join(
        [
            "# Weird",  # one word: fabio's own CBF reader raises IndexError here
            "# Pixel_size 172e-6 m x",  # one number where two are needed
            "# Exposure_time fast s",
            "# Wavelength 0.0 A",
            "# Beam_xy (12.5, 7.25) pixels",
            "# Angle_increment",
            "# Omega_increment 0.1 deg.",
        ]
    )
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30), header=header)
    with closing(_cbf(path)) as reader:
        meta = reader.meta()
        frame = reader.read_frame(1)
    assert meta["detector"] == "PILATUS3X 6M"
    assert (meta["beam_center_x"], meta["beam_center_y"]) == (12.5, 7.25)
    assert meta["rotationRange"] == pytest.approx(0.1)
    assert meta["wavelength"] == 0.0
    for absent in ("x_pixel_size", "integrationTime", "detector_distance", "photon_energy"):
        assert absent not in meta
    assert frame.pixels.shape == (40, 30)
    json.dumps(meta, allow_nan=False)


def test_cbf_without_mini_header_defaults_beam_centre_to_image_centre(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30), header="")
    with closing(_cbf(path)) as reader:
        meta = reader.meta()
    assert (meta["beam_center_x"], meta["beam_center_y"]) == (15.0, 20.0)
    assert (meta["detector"], meta["image_depth"]) == ("PILATUS3X 6M", 4)


def test_truncated_cbf_is_unavailable(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=SHAPE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with closing(_cbf(path)) as reader, pytest.raises(DataUnavailable, match="truncated"):
        reader.read_frame(1)


def test_cbf_cut_in_its_header_is_unavailable(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30))
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"--CIF-BINARY-FORMAT-SECTION--") + 40])
    with pytest.raises(DataUnavailable):
        _cbf(path)


def test_cbf_with_impossible_dimensions_is_unavailable(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30))
    data = path.read_bytes().replace(
        b"X-Binary-Size-Second-Dimension: 40", b"X-Binary-Size-Second-Dimension: 99999999"
    )
    path.write_bytes(data)
    with closing(_cbf(path)) as reader, pytest.raises(DataUnavailable, match="dimensions"):
        reader.read_frame(1)


def test_cbf_with_other_compression_is_unknown_format(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30))
    path.write_bytes(path.read_bytes().replace(b"x-CBF_BYTE_OFFSET", b"x-CBF_PACKED"))
    with pytest.raises(UnknownFormat, match="x-CBF_PACKED"):
        _cbf(path)


def test_cbf_with_garbage_pixels_does_not_crash(tmp_path: Path) -> None:
    path = write_cbf(tmp_path / "x.cbf", shape=(40, 30))
    data = bytearray(path.read_bytes())
    start = data.index(b"\x0c\x1a\x04\xd5") + 4
    data[start : start + 1200] = np.random.default_rng(1).bytes(1200)
    path.write_bytes(bytes(data))
    with closing(_cbf(path)) as reader:
        try:
            frame = reader.read_frame(1)
        except DataUnavailable:
            return
    assert frame.pixels.shape == (40, 30)


def test_reading_after_close_is_unavailable(tmp_path: Path) -> None:
    cbf_reader = _cbf(write_cbf(tmp_path / "x.cbf", shape=(40, 30)))
    tifffile.imwrite(tmp_path / "x.tif", np.ones((8, 8), dtype=np.uint16))
    tiff_reader = _tiff(tmp_path / "x.tif")
    for reader in (cbf_reader, tiff_reader):
        reader.close()
        reader.close()  # idempotent
        with pytest.raises(DataUnavailable):
            reader.read_frame(1)


def test_non_cbf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.cbf"
    path.write_bytes(b"data_x\n_array_data.data\n")
    with pytest.raises(UnknownFormat, match="###CBF"):
        _cbf(path)


# -- generic TIFF -----------------------------------------------------------------------


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(
    ("dtype", "depth", "out"),
    [(np.uint8, 2, np.uint16), (np.uint16, 2, np.uint16), (np.uint32, 4, np.uint32)],
)
def test_tiff_meta_and_pixels(
    tmp_path: Path,
    byteorder: Literal["<", ">"],
    dtype: type[np.unsignedinteger[Any]],
    depth: int,
    out: type,
) -> None:
    data = np.random.default_rng(5).integers(0, np.iinfo(dtype).max, (30, 50), dtype=dtype)
    path = tmp_path / "monitor.tif"
    tifffile.imwrite(path, data, byteorder=byteorder)
    with closing(_tiff(path)) as reader:
        assert isinstance(reader, FrameReader)
        meta = reader.meta()
        frame = reader.read_frame(4)
    assert meta == {
        "x_pixels_in_detector": 50,
        "y_pixels_in_detector": 30,
        "image_depth": depth,
        "beam_center_x": 25.0,
        "beam_center_y": 15.0,
        "fn": str(path),
        "first_frame": 1,
        "last_frame": 1,
    }
    assert frame.pixels.dtype == np.dtype(out)
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.mask is None
    assert frame.saturation == (0xFFFF if depth == 2 else 0xFFFFFFFF)
    assert frame.meta["frame"] == 1
    frame.pixels[0, 0] = 1  # writable


def test_signed_tiff_negatives_are_masked(tmp_path: Path) -> None:
    data = np.arange(-6, 30, dtype=np.int32).reshape(6, 6)
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, data, byteorder=">")
    with closing(_tiff(path)) as reader:
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == np.dtype(np.uint32)
    assert frame.mask is not None
    np.testing.assert_array_equal(frame.mask.bad, data < 0)
    np.testing.assert_array_equal(frame.pixels, np.maximum(data, 0))


@pytest.mark.parametrize(
    "data",
    [np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8, 3), dtype=np.uint8)],
    ids=["float", "rgb"],
)
def test_unsupported_tiff_images_are_unknown_format(tmp_path: Path, data: np.ndarray) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(UnknownFormat):
        _tiff(path)


def test_truncated_tiff_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.ones((200, 200), dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:30000])
    with closing(_tiff(path)) as reader:
        assert reader.meta()["x_pixels_in_detector"] == 200  # the IFD is intact
        with pytest.raises(DataUnavailable, match="failed to read"):
            reader.read_frame(1)


def test_garbage_after_tiff_magic_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_bytes(b"MM\0*" + b"\x00\x00\x00\x08" + b"\xff" * 64)
    with pytest.raises(DataUnavailable):
        _tiff(path)
