"""Rayonix / MarCCD TIFF reader: spec 5.3 metadata in either byte order, pixels, errors."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import tifffile

from istasks.core.readers.base import FrameReader
from istasks.core.readers.rayonix import RayonixReader
from istasks.errors import DataUnavailable, UnknownFormat
from ops.testdata.marccd import (
    HEADER_FIELDS,
    HEADER_OFFSET,
    marccd_header_values,
    marccd_pixels,
    write_marccd,
)

SHARED_TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
REAL_MARCCD = SHARED_TESTDATA / "marccd165_Ge_blanc_0000.mccd"
COMMENT = "detector='Rayonix MX-300' LS_CAT_Beamline='21-ID-D'"
SIZE = 96

ORDERS = [("<", None), (">", None), ("<", ">"), (">", "<")]
ORDER_IDS = ["le", "be", "le-tiff-be-header", "be-tiff-le-header"]


def _open(path: Path) -> RayonixReader:
    return RayonixReader(str(path))


def _raw(path: Path, name: str, order: str) -> int:
    """A header field read straight from the file, independent of the reader."""
    offset, code = HEADER_FIELDS[name]
    with path.open("rb") as handle:
        handle.seek(HEADER_OFFSET + offset)
        value: int = struct.unpack(order + code, handle.read(struct.calcsize(code)))[0]
    return value


@pytest.mark.parametrize(("byteorder", "header_order"), ORDERS, ids=ORDER_IDS)
def test_meta_names_and_conversions(
    tmp_path: Path, byteorder: str, header_order: str | None
) -> None:
    path = write_marccd(
        tmp_path / "x.mccd", size=SIZE, byteorder=byteorder, header_byteorder=header_order
    )
    raw = marccd_header_values(SIZE, COMMENT)
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["detector_distance"] == pytest.approx(raw["xtal_to_detector"] / 1e6)  # type: ignore[operator]
    assert meta["detector_distance"] == pytest.approx(0.25)
    assert meta["beam_center_x"] == pytest.approx(SIZE / 2 + 3.25)
    assert meta["beam_center_y"] == pytest.approx(SIZE / 2 - 1.5)
    assert meta["integrationTime"] == pytest.approx(1.0)
    assert meta["exposureTime"] == pytest.approx(1.0)
    assert meta["readoutTime"] == pytest.approx(0.12)
    assert meta["startPhi"] == pytest.approx(45.0)
    assert meta["rotationRange"] == pytest.approx(0.5)
    assert meta["x_pixel_size"] == pytest.approx(round(300e6 / SIZE) / 1e9)
    assert meta["y_pixel_size"] == meta["x_pixel_size"]
    assert meta["wavelength"] == pytest.approx(0.97872)
    assert meta["photon_energy"] == pytest.approx(12398.4193 / 0.97872)
    assert (meta["x_pixels_in_detector"], meta["y_pixels_in_detector"]) == (SIZE, SIZE)
    assert meta["image_depth"] == 2
    assert meta["saturation"] == 0xFFFF
    assert (meta["filename"], meta["filepath"]) == ("lyso_1_00001.mccd", "/pf/esaf12345/lysozyme")
    assert meta["comment"] == COMMENT
    assert (meta["detector"], meta["beamline"]) == ("Rayonix MX-300", "21-ID-D")
    assert (meta["first_frame"], meta["last_frame"], meta["fn"]) == (1, 1, str(path))
    assert "frame" not in meta


@pytest.mark.parametrize(("byteorder", "header_order"), ORDERS, ids=ORDER_IDS)
def test_statistics_come_from_the_header(
    tmp_path: Path, byteorder: str, header_order: str | None
) -> None:
    path = write_marccd(
        tmp_path / "x.mccd", size=SIZE, byteorder=byteorder, header_byteorder=header_order
    )
    order = header_order or byteorder
    pixels = marccd_pixels(SIZE)
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["minValue"] == int(pixels.min()) == _raw(path, "min", order)
    assert meta["maxValue"] == 0xFFFF
    assert meta["meanValue"] == _raw(path, "mean", order) / 1000
    assert meta["meanValue"] == pytest.approx(float(pixels.mean()), abs=1e-3)
    assert meta["rmsValue"] == _raw(path, "rms", order) / 1000
    assert meta["nSaturated"] == int(np.count_nonzero(pixels == 0xFFFF)) >= 5


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_pixels_match_what_was_written(tmp_path: Path, byteorder: str) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=SIZE, byteorder=byteorder, seed=7)
    with closing(_open(path)) as reader:
        assert isinstance(reader, FrameReader)
        assert reader.frame_count == 1
        frame = reader.read_frame(1)
        again = reader.read_frame(1)
    assert frame.pixels.dtype == np.dtype(np.uint16)  # native order
    np.testing.assert_array_equal(frame.pixels, marccd_pixels(SIZE, seed=7))
    np.testing.assert_array_equal(frame.pixels, tifffile.imread(path))
    assert frame.mask is None
    assert frame.saturation == 0xFFFF
    assert int(np.count_nonzero(frame.pixels == 0xFFFF)) >= 5
    frame.pixels[:] = 0  # fresh and writable: a later read is unaffected
    assert int(again.pixels.max()) == 0xFFFF


def test_one_reader_serves_threads_at_once(tmp_path: Path) -> None:
    # The service shares cached readers between worker threads.
    path = write_marccd(tmp_path / "x.mccd", size=256, seed=2)
    expected = marccd_pixels(256, seed=2)
    with closing(_open(path)) as reader, ThreadPoolExecutor(max_workers=4) as pool:
        frames = list(pool.map(lambda _: reader.read_frame(1), range(16)))
    for frame in frames:
        np.testing.assert_array_equal(frame.pixels, expected)


@pytest.mark.parametrize("requested", [0, 1, 5, -3])
def test_frame_number_is_ignored_like_the_original(tmp_path: Path, requested: int) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=32)
    with closing(_open(path)) as reader:
        frame = reader.read_frame(requested)
    assert (frame.meta["frame"], frame.meta["first_frame"], frame.meta["last_frame"]) == (1, 1, 1)
    assert frame.pixels.shape == (32, 32)


def test_text_fields_with_percent_signs_are_kept_verbatim(tmp_path: Path) -> None:
    comment = "100% done %s%n%d%x detector='MX%-300' LS_CAT_Beamline='21-ID-%G'"
    path = write_marccd(
        tmp_path / "x.mccd",
        size=32,
        comment=comment,
        filename="lyso_%s_%n_00001.mccd",
        filepath="/pf/%d%%/data",
    )
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["comment"] == comment
    assert meta["filename"] == "lyso_%s_%n_00001.mccd"
    assert meta["filepath"] == "/pf/%d%%/data"
    assert (meta["detector"], meta["beamline"]) == ("MX%-300", "21-ID-%G")


def test_text_fields_without_nul_and_with_bad_bytes(tmp_path: Path) -> None:
    full = "f" * 64  # fills the field: no terminator, must not run into the next field
    path = write_marccd(tmp_path / "x.mccd", size=32, filename=full)
    raw = bytearray(path.read_bytes())
    bad_comment = b"caf\xe9 \xff detector='X'"
    start = HEADER_OFFSET + HEADER_FIELDS["file_comment"][0]
    raw[start : start + len(bad_comment) + 1] = bad_comment + b"\0"
    path.write_bytes(bytes(raw))
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["filename"] == full
    assert meta["comment"] == "caf\ufffd \ufffd detector='X'"
    assert meta["detector"] == "X"
    json.dumps(meta, allow_nan=False)


@pytest.mark.parametrize(
    ("size", "detector"),
    [(32, "Unknown"), (768, "Rayonix MX-225"), (1024, "Rayonix MX-300")],
)
def test_detector_and_beamline_fallbacks(tmp_path: Path, size: int, detector: str) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=size, comment="no names here")
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert (meta["detector"], meta["beamline"]) == (detector, "21-ID")


def test_zero_wavelength_gives_no_photon_energy(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=32, source_wavelength=0)
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["wavelength"] == 0.0
    assert "photon_energy" not in meta
    json.dumps(meta, allow_nan=False)


def test_negative_goniostat_values_are_signed(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=32, start_phi=-90_000, beam_x=-1500)
    with closing(_open(path)) as reader:
        meta = reader.meta()
    assert meta["startPhi"] == pytest.approx(-90.0)
    assert meta["beam_center_x"] == pytest.approx(-1.5)


def test_reading_after_close_is_unavailable(tmp_path: Path) -> None:
    reader = _open(write_marccd(tmp_path / "x.mccd", size=32))
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(DataUnavailable):
        reader.read_frame(1)


def test_generic_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.ones((64, 64), dtype=np.uint16))
    with pytest.raises(UnknownFormat, match="MarCCD"):
        _open(path)


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="No such file"):
        _open(tmp_path / "gone.mccd")


def test_truncated_pixels_are_unavailable_not_a_crash(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=SIZE)
    path.write_bytes(path.read_bytes()[:6000])
    with closing(_open(path)) as reader:
        assert reader.meta()["x_pixels_in_detector"] == SIZE
        with pytest.raises(DataUnavailable):
            reader.read_frame(1)


def test_real_marccd_file() -> None:
    if not REAL_MARCCD.is_file():
        pytest.skip(f"{REAL_MARCCD} not present")
    with closing(_open(REAL_MARCCD)) as reader:
        meta = reader.meta()
        frame = reader.read_frame(1)
    assert (meta["x_pixels_in_detector"], meta["y_pixels_in_detector"]) == (2048, 2048)
    assert meta["image_depth"] == 2
    assert meta["x_pixel_size"] == pytest.approx(7.918e-05)
    assert meta["wavelength"] == pytest.approx(0.68499)
    assert meta["beam_center_x"] == pytest.approx(1022.986)
    assert meta["filename"] == "Ge_blanc_16Jul08_0060.mccd"
    assert meta["maxValue"] == int(frame.pixels.max())
    # marccd's statistics skip the dead corners outside the round taper (zeros there).
    assert int(frame.pixels.min()) <= meta["minValue"] == 5
    np.testing.assert_array_equal(frame.pixels, tifffile.imread(REAL_MARCCD))
    json.dumps(frame.meta, allow_nan=False)
