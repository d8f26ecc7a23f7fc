"""Which detector format a file holds, decided by its content (spec 5.1, with bug 16 fixed).

The extension is never consulted: a MarCCD image renamed ``.h5`` is still Rayonix. Files
are opened non-blocking and must be regular files, so a FIFO or a device named like an
image yields :class:`DataUnavailable` at once instead of hanging a worker.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from istasks.errors import DataUnavailable, UnknownFormat

log = logging.getLogger(__name__)

#: The format names :func:`detect_format` returns (keys of the reader registry).
FORMATS = ("eiger", "rayonix", "tiff", "cbf", "fabio")

TIFF_MAGIC_ORDER = {b"II*\0": "<", b"MM\0*": ">"}
BIGTIFF_MAGICS = (b"II+\0", b"MM\0+")
CBF_MAGIC = b"###CBF"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: HDF5 looks for its superblock at 0, 512, 1024, 2048, ... (a user block may precede it).
HDF5_FIRST_SKIP = 512

#: The MarCCD frame header sits after the TIFF header; pixel data start at 4096.
MARCCD_HEADER_OFFSET = 1024
MARCCD_HEADER_BYTES = 3072

_TAG_WIDTH, _TAG_HEIGHT, _TAG_BITS = 256, 257, 258
_TYPE_SHORT, _TYPE_LONG = 3, 4
_MAX_IFD_ENTRIES = 4096


def swapped(byteorder: str) -> str:
    """The other struct byte-order character ("<" <-> ">")."""
    return ">" if byteorder == "<" else "<"


class FileProbe:
    """A regular file opened read-only for content checks and readers.

    Opening uses ``O_NONBLOCK`` and then ``fstat`` on the open descriptor (no race): a
    FIFO, socket, device or directory is refused with :class:`DataUnavailable`, as are
    OS errors (missing file, permission denied), whose reason is kept in the message.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise DataUnavailable(exc.errno, exc.strerror, path) from exc
        try:
            info = os.fstat(fd)
            _require_regular(info.st_mode, path)
        except BaseException:
            os.close(fd)
            raise
        self.size_bytes = info.st_size
        self.file: BinaryIO = io.BufferedReader(io.FileIO(fd, "rb", closefd=True))

    @property
    def name(self) -> str:
        """The file's base name (tifffile wants one; the descriptor has none)."""
        return os.path.basename(self.path)

    def read_at(self, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from ``offset`` (fewer at end of file), position untouched."""
        if self.file.closed:
            raise DataUnavailable(f"reader is closed: {self.path!r}")
        try:
            return os.pread(self.file.fileno(), max_bytes, offset)
        except OSError as exc:
            raise DataUnavailable(exc.errno, exc.strerror, self.path) from exc

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        self.file.close()

    def __enter__(self) -> FileProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _require_regular(mode: int, path: str) -> None:
    """Refuse anything but a regular file, naming what it is."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise DataUnavailable(errno.EISDIR, os.strerror(errno.EISDIR), path)
    kind = "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
    raise DataUnavailable(f"not a regular file ({kind}): {path!r}")


@dataclass(frozen=True)
class TiffLayout:
    """The first image of a classic TIFF as its first IFD declares it."""

    byteorder: str
    width: int
    height: int
    bits_per_sample: int


def tiff_layout(probe: FileProbe) -> TiffLayout | None:
    """Byte order and size of a classic TIFF's first image; None if not a readable TIFF."""
    head = probe.read_at(0, 8)
    order = TIFF_MAGIC_ORDER.get(head[:4])
    if order is None or len(head) < 8:
        return None
    (ifd_offset,) = struct.unpack(order + "I", head[4:8])
    raw_count = probe.read_at(ifd_offset, 2)
    if len(raw_count) < 2:
        return None
    (count,) = struct.unpack(order + "H", raw_count)
    if not 0 < count <= _MAX_IFD_ENTRIES:
        return None
    entries = probe.read_at(ifd_offset + 2, 12 * count)
    if len(entries) < 12 * count:
        return None
    tags = _size_tags(entries, count, order)
    if _TAG_WIDTH not in tags or _TAG_HEIGHT not in tags:
        return None
    # BitsPerSample defaults to 1 in TIFF 6.0 when the tag is absent.
    return TiffLayout(order, tags[_TAG_WIDTH], tags[_TAG_HEIGHT], tags.get(_TAG_BITS, 1))


def _size_tags(entries: bytes, count: int, order: str) -> dict[int, int]:
    """ImageWidth, ImageLength and single-valued BitsPerSample from raw IFD entries."""
    tags: dict[int, int] = {}
    for index in range(count):
        tag, kind, n_values = struct.unpack_from(order + "HHI", entries, 12 * index)
        if tag not in (_TAG_WIDTH, _TAG_HEIGHT, _TAG_BITS) or n_values != 1:
            continue
        if kind == _TYPE_SHORT:
            (tags[tag],) = struct.unpack_from(order + "H", entries, 12 * index + 8)
        elif kind == _TYPE_LONG:
            (tags[tag],) = struct.unpack_from(order + "I", entries, 12 * index + 8)
    return tags


def marccd_byteorder(probe: FileProbe, layout: TiffLayout) -> str | None:
    """Byte order of the MarCCD header at 1024, or None when the TIFF carries none.

    Like dxtbx's FormatTIFFRayonix, the header's nfast/nslow/depth (at 1024+80/84/88) must
    agree with the TIFF's own width, height and 16-bit samples. The TIFF's byte order is
    tried first, then the swapped one (a header written on a machine of the other
    endianness), which the original never did (bug 16).
    """
    if probe.size_bytes < MARCCD_HEADER_OFFSET + MARCCD_HEADER_BYTES:
        return None
    raw = probe.read_at(MARCCD_HEADER_OFFSET + 80, 12)
    if len(raw) < 12:
        return None
    for order in (layout.byteorder, swapped(layout.byteorder)):
        nfast, nslow, depth = struct.unpack(order + "3I", raw)
        if (nfast, nslow) == (layout.width, layout.height) and depth == 2:
            return order if layout.bits_per_sample == 16 else None
    return None


def has_hdf5_signature(probe: FileProbe) -> bool:
    """Whether the HDF5 superblock signature is at 0 or 512 * 2**n (HDF5 search rule)."""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= probe.size_bytes:
        if probe.read_at(offset, len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return True
        offset = HDF5_FIRST_SKIP if offset == 0 else offset * 2
    return False


#: fabio format names never served through fabio: those with a reader of their own
#: (matched before fabio's table is consulted) and pictures (JPEG, JPEG 2000).
FABIO_EXCLUDED = frozenset(
    {"tif", "marccd/tif", "pilatus", "eiger/lima/sparse/hdf5/lambda", "cbf", "jpeg", "jpeg2k"}
)
#: Bytes :func:`fabio_format` looks at (fabio itself reads 18).
FABIO_MAGIC_BYTES = 64


def fabio_format(head: bytes) -> str | None:
    """fabio's format name for a file starting with ``head``, or None.

    Uses fabio's magic table (``fabio.openimage.MAGIC_NUMBERS``) in its order, first
    match wins, like ``fabio.open`` without its file-name fallbacks and without GE's
    all-zero entry (a zero-filled file is no image). fabio is imported
    on first use: most files are matched by the checks before this one.
    """
    from fabio.openimage import MAGIC_NUMBERS

    for magic, name in MAGIC_NUMBERS:
        if not magic.strip(b"\0"):
            continue  # GE's "blanked header" entry: ten zero bytes say nothing of a file
        if head.startswith(magic):
            return None if name in FABIO_EXCLUDED else str(name)
    return None


def detect_format(path: str) -> str:
    """One of ``"eiger"``, ``"rayonix"``, ``"tiff"``, ``"cbf"``, ``"fabio"`` from the content.

    ``"fabio"`` is any other format fabio knows by its magic number (SMV, MAR345, Bruker,
    R-AXIS, EDF...; see :mod:`istasks.core.readers.fabio_formats`).

        Raises :class:`UnknownFormat` for content no reader supports and
        :class:`DataUnavailable` (with the OS reason) when the file cannot be read.
    """
    with FileProbe(path) as probe:
        found = probe_format(probe)
    log.debug("detected %s for %s", found, path)
    return found


def probe_format(probe: FileProbe) -> str:
    """:func:`detect_format` on an already opened file."""
    head = probe.read_at(0, 8)
    if not head:
        raise UnknownFormat(f"empty file: {probe.path!r}")
    if head[:4] in TIFF_MAGIC_ORDER:
        layout = tiff_layout(probe)
        if layout is not None and marccd_byteorder(probe, layout) is not None:
            return "rayonix"
        return "tiff"
    if head[:4] in BIGTIFF_MAGICS:
        return "tiff"
    if head.startswith(CBF_MAGIC):
        return "cbf"
    if has_hdf5_signature(probe):
        return "eiger"
    if fabio_format(probe.read_at(0, FABIO_MAGIC_BYTES)) is not None:
        return "fabio"
    raise UnknownFormat(f"no supported detector format in {probe.path!r}")
