"""Formats read through fabio: SMV (ADSC), MAR345, Bruker, EDF, written by fabio's writers.

Detection by content (the extension never matters), pixels as our uint16/uint32 with the
writers' flags masked and saturation mapped to our marker, metadata under the Eiger and
MarCCD names and units, and bad input refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from istasks.core.readers import detect_format, open_reader
from istasks.core.readers.base import FrameReader
from istasks.core.readers.detect import fabio_format
from istasks.core.readers.fabio_formats import FabioReader, format_meta, to_unsigned
from istasks.core.view import reduce_frame
from istasks.errors import DataUnavailable, FrameNotFound, UnknownFormat
from istasks.jobs import view_params
from ops.testdata.fabio_files import (
    GEOMETRY,
    SMV_SATURATION,
    pattern,
    write_bruker100,
    write_edf,
    write_mar345,
    write_raxis,
    write_smv,
)

SHAPE = (300, 320)
Writer = Callable[[Path, npt.NDArray[Any]], Path]


def _geometry_meta(with_pixel: bool = True, with_rotation: bool = True) -> dict[str, Any]:
    g = GEOMETRY
    meta: dict[str, Any] = {
        "wavelength": pytest.approx(g["wavelength"]),
        "photon_energy": pytest.approx(12398.4193 / g["wavelength"]),
        "detector_distance": pytest.approx(g["detector_distance"]),
        "beam_center_x": pytest.approx(g["beam_center_x"]),
        "beam_center_y": pytest.approx(g["beam_center_y"]),
        "count_time": pytest.approx(g["count_time"]),
    }
    if with_pixel:
        meta["x_pixel_size"] = meta["y_pixel_size"] = pytest.approx(g["pixel_size"], rel=1e-3)
    if with_rotation:
        meta["startPhi"] = pytest.approx(g["startPhi"])
        meta["rotationRange"] = pytest.approx(g["rotationRange"])
    return meta


@pytest.mark.parametrize(
    ("writer", "name", "depth", "detector"),
    [
        (write_smv, "image.img", 2, "SMV"),
        (write_mar345, "image.mar2300", 4, "MAR345"),
        (write_bruker100, "image.sfrm", 4, "Bruker v100"),
        (write_raxis, "image.osc", 2, "R-AXIS"),
    ],
)
def test_meta_in_our_names_and_units(
    tmp_path: Path, writer: Writer, name: str, depth: int, detector: str
) -> None:
    path = writer(tmp_path / name, pattern(SHAPE))
    assert detect_format(str(path)) == "fabio"
    with closing(open_reader(str(path))) as reader:
        assert isinstance(reader, FabioReader)
        assert isinstance(reader, FrameReader)
        assert reader.frame_count == 1
        meta = reader.meta()
    assert meta == {
        "detector": detector,
        "x_pixels_in_detector": SHAPE[1],
        "y_pixels_in_detector": SHAPE[0],
        "image_depth": depth,
        **_geometry_meta(),
        "fn": str(path),
        "first_frame": 1,
        "last_frame": 1,
    }


@pytest.mark.parametrize(
    ("writer", "name", "top"),
    [
        (write_mar345, "image.mar3450", 2**20),  # > 65535: MAR345's overflow records
        (write_bruker100, "image.sfrm", 2**20),  # > 65535: Bruker's overflow tables
        (write_smv, "image.img", SMV_SATURATION - 1),
    ],
)
def test_pixels_are_the_written_counts(tmp_path: Path, writer: Writer, name: str, top: int) -> None:
    counts = pattern(SHAPE, seed=3, top=top)
    counts[10, 10:20] = top  # the brightest values the format holds, not saturated
    path = writer(tmp_path / name, counts)
    with closing(open_reader(str(path))) as reader:
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == (np.uint16 if top < 0x10000 else np.uint32)
    assert frame.pixels.flags.writeable
    np.testing.assert_array_equal(frame.pixels, counts)
    assert frame.mask is None
    assert frame.meta["frame"] == 1


def test_raxis_photomultiplier_encoding_is_decoded(tmp_path: Path) -> None:
    counts = pattern(SHAPE, top=30000)
    counts[4, 4:8] = [40000, 80000, 262136, 32768]  # top bit set: value * ratio (8)
    path = write_raxis(tmp_path / "x.osc", counts)
    with closing(open_reader(str(path))) as reader:
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == np.uint32
    np.testing.assert_array_equal(frame.pixels, counts)


def test_smv_saturated_value_becomes_our_marker(tmp_path: Path) -> None:
    counts = pattern(SHAPE, top=SMV_SATURATION - 1)
    counts[5, 5] = SMV_SATURATION
    counts[6, 6] = 65000
    path = write_smv(tmp_path / "sat.img", counts)
    with closing(open_reader(str(path))) as reader:
        frame = reader.read_frame(1)
    assert frame.saturation == 0xFFFF
    assert frame.pixels[5, 5] == frame.pixels[6, 6] == 0xFFFF
    assert int((frame.pixels == 0xFFFF).sum()) == 2
    reduced = reduce_frame(frame, view_params({"type": "jpeg", "fn": "x", "xsize": SHAPE[1]}))
    assert reduced.meta["nSaturated"] >= 1


def test_second_read_decodes_again(tmp_path: Path) -> None:
    counts = pattern(SHAPE)
    path = write_smv(tmp_path / "x.img", counts)
    with closing(open_reader(str(path))) as reader:
        first = reader.read_frame(1)
        first.pixels[:] = 0  # the pipeline owns (and zeroes) what it is handed
        second = reader.read_frame(1)
    np.testing.assert_array_equal(second.pixels, counts)


def test_extension_is_never_consulted(tmp_path: Path) -> None:
    path = write_smv(tmp_path / "x.img", pattern(SHAPE))
    renamed = path.rename(tmp_path / "x_master.h5")
    assert detect_format(str(renamed)) == "fabio"


def test_float_edf_negatives_and_nan_are_masked(tmp_path: Path) -> None:
    values = pattern(SHAPE).astype(np.float32) + 0.4
    values[0, 0], values[1, 1], values[2, 2] = -1.0, np.nan, -np.inf
    values[4, 4] = np.inf
    values[3, 3] = 1e12  # beyond uint32: saturated
    path = write_edf(tmp_path / "x.edf", [values])
    with closing(open_reader(str(path))) as reader:
        assert reader.meta()["image_depth"] == 4
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == np.uint32
    assert frame.mask is not None
    assert set(zip(*np.nonzero(frame.mask.bad), strict=True)) == {(0, 0), (1, 1), (2, 2)}
    assert frame.pixels[0, 0] == frame.pixels[1, 1] == frame.pixels[2, 2] == 0
    assert frame.pixels[3, 3] == frame.pixels[4, 4] == 0xFFFFFFFF
    assert frame.pixels[50, 60] == round(float(values[50, 60]))


def test_signed_16_bit_edf_flags_are_masked_zeros(tmp_path: Path) -> None:
    values = pattern(SHAPE, top=30000).astype(np.int16)
    values[7, :] = -1
    path = write_edf(tmp_path / "x.edf", [values])
    with closing(open_reader(str(path))) as reader:
        frame = reader.read_frame(1)
    assert frame.pixels.dtype == np.uint16
    assert frame.mask is not None and frame.mask.count == SHAPE[1]
    assert not frame.pixels[7].any()
    np.testing.assert_array_equal(frame.pixels[8:], values[8:])


def test_multi_frame_edf(tmp_path: Path) -> None:
    frames = [pattern(SHAPE, seed=n).astype(np.uint16) for n in range(3)]
    path = write_edf(tmp_path / "x.edf", frames)
    with closing(open_reader(str(path))) as reader:
        assert reader.frame_count == 3
        assert reader.meta()["last_frame"] == 3
        for number in (2, 3, 1, 2):
            np.testing.assert_array_equal(reader.read_frame(number).pixels, frames[number - 1])
        with pytest.raises(FrameNotFound):
            reader.read_frame(4)
        with pytest.raises(FrameNotFound):
            reader.read_frame(0)


def test_smv_beam_centre_axes_follow_adsc(tmp_path: Path) -> None:
    """ADSC's BEAM_CENTER_X runs along the slow axis (dxtbx FormatSMVADSC)."""
    meta = format_meta(
        "dtrek", {"PIXEL_SIZE": "0.1", "BEAM_CENTER_X": "20", "BEAM_CENTER_Y": "30"}, (1, 1)
    )
    assert meta["beam_center_x"] == pytest.approx(300)
    assert meta["beam_center_y"] == pytest.approx(200)


def test_header_oddities_drop_only_their_keys() -> None:
    header = {"WAVELENGTH": "n/a", "DISTANCE": "nan", "PIXEL_SIZE": "0", "TIME": "2.5 s"}
    assert format_meta("dtrek", header, (10, 10)) == {"count_time": 2.5}
    assert format_meta("edf", {"anything": "1"}, (10, 10)) == {}


@pytest.mark.parametrize(
    "head",
    [b"{\nHEADER_BYTES=  512;\n", b"R-AXIS4   ", b"FORMAT :100", b"\xd2\x04\x00\x00", b"{\r\nEDF_"],
)
def test_fabio_magic_numbers_are_recognised(head: bytes) -> None:
    assert fabio_format(head.ljust(64, b" ")) is not None


@pytest.mark.parametrize(
    "head", [b"\xff\xd8\xff\xe0JFIF", b"\0" * 64, b"###CBF: VERSION", b"II*\0\x08\0", b"hello"]
)
def test_pictures_own_formats_and_zeros_are_not_fabios(head: bytes) -> None:
    assert fabio_format(head.ljust(64, b"\0")) is None


@pytest.mark.parametrize(
    "content",
    [b'{"json": "is not EDF"}', b"{\nHEADER_BYTES=  512;\nDIM=2;\n}", b"R-AXIS" + b"\1" * 100],
    ids=["json", "smv-header-only", "raxis-garbage"],
)
def test_lookalikes_and_truncated_files_are_refused_clearly(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(content)
    assert detect_format(str(path)) == "fabio"
    with pytest.raises(UnknownFormat, match="starts like fabio's"):
        open_reader(str(path))


def test_truncated_smv_pixels_are_refused(tmp_path: Path) -> None:
    path = write_smv(tmp_path / "x.img", pattern(SHAPE))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataUnavailable), closing(open_reader(str(path))) as reader:
        reader.read_frame(1)


def test_fifo_never_reaches_fabio(tmp_path: Path) -> None:
    fifo = tmp_path / "x.img"
    os.mkfifo(fifo)
    with pytest.raises(DataUnavailable, match="FIFO"):
        FabioReader(str(fifo))


def test_to_unsigned_clips_wide_integers() -> None:
    values = np.array([[-5, 0, 2**40]], dtype=np.int64)
    pixels, mask = to_unsigned(values, 4, None)
    assert pixels.tolist() == [[0, 0, 0xFFFFFFFF]]
    assert mask is not None and mask.bad.tolist() == [[True, False, False]]


def _edf_header(dim: int, size: int) -> bytes:
    text = (
        f"{{\nEDF_DataBlockID = 0.Image.Psd ;\nEDF_BinarySize = {size} ;\n"
        f"EDF_HeaderSize = 512 ;\nByteOrder = LowByteFirst ;\nDataType = UnsignedShort ;\n"
        f"Dim_1 = {dim} ;\nDim_2 = {dim} ;\nSize = {size} ;\n}}\n"
    )
    return text.encode().ljust(1024, b"\0")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (_edf_header(200_000, 80_000_000_000), "exceeds the limit"),
        (b"{\nHEADER_BYTES=  512;\nDIM=2;\nSIZE1=200000;\nSIZE2=200000;\n}".ljust(1024), "limit"),
    ],
    ids=["edf", "smv"],
)
def test_headers_claiming_huge_frames_are_refused_before_allocating(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(content)
    with pytest.raises(DataUnavailable, match=match):
        open_reader(str(path))
