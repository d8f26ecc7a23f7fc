"""Fast path for bitshuffle+LZ4 ("bslz4", HDF5 filter 32008) frames stored one per chunk.

h5py decompresses a chunk on one core through the HDF5 filter pipeline. Reading the raw
chunk with ``read_direct_chunk`` and decoding it here is about 4x faster: the chunk is a
12-byte header (``>QI``: uncompressed bytes, block bytes) followed by independently
compressed blocks, each prefixed by its 4-byte big-endian length, so the blocks are split
between threads. The decoder is ``bshuf_decompress_lz4`` from hdf5plugin's own filter
library (the code h5py runs, so pixels are identical), called through ctypes, which
releases the GIL. The ``bitshuffle`` wheel's ``decompress_lz4`` is not used: it is
OpenMP-parallel, and a process forked after it ran hangs in libgomp (Celery's prefork
pool forks). Without the symbol, :func:`available` is False and readers use h5py.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from istasks.errors import DataUnavailable

log = logging.getLogger(__name__)

BSLZ4_FILTER_ID = 32008
#: bitshuffle's filter option 4 (``cd_values[4]``) naming LZ4 as the compressor.
_BSHUF_LZ4 = 2
_HEADER = struct.Struct(">QI")
_BLOCK_LENGTH = struct.Struct(">I")
#: bitshuffle transposes groups of 8 elements; block sizes are multiples of this.
_BLOCK_MULTIPLE = 8
#: Below this many uncompressed bytes a second thread costs more than it saves.
_MIN_SPLIT_BYTES = 1 << 20


def _usable_cores() -> int:
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


#: Threads used to decode one frame (the project's machines have 2 cores).
DEFAULT_THREADS = min(4, _usable_cores())

_Decoder = Callable[[int, int, int, int, int], int]


def _load_decoder() -> _Decoder | None:
    """``bshuf_decompress_lz4(in, out, n_elements, elem_size, block_elements)`` or None."""
    path = hdf5plugin.get_config().registered_filters.get("bshuf")
    if not path:
        return None
    try:
        function = ctypes.CDLL(path).bshuf_decompress_lz4
    except (OSError, AttributeError) as exc:
        log.info("bslz4: no usable bshuf_decompress_lz4 in %s (%s)", path, exc)
        return None
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
    return function


_DECODE = _load_decoder()


@dataclass(frozen=True)
class _Segment:
    """A run of whole blocks decoded by one call: input byte range, output element range."""

    in_offset: int
    in_bytes: int
    first_element: int
    elements: int


def _block_offsets(payload: memoryview, full_blocks: int) -> list[int]:
    """Start offset of each full block plus the offset after the last, bounds-checked.

    The C decoder trusts the block lengths, so a corrupt chunk must be caught here
    rather than let it read past the buffer.
    """
    offsets = [0] * (full_blocks + 1)
    position = 0
    limit = len(payload)
    unpack = _BLOCK_LENGTH.unpack_from
    for block in range(full_blocks):
        if position + 4 > limit:
            raise DataUnavailable("bslz4 chunk is truncated")
        position += 4 + unpack(payload, position)[0]
        offsets[block + 1] = position
    if position > limit:
        raise DataUnavailable("bslz4 chunk is truncated")
    return offsets


def _tail_bytes(payload: memoryview, start: int, tail_elements: int, itemsize: int) -> int:
    """Bytes of what follows the full blocks: one short compressed block + raw leftovers."""
    short_block = tail_elements - tail_elements % _BLOCK_MULTIPLE
    size = (tail_elements % _BLOCK_MULTIPLE) * itemsize
    if short_block:
        if start + 4 > len(payload):
            raise DataUnavailable("bslz4 chunk is truncated")
        size += 4 + _BLOCK_LENGTH.unpack_from(payload, start)[0]
    return size


def _segments(
    payload: memoryview, elements: int, itemsize: int, block: int, parts: int
) -> list[_Segment]:
    """Split the payload into ``parts`` runs of whole blocks; the last run takes the tail."""
    full_blocks = elements // block
    offsets = _block_offsets(payload, full_blocks)
    tail = _tail_bytes(payload, offsets[-1], elements - full_blocks * block, itemsize)
    if offsets[-1] + tail != len(payload):
        raise DataUnavailable(
            f"bslz4 chunk holds {len(payload)} payload bytes, "
            f"its blocks describe {offsets[-1] + tail}"
        )
    parts = max(1, min(parts, full_blocks))
    bounds = [full_blocks * k // parts for k in range(parts + 1)]
    segments = []
    for k in range(parts):
        lo, hi = bounds[k], bounds[k + 1]
        end = offsets[hi] + (tail if k == parts - 1 else 0)
        count = (hi - lo) * block + (elements - full_blocks * block if k == parts - 1 else 0)
        segments.append(_Segment(offsets[lo], end - offsets[lo], lo * block, count))
    return segments


def _header(chunk: bytes, expected_bytes: int, itemsize: int) -> int:
    """Check the 12-byte chunk header; return the block size in elements."""
    if len(chunk) < _HEADER.size:
        raise DataUnavailable("bslz4 chunk is shorter than its header")
    total_bytes, block_bytes = _HEADER.unpack_from(chunk)
    if total_bytes != expected_bytes:
        raise DataUnavailable(
            f"bslz4 chunk holds {total_bytes} bytes, the frame needs {expected_bytes}"
        )
    block = int(block_bytes) // itemsize
    if block <= 0 or block_bytes % itemsize or block % _BLOCK_MULTIPLE:
        raise DataUnavailable(f"bslz4 chunk has an invalid block size of {block_bytes} bytes")
    return block


def _decode_threads(
    decode: _Decoder, chunk: bytes, out: npt.NDArray[Any], block: int, threads: int
) -> None:
    """Decode the chunk's blocks into ``out`` with up to ``threads`` threads."""
    payload = memoryview(chunk)[_HEADER.size :]
    parts = threads if out.nbytes >= _MIN_SPLIT_BYTES else 1
    segments = _segments(payload, out.size, out.itemsize, block, parts)
    source = np.frombuffer(chunk, dtype=np.uint8)[_HEADER.size :]
    errors: list[str] = []

    def work(part: _Segment) -> None:
        consumed = decode(
            source.ctypes.data + part.in_offset,
            out.ctypes.data + part.first_element * out.itemsize,
            part.elements,
            out.itemsize,
            block,
        )
        if consumed != part.in_bytes:
            errors.append(f"bslz4 block decode failed (code {consumed})")

    helpers = [threading.Thread(target=work, args=(part,), daemon=True) for part in segments[1:]]
    for helper in helpers:
        helper.start()
    work(segments[0])
    for helper in helpers:
        helper.join()
    if errors:
        raise DataUnavailable(errors[0])


def decompress(
    chunk: bytes,
    shape: Sequence[int],
    dtype: npt.DTypeLike,
    *,
    threads: int = DEFAULT_THREADS,
) -> npt.NDArray[Any]:
    """Decode one bslz4 chunk (header included) into a new array of ``shape``/``dtype``.

    Raises DataUnavailable when the chunk does not describe exactly that array.
    """
    if _DECODE is None:
        raise DataUnavailable("bslz4 decoder unavailable (hdf5plugin without bshuf symbols)")
    kind = np.dtype(dtype)
    out = np.empty(tuple(shape), dtype=kind)
    block = _header(chunk, out.nbytes, kind.itemsize)
    if out.size:
        _decode_threads(_DECODE, chunk, out.reshape(-1), block, max(1, threads))
    return out


def available() -> bool:
    """Whether the fast decoder could be loaded."""
    return _DECODE is not None


def is_frame_chunked_bslz4(dataset: h5py.Dataset) -> bool:
    """True when the fast path applies: the decoder is loaded and each frame of a 3-D
    dataset is one chunk filtered only by bitshuffle+LZ4."""
    if _DECODE is None or dataset.ndim != 3 or dataset.chunks != (1, *dataset.shape[1:]):
        return False
    if not dataset.dtype.isnative or dataset.dtype.kind not in "iu":
        return False
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    filter_id, _flags, options, _name = plist.get_filter(0)
    return bool(filter_id == BSLZ4_FILTER_ID and len(options) > 4 and options[4] == _BSHUF_LZ4)
