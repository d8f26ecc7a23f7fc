"""The worker's LRU of decoded frames (issue 13, speed): the tiles of the frame on screen
are reduced from one decode, with the same result as from a fresh read, within budget."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from istasks.cache import ReaderCache, report_outcome, stat_version
from istasks.core.params import ViewParams
from istasks.core.readers import open_reader
from istasks.core.readers.base import Frame, FrameReader
from istasks.core.view import prepare_frame, reduce_frame
from istasks.service import (
    READER_CACHE_SIZE,
    PixelDataError,
    PixelRequestError,
    Service,
    build_service,
)
from istasks.settings import Settings
from ops.testdata.eiger import write_eiger
from queues.naming import Identity

IDENT = Identity(4001, 5001)


@pytest.fixture
def master(tmp_path: Path) -> Path:
    return write_eiger(tmp_path / "data", "t", nimages=3, frames_per_file=2, shape=(700, 640))


class CountingReader:
    """A real reader that counts the frames it decodes (the number under test)."""

    def __init__(self, reader: FrameReader, counts: list[int]) -> None:
        self._reader = reader
        self._counts = counts

    def read_frame(self, number: int) -> Frame:
        self._counts.append(number)
        return self._reader.read_frame(number)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


def _counting_service(redis_url: str, reads: list[int], **settings: Any) -> Service:
    svc = build_service(Settings(redis_url=redis_url, **settings), IDENT)
    svc.readers.close()
    svc.readers = ReaderCache(
        READER_CACHE_SIZE,
        lambda path: CountingReader(open_reader(path), reads),  # type: ignore[arg-type]
        lambda reader: reader.close(),
    )
    return svc


@pytest.fixture
def reads() -> list[int]:
    return []


@pytest.fixture
def service(redis_url: str, reads: list[int]) -> Iterator[Service]:
    svc = _counting_service(redis_url, reads)
    yield svc
    svc.close()


def test_prepared_frame_reduces_to_the_same_view(master: Path) -> None:
    reader = open_reader(str(master))
    try:
        prepared = prepare_frame(reader.read_frame(2))
        assert not prepared.pixels.flags.writeable and prepared.mask is None
        for params in (ViewParams(2, 256), ViewParams(2, 300, 2.0, 0.5, 0.5), ViewParams(2, 64)):
            fresh = reduce_frame(reader.read_frame(2), params)
            again = reduce_frame(prepared, params)
            assert np.array_equal(fresh.pixels, again.pixels)
            assert fresh.meta == again.meta
    finally:
        reader.close()


def test_tiles_of_one_frame_decode_it_once(
    service: Service, master: Path, reads: list[int]
) -> None:
    job = {"fn": str(master), "frame": 2, "xsize": 128}
    for zoom, col, row in ((1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 1, 1), (4, 3, 2)):
        frames = service.jpeg({**job, "zoom": zoom, "segcol": col, "segrow": row})
        assert frames[1], "no meta: the view failed"
    assert reads == [2]
    assert service.cache.stats()["computed"] == 5  # five reductions, one decode
    service.jpeg({**job, "frame": 3})
    assert reads == [2, 3]


def test_concurrent_tiles_share_one_decode(
    service: Service, master: Path, reads: list[int]
) -> None:
    barrier = threading.Barrier(4)

    def tile(col: int) -> None:
        barrier.wait()
        service.jpeg({"fn": str(master), "frame": 1, "xsize": 64, "zoom": 2, "segcol": col % 2,
                      "segrow": col // 2})  # fmt: skip

    threads = [threading.Thread(target=tile, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reads == [1]


def test_budget_bounds_the_frames_kept(redis_url: str, master: Path, reads: list[int]) -> None:
    frame_bytes = 700 * 640 * 4
    svc = _counting_service(redis_url, reads, frame_lru_max_bytes=frame_bytes + 100_000)
    try:
        for frame, xsize in ((1, 100), (2, 100), (3, 100), (1, 101)):  # 1 again: a new view
            svc.jpeg({"fn": str(master), "frame": frame, "xsize": xsize})
        assert len(svc.frames) == 1 and svc.frames.nbytes <= svc.frames.max_bytes
        assert reads == [1, 2, 3, 1]  # only the last frame stayed
    finally:
        svc.close()
    off = _counting_service(redis_url, reads, frame_lru_max_bytes=0)
    try:
        reads.clear()
        for zoom in (1, 2):
            off.jpeg({"fn": str(master), "frame": 1, "xsize": 102, "zoom": zoom})
        assert reads == [1, 1] and len(off.frames) == 0
    finally:
        off.close()


def test_a_rewritten_file_is_decoded_again(
    service: Service, tmp_path: Path, reads: list[int]
) -> None:
    data = tmp_path / "re"
    master = write_eiger(data, "r", nimages=1, shape=(128, 128), seed=1)
    service.jpeg({"fn": str(master), "xsize": 64})
    fresh = write_eiger(tmp_path / "fresh", "r", nimages=1, shape=(256, 256), seed=2)
    for path in fresh.parent.iterdir():
        path.replace(data / path.name)
    service.jpeg({"fn": str(master), "xsize": 64, "zoom": 2})
    assert reads == [1, 1]


def _cached_in_redis(svc: Service, master: Path, params: ViewParams) -> bool:
    key = svc.cache.key(stat_version(str(master)), params.cache_token())
    client = redis.Redis.from_url(svc.settings.cache or "")
    try:
        return bool(client.exists(key))
    finally:
        client.close()


@pytest.mark.parametrize(
    "case",  # share_zoomed_views, frame_lru_max_bytes, tile kept in the LRU
    [(False, 160 << 20, False), (True, 160 << 20, True), (False, 0, True)],
)
def test_zoomed_views_are_reduced_again_from_the_frame_lru_unless_shared(
    redis_url: str, master: Path, reads: list[int], case: tuple[bool, int, bool]
) -> None:
    """A tile is in Redis only when shared. Not shared, its reduced image is not kept
    either while the frame LRU holds the frame: a second reduction (another contrast)
    starts from the decoded frame, with no decode; without a frame LRU it is kept."""
    shared, frame_lru_max_bytes, kept = case
    svc = _counting_service(
        redis_url, reads, share_zoomed_views=shared, frame_lru_max_bytes=frame_lru_max_bytes
    )
    whole, tile = ViewParams(2, 96), ViewParams(2, 96, 2.0, 1.0, 0.0)
    try:
        for params in (whole, tile):
            svc.jpeg({"fn": str(master), "frame": 2, "xsize": 96, "zoom": params.zoom,
                      "segcol": params.segcol, "segrow": params.segrow})  # fmt: skip
        assert _cached_in_redis(svc, master, whole)
        assert _cached_in_redis(svc, master, tile) is shared
        assert svc.cache.stats()["computed"] == 2  # a tile computed here still counts
        with report_outcome() as outcome:
            again = svc.reduced(str(master), tile)
        assert outcome.outcome == ("lru" if kept else "computed")
        assert reads == ([2] if frame_lru_max_bytes else [2, 2])
        with report_outcome():
            first = svc.reduced(str(master), tile)
        np.testing.assert_array_equal(first.pixels, again.pixels)
        assert first.meta == again.meta
    finally:
        svc.close()


def test_a_pixel_is_read_from_the_frame_on_screen(
    service: Service, master: Path, reads: list[int]
) -> None:
    service.jpeg({"fn": str(master), "frame": 2, "xsize": 64})
    frames = service.pixel({"fn": str(master), "frame": 2, "x": 5, "y": 7})
    reader = open_reader(str(master))
    try:
        expected = int(prepare_frame(reader.read_frame(2)).pixels[7, 5])
    finally:
        reader.close()
    assert json.loads(frames[1])["value"] == expected and reads == [2]  # no second decode
    assert json.loads(service.pixel({"fn": str(master), "x": 640, "y": 0})[1])["value"] is None
    with pytest.raises(PixelRequestError):
        service.pixel({"x": 1, "y": 1})
    with pytest.raises(PixelDataError, match="frame"):
        service.pixel({"fn": str(master), "frame": 9, "x": 1, "y": 1})
