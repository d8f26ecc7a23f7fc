"""Format detection by content (spec 5.1 with bug 16 fixed) and the reader dispatcher."""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile

from istasks.core.readers import READERS, FrameReader, detect_format, open_reader
from istasks.core.readers.cbf import CbfReader
from istasks.core.readers.detect import FORMATS
from istasks.core.readers.rayonix import RayonixReader
from istasks.core.readers.tiff import TiffReader
from istasks.errors import DataUnavailable, UnknownFormat
from ops.testdata.cbf import write_cbf
from ops.testdata.marccd import write_marccd

SHARED_TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
REAL_MARCCD = SHARED_TESTDATA / "marccd165_Ge_blanc_0000.mccd"
REAL_EIGER_DATA = SHARED_TESTDATA / "eiger4m_bslz4_data_000001.h5"


def _hdf5(path: Path, userblock_bytes: int = 0) -> Path:
    with h5py.File(path, "w", userblock_size=userblock_bytes) as h5:
        h5.create_dataset("entry/data/data", data=np.zeros((1, 4, 4), dtype=np.uint32))
    return path


def _tiff(path: Path, data: np.ndarray, **kwargs: Any) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("name", ["x.mccd", "x.h5", "x.cbf", "noextension"])
def test_marccd_is_rayonix_whatever_its_name(tmp_path: Path, byteorder: str, name: str) -> None:
    path = write_marccd(tmp_path / name, size=64, byteorder=byteorder)
    assert detect_format(str(path)) == "rayonix"


@pytest.mark.parametrize(("tiff_order", "header_order"), [("<", ">"), (">", "<")])
def test_marccd_with_byte_swapped_header_is_rayonix(
    tmp_path: Path, tiff_order: str, header_order: str
) -> None:
    path = write_marccd(
        tmp_path / "x.mccd", size=64, byteorder=tiff_order, header_byteorder=header_order
    )
    assert detect_format(str(path)) == "rayonix"


def test_real_marccd_is_rayonix() -> None:
    if not REAL_MARCCD.is_file():
        pytest.skip(f"{REAL_MARCCD} not present")
    assert detect_format(str(REAL_MARCCD)) == "rayonix"


def test_tiff_whose_header_disagrees_with_its_size_is_generic(tmp_path: Path) -> None:
    # A MarCCD-like block at 1024 whose nfast does not match the TIFF width.
    path = write_marccd(tmp_path / "x.mccd", size=64, nfast=128)
    assert detect_format(str(path)) == "tiff"


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_plain_tiff_is_generic_in_both_byte_orders(
    tmp_path: Path, byteorder: str, dtype: type[np.unsignedinteger[Any]]
) -> None:
    data = np.arange(64 * 48, dtype=dtype).reshape(48, 64)
    path = _tiff(tmp_path / "monitor.mccd", data, byteorder=byteorder)
    assert detect_format(str(path)) == "tiff"


def test_plain_tiff_large_enough_for_a_header_is_still_generic(tmp_path: Path) -> None:
    # 16-bit and well over 4096 bytes: only the MarCCD header test can tell it apart.
    path = _tiff(tmp_path / "x.mccd", np.ones((128, 128), dtype=np.uint16))
    assert detect_format(str(path)) == "tiff"


def test_bigtiff_is_generic(tmp_path: Path) -> None:
    path = _tiff(tmp_path / "x.tif", np.ones((8, 8), dtype=np.uint16), bigtiff=True)
    assert detect_format(str(path)) == "tiff"


@pytest.mark.parametrize("name", ["x_master.h5", "x.tif", "x.mccd"])
def test_hdf5_is_eiger_whatever_its_name(tmp_path: Path, name: str) -> None:
    assert detect_format(str(_hdf5(tmp_path / name))) == "eiger"


@pytest.mark.parametrize("userblock_bytes", [512, 1024, 4096])
def test_hdf5_after_a_user_block_is_eiger(tmp_path: Path, userblock_bytes: int) -> None:
    path = _hdf5(tmp_path / "x.h5", userblock_bytes)
    assert path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n"
    assert detect_format(str(path)) == "eiger"


def test_real_eiger_data_file_is_eiger() -> None:
    if not REAL_EIGER_DATA.is_file():
        pytest.skip(f"{REAL_EIGER_DATA} not present")
    assert detect_format(str(REAL_EIGER_DATA)) == "eiger"


@pytest.mark.parametrize("name", ["x.cbf", "x.tif", "x.h5"])
def test_cbf_is_cbf_whatever_its_name(tmp_path: Path, name: str) -> None:
    path = write_cbf(tmp_path / name, shape=(40, 30))
    assert detect_format(str(path)) == "cbf"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"II*",
        b"\x89HDF\r\n",
        b"###CB",
        b"random bytes that are no detector image at all" * 100,
        b"\0" * 5000,
    ],
    ids=["empty", "short-tiff-magic", "truncated-hdf5", "truncated-cbf", "text", "zeros"],
)
def test_unknown_content_is_unknown_format(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.cbf"
    path.write_bytes(content)
    with pytest.raises(UnknownFormat):
        detect_format(str(path))


def test_marccd_truncated_in_its_pixels_is_still_rayonix(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=64)
    path.write_bytes(path.read_bytes()[:5000])
    assert detect_format(str(path)) == "rayonix"


def test_marccd_truncated_in_its_header_is_generic_tiff(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=64)
    path.write_bytes(path.read_bytes()[:2000])
    assert detect_format(str(path)) == "tiff"


def test_tiff_with_ifd_beyond_the_end_is_still_tiff(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_bytes(b"II*\0\xff\xff\xff\x00")
    assert detect_format(str(path)) == "tiff"
    with pytest.raises(DataUnavailable):
        open_reader(str(path))


def test_missing_file_gives_the_os_reason(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable) as caught:
        detect_format(str(tmp_path / "nope.mccd"))
    assert caught.value.errno == errno.ENOENT
    assert "No such file or directory" in caught.value.wire_text()
    assert "nope.mccd" in str(caught.value)


def test_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable) as caught:
        detect_format(str(tmp_path))
    assert caught.value.errno == errno.EISDIR


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "image.mccd"
    os.mkfifo(fifo)
    with pytest.raises(DataUnavailable, match="FIFO"):
        detect_format(str(fifo))
    with pytest.raises(DataUnavailable, match="FIFO"):
        RayonixReader(str(fifo))


def test_device_is_refused() -> None:
    with pytest.raises(DataUnavailable, match="not a regular file"):
        detect_format(os.devnull)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_gives_the_os_reason(tmp_path: Path) -> None:
    path = write_marccd(tmp_path / "x.mccd", size=64)
    path.chmod(0)
    try:
        with pytest.raises(DataUnavailable) as caught:
            detect_format(str(path))
        assert caught.value.errno == errno.EACCES
        assert "Permission denied" in caught.value.wire_text()
    finally:
        path.chmod(0o644)


def test_registry_covers_every_detected_format() -> None:
    assert set(READERS) == set(FORMATS)


@pytest.mark.parametrize(
    ("make", "reader_type"),
    [
        (lambda d: write_marccd(d / "x.h5", size=64), RayonixReader),
        (lambda d: write_marccd(d / "x.h5", size=64, byteorder=">"), RayonixReader),
        (lambda d: write_cbf(d / "x.tif", shape=(40, 30)), CbfReader),
        (lambda d: _tiff(d / "x.cbf", np.ones((8, 8), dtype=np.uint16)), TiffReader),
        (lambda d: _tiff(d / "x.cbf", np.ones((8, 8), dtype=np.uint32), byteorder=">"), TiffReader),
    ],
    ids=["rayonix", "rayonix-be", "cbf", "tiff", "tiff-be"],
)
def test_open_reader_picks_the_reader_by_content(
    tmp_path: Path, make: Callable[[Path], Path], reader_type: type[FrameReader]
) -> None:
    path = make(tmp_path)
    with closing(open_reader(str(path))) as reader:
        assert type(reader) is reader_type
        assert isinstance(reader, FrameReader)
        assert reader.path == str(path)
        assert reader.read_frame(1).pixels.shape == (
            reader.meta()["y_pixels_in_detector"],
            reader.meta()["x_pixels_in_detector"],
        )


def test_open_reader_for_hdf5_uses_the_eiger_reader(tmp_path: Path) -> None:
    eiger = pytest.importorskip("istasks.core.readers.eiger")
    path = _hdf5(tmp_path / "x_master.h5")
    try:
        reader = open_reader(str(path))
    except DataUnavailable as exc:
        # A bare HDF5 file is no Eiger master: the Eiger reader may refuse it, but it
        # must be the Eiger reader that does.
        frames = [Path(frame.filename).name for frame in traceback.extract_tb(exc.__traceback__)]
        assert "eiger.py" in frames
        return
    with closing(reader):
        assert type(reader) is eiger.EigerReader


def test_open_reader_refuses_unknown_content(tmp_path: Path) -> None:
    path = tmp_path / "x.mccd"
    path.write_bytes(b"not an image")
    with pytest.raises(UnknownFormat):
        open_reader(str(path))


def test_real_marccd_copy_renamed_h5_opens_as_rayonix(tmp_path: Path) -> None:
    if not REAL_MARCCD.is_file():
        pytest.skip(f"{REAL_MARCCD} not present")
    copy = Path(shutil.copy(REAL_MARCCD, tmp_path / "renamed.h5"))
    with closing(open_reader(str(copy))) as reader:
        assert isinstance(reader, RayonixReader)
