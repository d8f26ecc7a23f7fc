"""DECTRIS Eiger HDF5 reader: ``<prefix>_master.h5`` plus ``<prefix>_data_NNNNNN.h5`` files.

The master's ``/entry/data/data_NNNNNN`` entries are external links to each data file's
``[n, rows, cols]`` stack. Frames are located from the stacks' ``image_nr_low`` /
``image_nr_high`` attributes (1-based, inclusive), or from cumulative stack lengths when
the attributes are absent (dxtbx). Unlike the original (spec 8 item 17), a missing data
file hides only its own frames, data files that appear later are found on the next miss,
and a file without a pixel mask is shown unmasked.

NXmx masters (Diamond's nexgen, mx-bluesky) are read here too: a virtual
``/entry/data/data`` defines the frames (:mod:`istasks.core.readers.nxmx_vds`), and signed
pixels (int32/int16) have their negative gap/bad flags masked and zeroed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters with h5py)
import numpy as np
import numpy.typing as npt

from istasks.core import bslz4
from istasks.core.readers.base import MAX_FRAME_PIXELS, Frame, Meta, PixelMask
from istasks.core.readers.eiger_frames import DataLink, FrameTable, open_hdf5
from istasks.core.readers.eiger_mask import read_mask
from istasks.core.readers.eiger_meta import H5_ERRORS, PIXEL_MASK_PATH, read_detector_meta
from istasks.core.readers.negatives import unsigned_with_mask
from istasks.errors import DataUnavailable, FrameNotFound, UnknownFormat

log = logging.getLogger(__name__)

_DEPTHS = (2, 4)


def _image_depth(meta: Meta, table: FrameTable, path: str) -> int:
    """Bytes per pixel from ``bit_depth_image`` (else the data's type); must be 2 or 4."""
    bits = meta.get("bit_depth_image")
    if isinstance(bits, int) and not isinstance(bits, bool):
        depth = bits // 8
    elif (itemsize := table.itemsize()) is not None:
        depth = itemsize
    else:
        raise DataUnavailable(f"{path}: no bit_depth_image and no readable data")
    if depth not in _DEPTHS:
        raise DataUnavailable(f"{path}: image depth {depth} bytes is not supported (2 or 4)")
    return depth


def _declared_frames(meta: Meta) -> int | None:
    """``nimages * ntrigger`` when the master declares them."""
    nimages, ntrigger = meta.get("nimages"), meta.get("ntrigger", 1)
    if isinstance(nimages, int) and isinstance(ntrigger, int):
        return nimages * max(ntrigger, 1)
    return None


def _read_mask(master: h5py.File) -> PixelMask | None:
    """The detector's pixel mask as a PixelMask, or None when absent or unusable."""
    try:
        dataset = master.get(PIXEL_MASK_PATH)
        if not isinstance(dataset, h5py.Dataset):
            return None
        if dataset.ndim != 2 or dataset.dtype.kind not in "iu" or dataset.size > MAX_FRAME_PIXELS:
            log.warning("eiger: ignoring pixel_mask of shape %s", dataset.shape)
            return None
        return read_mask(dataset)  # shared between masters with the same stored mask
    except H5_ERRORS as exc:
        log.warning("eiger: unreadable pixel_mask (%s); showing the frame unmasked", exc)
        return None


def _as_unsigned(
    pixels: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], PixelMask | None]:
    """Native-order unsigned pixels, and for signed stacks (NXmx writers: int32, int16)
    the mask of their negative values, the gap/bad flags (-1, -2), which become 0."""
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if pixels.dtype.kind == "i":
        if not pixels.flags.writeable:
            pixels = pixels.copy()
        return unsigned_with_mask(pixels, pixels.dtype.itemsize)
    return pixels, None


def _union(stored: PixelMask | None, flags: PixelMask | None) -> PixelMask | None:
    """The detector's mask plus the frame's negative flags (the shared mask when it
    already covers them, so its cached index is reused)."""
    if flags is None:
        return stored
    if stored is None:
        return flags
    if not (flags.bad & ~stored.bad).any():
        return stored
    return PixelMask(stored.bad | flags.bad)


class EigerReader:
    """An opened Eiger dataset (FrameReader). Files stay open until close().

    Safe to share between threads: HDF5 access is serialised by a lock, while the
    bitshuffle decoding (the expensive part) runs outside it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._master: h5py.File | None = open_hdf5(path)
        try:
            self._table = FrameTable(self._master, Path(path).resolve().parent)
            self._detector_meta = read_detector_meta(self._master)
            # An NXmx VDS's length is the dataset (nexgen rewrites nimages to match it).
            self._declared = self._table.vds_frames or _declared_frames(self._detector_meta)
            self._detector_meta["image_depth"] = _image_depth(
                self._detector_meta, self._table, path
            )
        except (DataUnavailable, *H5_ERRORS) as exc:
            self.close()
            if isinstance(exc, DataUnavailable):
                raise
            raise UnknownFormat(f"{path}: not an Eiger master file ({exc})") from exc
        self._detector_meta["fn"] = path
        # NXmx writers (nexgen) give only NXdetector's ``distance``: the same metres.
        if "detector_distance" not in self._detector_meta and "distance" in self._detector_meta:
            self._detector_meta["detector_distance"] = self._detector_meta["distance"]
        self._mask: PixelMask | None = None
        self._mask_loaded = False

    @property
    def frame_count(self) -> int:
        """``nimages * ntrigger`` from the master, else the last frame found in the data."""
        if self._declared is not None:
            return self._declared
        with self._lock:
            return self._table.last_placed()

    def meta(self) -> Meta:
        """Detector metadata plus ``image_depth``, ``fn``, ``first_frame``, ``last_frame``."""
        with self._lock:
            first, last = self._table.frame_range()
            if last is None:
                last = self._declared if self._declared is not None else self._table.last_placed()
        meta = dict(self._detector_meta)
        meta["first_frame"] = first
        meta["last_frame"] = last
        return meta

    def read_frame(self, frame: int) -> Frame:
        """Frame ``frame`` (1-based) with the shared mask; fresh, writable pixels."""
        if frame < 1:
            raise FrameNotFound(f"{self.path}: frame {frame} is before the first frame (1)")
        with self._lock:
            master = self._require_open()
            link, index = self._table.locate(frame, self._declared)
            chunk = self._read_slab(link, index)
            if not self._mask_loaded:
                self._mask, self._mask_loaded = _read_mask(master), True
        pixels, flags = self._finish(link, chunk)
        meta = self.meta()
        meta["frame"] = frame
        return Frame(
            pixels=pixels,
            mask=_union(self._mask_for(pixels.shape), flags),
            saturation=(1 << (8 * pixels.itemsize)) - 1,
            meta=meta,
        )

    def close(self) -> None:
        """Close every data file and the master (idempotent)."""
        with self._lock:
            if hasattr(self, "_table"):
                self._table.close()
            if self._master is not None:
                self._master.close()
                self._master = None

    def __enter__(self) -> EigerReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> h5py.File:
        if self._master is None:
            raise DataUnavailable(f"{self.path}: reader is closed")
        return self._master

    def _read_slab(self, link: DataLink, index: int) -> bytes | npt.NDArray[Any]:
        """Under the lock: the raw bslz4 chunk (fast path) or the decoded slab (h5py)."""
        dataset = link.dataset
        assert dataset is not None  # located links are open
        try:
            if link.direct:
                filter_mask, chunk = dataset.id.read_direct_chunk((index, 0, 0))
                if not filter_mask & 1:
                    return bytes(chunk)
            return np.asarray(dataset[index])
        except H5_ERRORS as exc:
            link.forget(f"unreadable ({exc})")  # perhaps still being written: retry later
            raise DataUnavailable(f"{link.describe()}: frame unreadable ({exc})") from exc

    def _finish(
        self, link: DataLink, slab: bytes | npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], PixelMask | None]:
        """Outside the lock: decode a raw chunk in threads; make pixels unsigned/native."""
        if isinstance(slab, bytes):
            shape, dtype = link.frame_shape, link.dtype
            assert shape is not None and dtype is not None
            slab = bslz4.decompress(slab, shape, dtype)
        return _as_unsigned(slab)

    def _mask_for(self, shape: tuple[int, ...]) -> PixelMask | None:
        """The shared mask when it fits the frame (a mismatched mask is ignored, logged)."""
        mask = self._mask
        if mask is not None and mask.bad.shape != shape:
            log.warning("eiger: %s mask %s does not fit frame %s", self.path, mask.bad.shape, shape)
            return None
        return mask
