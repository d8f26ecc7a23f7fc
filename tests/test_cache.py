"""The reduced-image cache: LRU + Redis + single-flight, against a real redis-server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from istasks import cache as cache_module
from istasks.cache import (
    ByteLRU,
    FileVersion,
    ReaderCache,
    ReducedCache,
    holder_gone,
    stat_version,
)
from istasks.core.params import ViewParams
from istasks.core.readers.base import Frame
from istasks.core.view import Reduced, reduce_frame
from istasks.errors import DataUnavailable
from istasks.keys import REDUCED, holder_alive_key, lock_key, stats_key
from ops.redisserver import free_port
from tests.processes import wait_for

GID = 5001
VIEW = ViewParams(xsize=64)


class Computer:
    """A compute callback that reduces a seeded frame and counts its calls."""

    def __init__(self, rng: np.random.Generator, delay_s: float = 0.0) -> None:
        self.pixels = rng.poisson(30, size=(256, 256)).astype(np.uint32)
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, version: FileVersion) -> Reduced:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        meta = {"beam_center_x": 128.0, "beam_center_y": 128.0, "fn": version.path}
        frame = Frame(self.pixels.copy(), None, 0xFFFFFFFF, meta)
        return reduce_frame(frame, VIEW)


def make_cache(
    url: str | None, gid: int = GID, lru_max_bytes: int = 1 << 26
) -> ReducedCache[Reduced]:
    return ReducedCache(url, gid, Reduced.from_bytes, ttl_s=60, lru_max_bytes=lru_max_bytes)


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "x_master.h5"
    path.write_bytes(b"version one")
    return path


def test_second_request_hits_lru_and_other_worker_hits_redis(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    first = make_cache(redis_url)
    a = first.get(str(image_file), VIEW.cache_token(), compute)
    b = first.get(str(image_file), VIEW.cache_token(), compute)
    assert b is a
    assert first.stats() == {"computed": 1, "hits": 0, "lru_hits": 1}
    # Another worker of the same gid: empty LRU, finds the value in Redis.
    other = make_cache(redis_url)
    c = other.get(str(image_file), VIEW.cache_token(), compute)
    np.testing.assert_array_equal(c.pixels, a.pixels)
    assert c.meta == a.meta
    assert compute.calls == 1
    assert other.stats() == {"computed": 1, "hits": 1, "lru_hits": 1}
    keys = redis.Redis.from_url(redis_url).keys(f"{REDUCED}:{GID}:*")
    assert len(keys) == 1
    assert 0 < redis.Redis.from_url(redis_url).ttl(keys[0]) <= 60


def test_lru_hits_reach_redis_in_the_background(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    """A warm lookup does not wait for Redis: its hit is written by the reporter thread,
    which refreshes the entry's TTL and counts every hit, however they were batched."""
    cache = make_cache(redis_url)
    client = redis.Redis.from_url(redis_url)
    cache.get(str(image_file), VIEW.cache_token(), Computer(rng))
    (key,) = client.keys(f"{REDUCED}:{GID}:*")
    client.expire(key, 5)  # the TTL the hits must push back up to 60 s
    hits = 50
    threads = [
        threading.Thread(
            target=cache.get, args=(str(image_file), VIEW.cache_token(), Computer(rng))
        )
        for _ in range(hits)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counter = stats_key(GID, "lru_hits")
    wait_for(lambda: client.get(counter) == str(hits).encode(), 5.0, f"lru_hits {hits}")
    assert client.ttl(key) > 5
    cache.close()


def test_rewritten_file_is_computed_again(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    cache = make_cache(redis_url)
    cache.get(str(image_file), VIEW.cache_token(), compute)
    image_file.write_bytes(b"version two, longer")
    cache.get(str(image_file), VIEW.cache_token(), compute)
    st = image_file.stat()
    os.utime(image_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, new mtime
    cache.get(str(image_file), VIEW.cache_token(), compute)
    assert compute.calls == 3
    assert cache.stats()["computed"] == 3


def test_other_gid_and_other_view_are_separate(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    make_cache(redis_url, gid=GID).get(str(image_file), VIEW.cache_token(), compute)
    make_cache(redis_url, gid=GID + 1).get(str(image_file), VIEW.cache_token(), compute)
    zoomed = ViewParams(xsize=64, zoom=2.0)
    make_cache(redis_url, gid=GID).get(str(image_file), zoomed.cache_token(), compute)
    assert compute.calls == 3


def test_missing_file_is_data_unavailable(
    redis_url: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    with pytest.raises(DataUnavailable, match="No such file"):
        make_cache(redis_url).get(str(tmp_path / "gone.h5"), VIEW.cache_token(), compute)
    assert compute.calls == 0


def test_lru_respects_byte_budget() -> None:
    lru: ByteLRU[bytes] = ByteLRU(max_bytes=100)
    for name in "abc":
        lru.put(name, name.encode() * 40, 40)
    assert lru.get("a") is None  # evicted: 120 > 100
    assert lru.get("b") is not None
    lru.put("d", b"d" * 40, 40)  # "c" is now the least recently used
    assert lru.get("c") is None
    assert lru.nbytes == 80
    assert len(lru) == 2
    lru.put("huge", b"x", 101)  # over budget: never stored, nothing evicted
    assert lru.get("huge") is None
    assert len(lru) == 2


def test_cache_lru_evicts_reduced_images(
    redis_url: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    one = compute(FileVersion("x", 0, 0)).nbytes
    cache = make_cache(None, lru_max_bytes=2 * one)
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}.h5"
        path.write_bytes(b"x" * (i + 1))
        files.append(path)
        cache.get(str(path), VIEW.cache_token(), compute)
    assert len(cache.lru) == 2
    assert cache.lru.nbytes <= 2 * one
    compute.calls = 0
    cache.get(str(files[2]), VIEW.cache_token(), compute)  # kept
    cache.get(str(files[0]), VIEW.cache_token(), compute)  # evicted -> computed again
    assert compute.calls == 1


def test_identical_concurrent_requests_compute_once_in_process(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng, delay_s=0.3)
    cache = make_cache(redis_url)
    results: list[Reduced] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.get(str(image_file), VIEW.cache_token(), compute))
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1
    assert len(results) == 8
    assert all(r is results[0] for r in results)


def test_identical_requests_of_two_workers_compute_once(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    """Two caches (two worker processes of one gid) share the work through the Redis lock."""
    compute = Computer(rng, delay_s=0.4)
    caches = [make_cache(redis_url) for _ in range(3)]
    results: list[Reduced] = []
    threads = [
        threading.Thread(
            target=lambda c=c: results.append(c.get(str(image_file), VIEW.cache_token(), compute))
        )
        for c in caches
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1
    assert len(results) == 3
    stats = caches[0].stats()
    assert stats["computed"] == 1
    assert stats["hits"] == 2


def test_lock_of_a_dead_holder_holds_up_nobody(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    """A worker killed mid-computation leaves its lock for LOCK_TTL_S; the next worker
    to want the image sees its holder gone and computes at once (issue 19: a view sent
    again after its worker died waited LOCK_WAIT_S, past its deadline)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = make_cache(redis_url)
    lock = lock_key(GID, cache.key(stat_version(str(image_file)), VIEW.cache_token()))
    client = redis.Redis.from_url(redis_url)
    client.set(lock, f"{dead.pid}@{socket.gethostname()}/killed", px=15_000)
    compute = Computer(rng)
    started = time.monotonic()
    cache.get(str(image_file), VIEW.cache_token(), compute)
    assert time.monotonic() - started < 1.0
    assert compute.calls == 1 and client.exists(lock) == 0


@pytest.mark.parametrize("holder", ["this process", "another host"])
def test_lock_of_a_live_holder_is_waited_for(
    redis_url: str,
    image_file: Path,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    holder: str,
) -> None:
    monkeypatch.setattr(cache_module, "LOCK_WAIT_S", 0.5)
    cache = make_cache(redis_url)
    lock = lock_key(GID, cache.key(stat_version(str(image_file)), VIEW.cache_token()))
    host = socket.gethostname() if holder == "this process" else "elsewhere"
    client = redis.Redis.from_url(redis_url)
    client.set(lock, f"{os.getpid()}@{host}/computing", px=15_000)
    # another host's worker beats (queues.liveness) while it lives
    client.set(holder_alive_key(GID, f"{os.getpid()}@elsewhere"), b"1", px=15_000)
    started = time.monotonic()
    cache.get(str(image_file), VIEW.cache_token(), Computer(rng))
    assert time.monotonic() - started >= 0.5


def test_lock_of_another_hosts_holder_that_stopped_beating_is_taken_over(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    """Issue 14: a host killed while computing leaves its lock for up to its TTL; its
    liveness key expires within 1.5 s, and a worker of another host computes the image
    instead of waiting the lock out (a retried view waited 10 s)."""
    cache = make_cache(redis_url)
    lock = lock_key(GID, cache.key(stat_version(str(image_file)), VIEW.cache_token()))
    client = redis.Redis.from_url(redis_url)
    client.set(lock, b"4242@lost-host/computing", px=15_000)  # no liveness key: it is gone
    compute = Computer(rng)
    started = time.monotonic()
    cache.get(str(image_file), VIEW.cache_token(), compute)
    assert time.monotonic() - started < 1.0
    assert compute.calls == 1


def test_holder_gone_only_for_a_process_of_this_host_that_ended() -> None:
    here = socket.gethostname()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: _state(zombie.pid) == "Z", 10.0, "the child to exit unreaped")
    try:
        assert holder_gone(f"{zombie.pid}@{here}/x".encode())
        assert not holder_gone(f"{os.getpid()}@{here}/x".encode())
        assert not holder_gone(b"1@" + here.encode() + b"/x")  # init lives
        assert not holder_gone(f"{zombie.pid}@elsewhere/x".encode())
        assert not holder_gone(b"0123456789abcdef")  # an older worker's value
    finally:
        zombie.wait()
    assert holder_gone(f"{zombie.pid}@{here}/x".encode())


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    return text[text.rfind(b")") + 2 : text.rfind(b")") + 3].decode()


def test_failed_computation_is_not_cached_and_shared_with_waiters(
    redis_url: str, image_file: Path
) -> None:
    calls = 0

    def failing(version: FileVersion) -> Reduced:
        nonlocal calls
        calls += 1
        raise DataUnavailable("frame 9 not found")

    cache = make_cache(redis_url)
    for _ in range(2):
        with pytest.raises(DataUnavailable, match="frame 9"):
            cache.get(str(image_file), VIEW.cache_token(), failing)
    assert calls == 2  # nothing cached, the lock released each time
    assert redis.Redis.from_url(redis_url).keys("is:lock:*") == []


def test_corrupt_redis_entry_is_recomputed(
    redis_url: str, image_file: Path, rng: np.random.Generator
) -> None:
    compute = Computer(rng)
    make_cache(redis_url).get(str(image_file), VIEW.cache_token(), compute)
    client = redis.Redis.from_url(redis_url)
    (key,) = client.keys(f"{REDUCED}:{GID}:*")
    client.set(key, b"garbage")
    value = make_cache(redis_url).get(str(image_file), VIEW.cache_token(), compute)
    assert compute.calls == 2
    assert value.pixels.shape == (64, 64)


def test_redis_down_degrades_to_computing(image_file: Path, rng: np.random.Generator) -> None:
    compute = Computer(rng)
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    value = cache.get(str(image_file), VIEW.cache_token(), compute)
    again = cache.get(str(image_file), VIEW.cache_token(), compute)
    assert value.pixels.shape == (64, 64)
    assert again is value  # the in-process LRU still works
    assert compute.calls == 1
    assert cache.stats() == {"computed": 0, "hits": 0, "lru_hits": 0}
    assert time.monotonic() - started < 5.0


def test_stat_version_names_the_file_version(image_file: Path) -> None:
    v1 = stat_version(str(image_file))
    assert v1 == stat_version(str(image_file))
    image_file.write_bytes(b"other content!")
    v2 = stat_version(str(image_file))
    assert v2.file_id != v1.file_id


class Handle:
    """A closable stand-in for an opened file (records its own state)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False


def _close(handle: Handle) -> None:
    handle.closed = True


class Opener:
    """A ReaderCache opener that keeps every handle it opened."""

    def __init__(self) -> None:
        self.opened: list[Handle] = []

    def __call__(self, path: str) -> Handle:
        self.opened.append(Handle(path))
        return self.opened[-1]


def test_reader_cache_reuses_and_closes_readers(tmp_path: Path) -> None:
    opener = Opener()
    opened = opener.opened
    readers: ReaderCache[Handle] = ReaderCache(2, opener, _close)
    versions = [FileVersion(str(tmp_path / f"{i}.h5"), i, i) for i in range(3)]
    with readers.lease(versions[0]) as first, readers.lease(versions[0]) as again:
        assert again is first
        with readers.lease(versions[1]), readers.lease(versions[2]):
            pass
        # versions[0] was evicted while leased: still open until the lease ends.
        assert not first.closed
    assert first.closed
    assert len(opened) == 3
    assert len(readers) == 2
    readers.close()
    assert all(h.closed for h in opened)


def test_reader_cache_drops_older_versions_of_a_path(tmp_path: Path) -> None:
    opener = Opener()
    opened = opener.opened
    readers: ReaderCache[Handle] = ReaderCache(4, opener, _close)
    path = str(tmp_path / "m.h5")
    with readers.lease(FileVersion(path, 1, 10)):
        pass
    with readers.lease(FileVersion(path, 2, 12)) as fresh:
        assert opened[0].closed  # the old version's handle is gone at once
        assert not fresh.closed
    assert len(readers) == 1


def test_redis_stats_key_layout(redis_url: str, image_file: Path, rng: np.random.Generator) -> None:
    make_cache(redis_url).get(str(image_file), VIEW.cache_token(), Computer(rng))
    assert redis.Redis.from_url(redis_url).get(stats_key(GID, "computed")) == b"1"
