"""Where each Eiger frame lives: the master's data links and the frame lookup table.

DECTRIS tags each data stack with ``image_nr_low`` / ``image_nr_high`` (1-based global
frame numbers, inclusive); those place a stack exactly, whatever else is missing. Stacks
without them are placed by cumulative length (dxtbx), assuming that a data file not
(yet) readable holds as many frames as the longest one seen, since the DECTRIS writer
fills every file but the last. Links that cannot be opened yet are retried on each miss,
so frames written after the reader opened become visible.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from istasks.core import bslz4
from istasks.core.readers.base import MAX_FRAME_PIXELS
from istasks.core.readers.eiger_meta import H5_ERRORS
from istasks.core.readers.nxmx_vds import VdsSource, missing_sources, vds_sources
from istasks.errors import DataUnavailable, FrameNotFound, UnknownFormat

log = logging.getLogger(__name__)

DATA_GROUP = "/entry/data"
#: ``data_NNNNNN`` links of a master; ``data`` is the stack itself in a data file.
_LINK_NAME = re.compile(r"data(_\d{6})?")
_PIXEL_SIZES = (2, 4)


def open_hdf5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into DataUnavailable.

    HDF5's default file locking is kept so that other code in this process may open the
    same file (HDF5 refuses mixed locking flags); a file locked by its writer, or on a
    filesystem without locks, is retried without locking. Only regular files are
    opened: HDF5 opens in blocking mode while holding the GIL, so a FIFO (e.g. a data
    link pointing at one) would freeze every thread of the worker until a writer came.
    """
    _require_regular_file(path)
    try:
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            if "lock" not in str(exc).lower():
                raise
            return h5py.File(path, "r", locking=False)
    except FileNotFoundError as exc:
        raise DataUnavailable(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise DataUnavailable(f"{path}: permission denied") from exc
    except H5_ERRORS as exc:
        raise DataUnavailable(f"{path}: not a readable HDF5 file ({exc})") from exc


def _require_regular_file(path: str | Path) -> None:
    """DataUnavailable unless ``path`` (symlinks followed) is a regular file.

    Checked by path just before HDF5 opens it by path: someone able to swap the file for
    a FIFO in between could still block one open, as with any path-based open.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise DataUnavailable(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise DataUnavailable(f"{path}: permission denied") from exc
    except (OSError, ValueError) as exc:
        raise DataUnavailable(f"{path}: cannot be opened ({exc})") from exc
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise DataUnavailable(f"{path}: {kind}")


def _int_attr(attrs: h5py.AttributeManager, name: str) -> int | None:
    """An integer attribute (scalar or one-element array), None if absent or not integer."""
    try:
        value = attrs.get(name)
    except H5_ERRORS:
        return None
    array = np.asarray(value)
    if value is None or array.size != 1 or array.dtype.kind not in "iu":
        return None
    return int(array.reshape(-1)[0])


def _external_path(target: str, master_dir: Path) -> Path:
    """Data-file path of an external link: relative to the master, as DECTRIS writes it.

    HDF5 itself tries the current directory first, which would let a stray file in the
    worker's cwd shadow the real one; a moved absolute path falls back to the master's
    directory like HDF5 does.
    """
    path = Path(target)
    if not path.is_absolute():
        return master_dir / path
    return path if path.exists() else master_dir / path.name


class DataLink:
    """One ``/entry/data`` member and, once opened, its ``[n, rows, cols]`` frame stack.

    ``place`` (first frame, last frame, first slab), given for a source of a virtual
    dataset, places the stack exactly as the VDS maps it, like ``image_nr_low/high`` do.
    """

    def __init__(
        self,
        name: str,
        master: h5py.File,
        file_path: Path | None,
        object_path: str,
        place: tuple[int, int, int] | None = None,
    ):
        self.name = name
        self.file_path = file_path
        self.object_path = object_path
        self.place = place
        #: Slab of the stack holding this link's first frame (0 but for VDS sources).
        self.offset = place[2] if place is not None else 0
        self._master = master
        self.file: h5py.File | None = None
        self.dataset: h5py.Dataset | None = None
        self.low: int | None = None
        self.high: int | None = None
        self.direct = False
        self.problem = "not opened yet"

    @property
    def count(self) -> int | None:
        """Frames in the stack, None while it cannot be opened."""
        return None if self.dataset is None else int(self.dataset.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of one frame."""
        return None if self.dataset is None else tuple(self.dataset.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """Pixel type as stored."""
        return None if self.dataset is None else self.dataset.dtype

    def holds(self, frame: int) -> bool:
        """Whether ``place`` puts ``frame`` in this stack (False without a place)."""
        return self.place is not None and self.place[0] <= frame <= self.place[1]

    @property
    def usable(self) -> int | None:
        """Frames of the stack from ``offset`` on (None while it cannot be opened)."""
        count = self.count
        return None if count is None else max(count - self.offset, 0)

    @property
    def incomplete(self) -> bool:
        """The attributes promise more frames than the stack holds (still being written)."""
        usable = self.usable
        return (
            usable is not None
            and self.low is not None
            and self.high is not None
            and self.high - self.low + 1 > usable
        )

    def describe(self) -> str:
        """Link name and data file, for messages."""
        where = self.file_path.name if self.file_path is not None else "master"
        return f"{self.name} ({where})"

    def open(self) -> None:
        """Open the stack if not open yet; on failure remember why and stay closed."""
        if self.dataset is not None:
            return
        try:
            if self.file_path is None:
                node = self._master.get(self.object_path)
            elif not self.file_path.exists():
                self.problem = "data file missing"
                return
            else:
                self.file = open_hdf5(self.file_path)
                node = self.file.get(self.object_path)
            self._adopt(node)
        except DataUnavailable as exc:
            self.forget(f"unreadable ({exc})")
        except H5_ERRORS as exc:
            self.forget(f"unreadable ({exc})")

    def _adopt(self, node: object) -> None:
        """Accept ``node`` as this link's stack if it is a 2- or 4-byte integer 3-D dataset."""
        if not isinstance(node, h5py.Dataset):
            self.forget(f"no dataset at {self.object_path}")
        elif node.ndim != 3:
            self.forget(f"dataset is {node.ndim}-D, not [n, rows, cols]")
        elif node.dtype.kind not in "iu" or node.dtype.itemsize not in _PIXEL_SIZES:
            self.forget(f"unsupported pixel type {node.dtype}")
        elif node.shape[1] * node.shape[2] > MAX_FRAME_PIXELS:
            rows, cols = node.shape[1:]
            self.forget(f"frames of {rows} x {cols} pixels exceed the limit of {MAX_FRAME_PIXELS}")
        elif self.place is not None:
            self.low, self.high = self.place[0], self.place[1]
            self.direct = bslz4.is_frame_chunked_bslz4(node)
            self.dataset, self.problem = node, ""
        else:
            low = _int_attr(node.attrs, "image_nr_low")
            high = _int_attr(node.attrs, "image_nr_high")
            valid = low is not None and high is not None and 1 <= low <= high
            self.low, self.high = (low, high) if valid else (None, None)
            self.direct = bslz4.is_frame_chunked_bslz4(node)
            self.dataset, self.problem = node, ""

    def forget(self, problem: str) -> None:
        """Close the stack (it is reopened on the next refresh) and note why."""
        self.close()
        self.problem = problem

    def close(self) -> None:
        """Release the data file."""
        self.dataset, self.low, self.high, self.direct = None, None, None, False
        if self.file is not None:
            try:
                self.file.close()
            finally:
                self.file = None


def _link_for(group: h5py.Group, name: str, master: h5py.File, master_dir: Path) -> DataLink:
    """A DataLink for member ``name`` of ``/entry/data`` (external, soft or hard link)."""
    link = group.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        return DataLink(name, master, _external_path(link.filename, master_dir), link.path)
    return DataLink(name, master, None, f"{DATA_GROUP}/{name}")


def _frames_per_file(links: list[DataLink]) -> int | None:
    """Frames in a full data file: the longest open stack other than the last link."""
    counts = [link.count for link in links[:-1] if link.count is not None]
    return max(counts) if counts else None


def _placements(links: list[DataLink]) -> list[tuple[int, int, DataLink]]:
    """(first frame, last frame, link) for every open stack whose position is known."""
    per_file = _frames_per_file(links)
    placed: list[tuple[int, int, DataLink]] = []
    next_start: int | None = 1
    for link in links:
        count = link.usable
        if link.low is not None and link.high is not None and count is not None:
            stop = min(link.high, link.low + count - 1)
            if stop >= link.low:
                placed.append((link.low, stop, link))
            next_start = link.high + 1
        elif count is not None and next_start is not None:
            placed.append((next_start, next_start + count - 1, link))
            next_start += count
        elif next_start is not None and per_file is not None:
            next_start += per_file  # unreadable file: assume it is a full one
        else:
            next_start = None
    return [entry for entry in placed if entry[1] >= entry[0]]


class FrameTable:
    """Frame number -> (data stack, slab index) for one master file.

    The stacks are, in order of preference: the sources of a virtual ``data`` dataset
    (NXmx, see :mod:`istasks.core.readers.nxmx_vds`), the ``data_NNNNNN`` links (DECTRIS),
    else a plain ``data`` dataset. A master with both a VDS and ``data_NNNNNN`` links
    (nexgen) is read through its VDS, whose frames may start inside the first file.
    """

    def __init__(self, master: h5py.File, master_dir: Path) -> None:
        group = master.get(DATA_GROUP)
        if not isinstance(group, h5py.Group):
            raise UnknownFormat(f"{master.filename}: no {DATA_GROUP} group (not an Eiger file)")
        self._master, self._group, self._dir = master, group, master_dir
        self._links: dict[str, DataLink] = {}
        self._placed: list[tuple[int, int, DataLink]] = []
        #: Frames of the virtual dataset (None: the master has none).
        self.vds_frames: int | None = None
        #: Source files to check before reading a VDS that is not split by whole frames.
        self._vds_sources: list[VdsSource] = []
        self._vds_file: h5py.File | None = None
        self._vds_itemsize: int | None = None
        self._fixed = self._adopt_vds()
        self.refresh()

    def _adopt_vds(self) -> bool:
        """Links for the sources of a virtual ``data`` dataset; False when there is none."""
        vds = self._virtual_data()
        if vds is None:
            return False
        self.vds_frames = int(vds.shape[0])
        self._vds_itemsize = int(vds.dtype.itemsize)
        sources = vds_sources(vds, self._master, self._dir)
        if sources and all(source.whole_frames for source in sources):
            for number, source in enumerate(sources, 1):
                place = (source.first, source.last, source.source_start)
                self._links[f"vds_{number:06d}"] = DataLink(
                    f"data frames {source.first}-{source.last}",
                    self._master,
                    source.file_path,
                    source.object_path,
                    place,
                )
            return True
        self._vds_sources = sources
        holder = Path(vds.file.filename).resolve()
        in_master = holder == Path(self._master.filename).resolve()
        self._links["data"] = DataLink(
            "data", self._master, None if in_master else holder, vds.name, (1, self.vds_frames, 0)
        )
        return True

    def _virtual_data(self) -> h5py.Dataset | None:
        """``/entry/data/data`` when it is a 3-D virtual dataset (external link followed)."""
        try:
            link = self._group.get("data", getlink=True)
            if isinstance(link, h5py.ExternalLink):
                path = _external_path(link.filename, self._dir)
                if not path.is_file():
                    return None
                self._vds_file = open_hdf5(path)
                node = self._vds_file.get(link.path)
            else:
                node = self._group.get("data") if link is not None else None
            if isinstance(node, h5py.Dataset) and node.is_virtual and node.ndim == 3:
                return node
        except (DataUnavailable, *H5_ERRORS) as exc:
            log.warning("nxmx: %s: unreadable data entry (%s)", self._master.filename, exc)
        if self._vds_file is not None:
            self._vds_file.close()
            self._vds_file = None
        return None

    def _link_names(self) -> list[str]:
        """``data_NNNNNN`` members, else ``data`` (both would count the frames twice)."""
        names = sorted(name for name in self._group if _LINK_NAME.fullmatch(name))
        numbered = [name for name in names if name != "data"]
        return numbered or names

    def refresh(self) -> None:
        """Pick up new links, retry unopened or growing stacks, rebuild the table."""
        if not self._fixed:
            for name in self._link_names():
                if name not in self._links:
                    self._links[name] = _link_for(self._group, name, self._master, self._dir)
        for link in self._links.values():
            if link.incomplete:
                link.forget("still being written")
            link.open()
        self._placed = _placements([self._links[name] for name in sorted(self._links)])

    def locate(self, frame: int, declared: int | None) -> tuple[DataLink, int]:
        """The open stack holding ``frame`` and its 0-based slab index, or FrameNotFound."""
        hit = self._find(frame)
        if hit is None and (declared is None or frame <= declared):
            self.refresh()  # a data file may have appeared or grown since the last look
            hit = self._find(frame)
        if hit is None:
            raise FrameNotFound(self._why_missing(frame, declared))
        missing = missing_sources(self._vds_sources, frame)
        if missing:
            where = self._master.filename
            raise FrameNotFound(
                f"{where}: frame {frame} not available (data file missing: {', '.join(missing)})"
            )
        return hit

    def _find(self, frame: int) -> tuple[DataLink, int] | None:
        for first, last, link in self._placed:
            if first <= frame <= last:
                return link, frame - first + link.offset
        return None

    def _why_missing(self, frame: int, declared: int | None) -> str:
        where = self._master.filename
        if declared is not None and frame > declared:
            return f"{where}: frame {frame} is beyond the last frame ({declared})"
        problems = [link for link in self._links.values() if link.problem]
        holding = [link for link in problems if link.place and link.holds(frame)]
        closed = [f"{link.describe()}: {link.problem}" for link in holding or problems]
        detail = "; ".join(closed[:3]) if closed else "no data stack holds it"
        return f"{where}: frame {frame} not available ({detail})"

    def frame_range(self) -> tuple[int, int | None]:
        """(min image_nr_low or 1, max image_nr_high or None) over the open stacks."""
        lows = [link.low for link in self._links.values() if link.low is not None]
        highs = [link.high for link in self._links.values() if link.high is not None]
        return (min(lows) if lows else 1), (max(highs) if highs else None)

    def last_placed(self) -> int:
        """Highest frame number currently located (0 when none)."""
        return max((last for _first, last, _link in self._placed), default=0)

    def itemsize(self) -> int | None:
        """Bytes per pixel of the first open stack, else of the virtual dataset."""
        for link in self._links.values():
            if link.dtype is not None:
                return int(link.dtype.itemsize)
        return self._vds_itemsize

    def close(self) -> None:
        """Close every data file (and a separate VDS file)."""
        for link in self._links.values():
            link.close()
        if self._vds_file is not None:
            self._vds_file.close()
            self._vds_file = None
