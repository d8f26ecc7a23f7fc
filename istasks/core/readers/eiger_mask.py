"""Eiger ``pixel_mask`` decoding, shared between master files with the same mask.

Decoding a gzip'd 16M mask through h5py costs a few hundred ms, paid on every new
master file although all runs of a detector carry the same mask. Here a chunked mask's
stored (compressed) chunks are read raw and digested; the digest, together with the
shape, type and filter pipeline, keys a small in-process cache, so an identical mask is
decoded once. A new mask's chunks are decoded in threads (zlib and the bslz4 decoder
release the GIL) straight into the boolean image, looking only at each pixel's low byte.
Pipelines not handled here (and unchunked masks) are read through h5py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from istasks.core import bslz4
from istasks.core.readers.base import PixelMask
from istasks.errors import DataUnavailable

log = logging.getLogger(__name__)

#: Mask bits that make a pixel invalid (NeXus: gap, dead, under/over-responding, noisy...).
#: Higher bits (e.g. 31, virtual pixel) are informational.
INVALID_MASK_BITS = 0xFF
#: Decoded masks kept per process (~30 MB each for a 16M detector, flat index included).
CACHE_ENTRIES = 4
_DEFLATE, _SHUFFLE = 1, 2
_Filter = tuple[int, tuple[int, ...]]
_LowBytes = Callable[[bytes], npt.NDArray[np.uint8]]
#: bitshuffle's ``cd_values[4]`` naming LZ4 (0 is bitshuffle alone, 3 zstd).
_BSHUF_LZ4 = 2

_cache: OrderedDict[bytes, PixelMask] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class MaskCacheStats:
    """Masks decoded (cache misses) and served from the cache by this process."""

    decodes: int = 0
    hits: int = 0


_stats = MaskCacheStats()


class _Unsupported(Exception):
    """The fast path cannot decode this mask; h5py reads it instead."""


@dataclass(frozen=True)
class _StoredChunk:
    """One stored chunk: its logical offset, skipped-filter mask and raw bytes."""

    offset: tuple[int, ...]
    filter_mask: int
    data: bytes


def invalid_pixels(bits: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """True where any of the low 8 mask bits is set (reads only each pixel's low byte)."""
    if bits.dtype.kind not in "iu":
        raise TypeError(f"pixel_mask of type {bits.dtype} is not an integer type")
    data = np.ascontiguousarray(bits)
    low = data.view(np.uint8).reshape(*data.shape, data.itemsize)[..., _low_byte(data.dtype)]
    bad: npt.NDArray[np.bool_] = low != 0
    return bad


def cache_stats() -> MaskCacheStats:
    """A snapshot of this process's mask decode/hit counts (tests, diagnostics)."""
    return MaskCacheStats(_stats.decodes, _stats.hits)


def clear_cache() -> None:
    """Forget every cached mask (tests)."""
    with _cache_lock:
        _cache.clear()


def read_mask(dataset: h5py.Dataset) -> PixelMask:
    """The dataset's invalid pixels, from the cache when its stored bytes were seen before.

    Raises h5py's errors (OSError, ...) when the mask cannot be read.
    """
    if dataset.chunks is None:
        return _decoded(lambda: invalid_pixels(np.asarray(dataset[()])))
    chunks = _stored_chunks(dataset)
    key = _digest(dataset, chunks)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            _stats.hits += 1
            return cached
    mask = _decoded(lambda: _decode_chunked(dataset, chunks))
    with _cache_lock:
        _cache[key] = mask
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return mask


def _decoded(decode: Callable[[], npt.NDArray[np.bool_]]) -> PixelMask:
    """Run ``decode``, count it, wrap the result."""
    bad = decode()
    with _cache_lock:
        _stats.decodes += 1
    return PixelMask(bad)


def _low_byte(dtype: np.dtype[Any]) -> int:
    """Index of the least significant byte within one element."""
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
    return dtype.itemsize - 1 if big else 0


def _is_lz4(options: tuple[int, ...]) -> bool:
    return len(options) > 4 and options[4] == _BSHUF_LZ4


def _filters(dataset: h5py.Dataset) -> tuple[_Filter, ...]:
    """The dataset's filter pipeline as (filter id, options), in write order."""
    plist = dataset.id.get_create_plist()
    pipeline = (plist.get_filter(index) for index in range(plist.get_nfilters()))
    return tuple(
        (int(ident), tuple(int(value) for value in options)) for ident, _, options, _ in pipeline
    )


def _chunk_places(dataset: h5py.Dataset) -> list[tuple[tuple[int, ...], int, int, int]]:
    """(logical offset, filter mask, file address, stored bytes) of every stored chunk."""
    places: list[tuple[tuple[int, ...], int, int, int]] = []

    def visit(info: Any) -> None:
        places.append((tuple(info.chunk_offset), info.filter_mask, info.byte_offset, info.size))

    if hasattr(dataset.id, "chunk_iter"):
        dataset.id.chunk_iter(visit)
    else:  # older HDF5: one query per chunk
        for index in range(dataset.id.get_num_chunks()):
            visit(dataset.id.get_chunk_info(index))
    return places


def _stored_chunks(dataset: h5py.Dataset) -> list[_StoredChunk]:
    """Every stored chunk's raw bytes.

    With the plain POSIX driver and no user block, chunk addresses are file offsets, so
    the bytes are read with ``pread`` on HDF5's own descriptor: one call per chunk costs
    microseconds where ``read_direct_chunk`` costs ~0.1 ms. The first chunk is checked
    against ``read_direct_chunk``; otherwise every chunk is read through HDF5.
    """
    places = _chunk_places(dataset)
    file = dataset.file
    if places and file.driver == "sec2" and file.userblock_size == 0:
        descriptor = int(file.id.get_vfd_handle())
        chunks = [
            _StoredChunk(offset, mask, os.pread(descriptor, size, address))
            for offset, mask, address, size in places
        ]
        if _read_direct(dataset, places[0][0]) == chunks[0]:
            return chunks
        log.warning("eiger: pixel_mask chunk addresses are not file offsets; reading via HDF5")
    return [_read_direct(dataset, offset) for offset, *_ in places]


def _read_direct(dataset: h5py.Dataset, offset: tuple[int, ...]) -> _StoredChunk:
    filter_mask, data = dataset.id.read_direct_chunk(offset)
    return _StoredChunk(offset, int(filter_mask), bytes(data))


def _digest(dataset: h5py.Dataset, chunks: Sequence[_StoredChunk]) -> bytes:
    """Digest of everything the decoded mask depends on: layout, pipeline and stored bytes."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr((dataset.shape, dataset.dtype.str, dataset.chunks)).encode())
    digest.update(repr(_filters(dataset)).encode())
    for chunk in chunks:
        digest.update(repr((chunk.offset, chunk.filter_mask, len(chunk.data))).encode())
        digest.update(chunk.data)
    return digest.digest()


def _decode_chunked(dataset: h5py.Dataset, chunks: list[_StoredChunk]) -> npt.NDArray[np.bool_]:
    """Decode the chunks in threads; anything unusual falls back to h5py's read."""
    try:
        return _decode_threads(dataset, chunks)
    except (_Unsupported, zlib.error, ValueError, DataUnavailable) as exc:
        log.debug("eiger: pixel_mask read through h5py (%s)", exc)
        return invalid_pixels(np.asarray(dataset[()]))


def _decode_threads(dataset: h5py.Dataset, chunks: list[_StoredChunk]) -> npt.NDArray[np.bool_]:
    """Fill the boolean image chunk by chunk, chunks split between threads."""
    shape, chunk_shape = tuple(dataset.shape), tuple(dataset.chunks)
    expected = np.prod([-(-size // step) for size, step in zip(shape, chunk_shape, strict=True)])
    if len(chunks) != expected or any(chunk.filter_mask for chunk in chunks):
        raise _Unsupported("unallocated chunks or skipped filters")
    low_bytes = _low_bytes_decoder(_filters(dataset), dataset.dtype, chunk_shape)
    out = np.empty(shape, dtype=np.bool_)
    errors: list[BaseException] = []

    def work(part: Sequence[_StoredChunk]) -> None:
        try:
            for chunk in part:
                _place(out, chunk.offset, low_bytes(chunk.data).reshape(chunk_shape) != 0)
        except (zlib.error, ValueError, _Unsupported, DataUnavailable) as exc:
            errors.append(exc)

    threads = max(1, min(bslz4.DEFAULT_THREADS, len(chunks)))
    helpers = [threading.Thread(target=work, args=(chunks[n::threads],)) for n in range(1, threads)]
    for helper in helpers:
        helper.start()
    work(chunks[0::threads])
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    return out


def _place(out: npt.NDArray[np.bool_], offset: tuple[int, ...], bad: npt.NDArray[np.bool_]) -> None:
    """Copy a chunk into ``out``; edge chunks are cut to the image."""
    region = tuple(
        slice(start, start + size) for start, size in zip(offset, bad.shape, strict=True)
    )
    target = out[region]
    target[...] = bad[tuple(slice(0, size) for size in target.shape)]


def _low_bytes_decoder(
    filters: tuple[_Filter, ...], dtype: np.dtype[Any], chunk_shape: tuple[int, ...]
) -> _LowBytes:
    """A function from a stored chunk to its elements' low bytes, for the pipelines handled."""
    if dtype.kind not in "iu":
        raise _Unsupported(f"type {dtype}")
    ids = tuple(ident for ident, _ in filters)
    elements, itemsize, low = int(np.prod(chunk_shape)), dtype.itemsize, _low_byte(dtype)
    nbytes = elements * itemsize

    def plain(data: bytes | npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        raw = np.frombuffer(data, np.uint8)
        if raw.size != nbytes:
            raise ValueError(f"chunk holds {raw.size} bytes, expected {nbytes}")
        return raw.reshape(elements, itemsize)[:, low]

    def shuffled(data: bytes) -> npt.NDArray[np.uint8]:
        # HDF5's shuffle stores byte k of every element together: the low bytes are one run.
        if len(data) != nbytes:
            raise ValueError(f"chunk holds {len(data)} bytes, expected {nbytes}")
        return np.frombuffer(data, np.uint8, count=elements, offset=low * elements)

    def bslz4_chunk(data: bytes) -> npt.NDArray[np.uint8]:
        pixels = bslz4.decompress(data, chunk_shape, dtype, threads=1)
        return plain(pixels)

    table: dict[tuple[int, ...], _LowBytes] = {
        (): plain,
        (_DEFLATE,): lambda data: plain(zlib.decompress(data)),
        (_SHUFFLE,): shuffled,
        (_SHUFFLE, _DEFLATE): lambda data: shuffled(zlib.decompress(data)),
    }
    if ids == (bslz4.BSLZ4_FILTER_ID,) and _is_lz4(filters[0][1]) and bslz4.available():
        return bslz4_chunk
    if ids not in table:
        raise _Unsupported(f"filters {ids}")
    return table[ids]
