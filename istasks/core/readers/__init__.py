"""Detector readers: one module per format behind ``FrameReader``, chosen by content.

``open_reader(path)`` detects the format from the file's bytes and opens the matching
reader from :data:`READERS`; supporting a new format is one module and one line there.
"""

from __future__ import annotations

from collections.abc import Callable

from istasks.core.readers.base import Frame, FrameReader, Meta, PixelMask
from istasks.core.readers.cbf import CbfReader
from istasks.core.readers.detect import detect_format
from istasks.core.readers.rayonix import RayonixReader
from istasks.core.readers.tiff import TiffReader


def _eiger_reader(path: str) -> FrameReader:
    """The Eiger reader, imported on first use (h5py and its filter plugins load then)."""
    from istasks.core.readers.eiger import EigerReader

    return EigerReader(path)


def _fabio_reader(path: str) -> FrameReader:
    """The reader over fabio (SMV, MAR345, Bruker, EDF...), imported on first use."""
    from istasks.core.readers.fabio_formats import FabioReader

    return FabioReader(path)


#: Format name (as returned by :func:`detect_format`) -> reader factory taking a path.
READERS: dict[str, Callable[[str], FrameReader]] = {
    "eiger": _eiger_reader,
    "rayonix": RayonixReader,
    "cbf": CbfReader,
    "tiff": TiffReader,
    "fabio": _fabio_reader,
}


def open_reader(path: str) -> FrameReader:
    """The reader for ``path``'s format (UnknownFormat / DataUnavailable otherwise)."""
    return READERS[detect_format(path)](path)


__all__ = [
    "READERS",
    "Frame",
    "FrameReader",
    "Meta",
    "PixelMask",
    "detect_format",
    "open_reader",
]
