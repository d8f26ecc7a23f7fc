"""The cache's byte budget in Redis and the start-up check of its instance, against real
redis-servers (one without maxmemory, as a site's shared Redis may be)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from istasks import cache_budget
from istasks.cache import FileVersion, ReducedCache
from istasks.cache_budget import CacheBudget, cache_server_problems, cache_usage
from istasks.core.params import ViewParams
from istasks.core.readers.base import Frame
from istasks.core.view import Reduced, reduce_frame
from istasks.keys import CACHE_BYTES, CACHE_INDEX, CACHE_SIZES, REDUCED, reduced_key
from ops.redisserver import start_redis
from queues.acl import AclManager
from queues.naming import Identity

TTL_S = 600
IMAGE_BYTES = 1000


def _image(n: int) -> bytes:
    return bytes([n % 256]) * IMAGE_BYTES


def _store(r: redis.Redis, budget: CacheBudget, gid: int, name: str) -> tuple[int, int]:
    return budget.store(r, reduced_key(gid, name, "v"), _image(gid), TTL_S)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def held(client: redis.Redis) -> int:
    """What Redis holds for one image (MEMORY USAGE, what the budget counts): budgets of
    n * held + held // 2 take exactly n images."""
    key = reduced_key(5009, "p", "v")  # as long as the tests' keys
    client.set(key, _image(0))
    size = int(client.memory_usage(key, samples=0) or 0)
    client.delete(key)
    assert size >= IMAGE_BYTES
    return size


def _budget(n: int, held: int) -> CacheBudget:
    return CacheBudget(n * held + held // 2)


def test_writes_past_the_budget_evict_the_least_recently_used_of_any_esaf(
    client: redis.Redis, held: int
) -> None:
    budget = _budget(3, held)
    _store(client, budget, 5001, "a")
    _store(client, budget, 5002, "b")
    _store(client, budget, 5001, "c")
    # "a" is read again (as ReducedCache does on a Redis hit): "b" is now the oldest.
    client.zadd(CACHE_INDEX, {reduced_key(5001, "a", "v"): 9e12}, xx=True)
    used, evicted = _store(client, budget, 5003, "d")
    assert (used, evicted) == (3 * held, 1)
    assert client.exists(reduced_key(5002, "b", "v")) == 0
    for gid, name in ((5001, "a"), (5001, "c"), (5003, "d")):
        assert client.get(reduced_key(gid, name, "v")) == _image(gid)
    # d is now newer than c: the next write evicts c, then a (read "in the future").
    _store(client, budget, 5004, "e")
    assert client.exists(reduced_key(5001, "c", "v")) == 0
    assert cache_usage(client, budget.max_bytes).evictions == 2
    assert client.hlen(CACHE_SIZES) == client.zcard(CACHE_INDEX) == 3


def test_rewriting_a_key_counts_its_bytes_once(client: redis.Redis, held: int) -> None:
    budget = _budget(2, held)
    for _ in range(5):
        _store(client, budget, 5001, "a")
    usage = cache_usage(client, budget.max_bytes)
    assert (usage.used_bytes, usage.entries, usage.evictions) == (held, 1, 0)


def test_queues_results_and_foreign_index_members_are_never_evicted(
    client: redis.Redis, held: int
) -> None:
    """Only reduced-image keys are deleted: a queue name that got into the index (e.g.
    written by hand) is dropped from it, and the queue itself stays."""
    client.lpush("1000:5001", b"queued envelope")
    client.set("is:res:1000:5001:celery-task-meta-x", b"result")
    client.zadd(CACHE_INDEX, {"1000:5001": 9e12})  # the "most recent": evicted last
    client.hset(CACHE_SIZES, "1000:5001", held)
    client.incrby(CACHE_BYTES, held)
    budget = _budget(1, held)
    for n in range(20):
        _store(client, budget, 5001, f"img{n}")
    assert client.lrange("1000:5001", 0, -1) == [b"queued envelope"]
    assert client.get("is:res:1000:5001:celery-task-meta-x") == b"result"
    assert client.zcard(CACHE_INDEX) == 1
    assert client.keys(f"{REDUCED}:*") == [reduced_key(5001, "img19", "v").encode()]


def test_redis_memory_stays_bounded_without_maxmemory(client: redis.Redis) -> None:
    """The loop of the issue in small: 4 MB of images a write, 400 MB written, a 40 MB
    budget; Redis' own memory stays near the budget (this instance has no maxmemory)."""
    assert int(client.config_get("maxmemory")["maxmemory"]) == 0
    budget = CacheBudget(40 * 1024 * 1024)
    data = b"x" * (4 * 1024 * 1024)
    before = int(client.info("memory")["used_memory"])
    for n in range(100):
        budget.store(client, reduced_key(5000 + n % 7, f"f{n}", "v"), data, TTL_S)
    grown = int(client.info("memory")["used_memory"]) - before
    usage = cache_usage(client, budget.max_bytes)
    assert usage.used_bytes <= budget.max_bytes and 7 <= usage.entries <= 10
    assert grown < 48 * 1024 * 1024, grown


def test_entries_unused_past_the_ttl_are_forgotten_on_the_next_write(
    client: redis.Redis, held: int
) -> None:
    budget = _budget(100, held)
    budget.store(client, reduced_key(5001, "o", "v"), _image(1), 1)
    client.zadd(CACHE_INDEX, {reduced_key(5001, "o", "v"): 1.0}, xx=True)  # used long ago
    _store(client, budget, 5001, "n")
    assert cache_usage(client, budget.max_bytes).used_bytes == held
    assert client.zrange(CACHE_INDEX, 0, -1) == [reduced_key(5001, "n", "v").encode()]


def test_reduced_cache_keeps_redis_within_budget_and_refreshes_use(
    redis_url: str, client: redis.Redis, tmp_path: Path, rng: np.random.Generator
) -> None:
    """Through ReducedCache: each image's Redis copy counts against the budget, and a
    Redis hit (another worker's lookup) makes that image the most recently used."""
    pixels = rng.poisson(30, size=(256, 256)).astype(np.uint32)
    views = [ViewParams(xsize=64, frame=n) for n in range(4)]

    def compute(version: FileVersion) -> Reduced:
        return reduce_frame(Frame(pixels.copy(), None, 0xFFFFFFFF, {}), views[0])

    path = tmp_path / "f.h5"
    path.write_bytes(b"x")
    probe = reduced_key(5001, "0" * 24, views[0].cache_token())  # as long as the real keys
    client.set(probe, compute(FileVersion(str(path), 0, 0)).to_bytes())
    one = int(client.memory_usage(probe, samples=0) or 0)
    client.delete(probe)
    caches = [
        ReducedCache(
            redis_url,
            5001,
            Reduced.from_bytes,
            ttl_s=TTL_S,
            lru_max_bytes=1,
            redis_max_bytes=3 * one + one // 2,
        )
        for _ in range(2)
    ]
    writer, reader = caches
    for view in views[:3]:
        writer.get(str(path), view.cache_token(), compute)
    reader.get(str(path), views[0].cache_token(), compute)  # a Redis hit: 0 is now newest
    writer.get(str(path), views[3].cache_token(), compute)  # evicts 1, the oldest
    version = writer.key(FileVersion(str(path), path.stat().st_mtime_ns, 1), "")
    kept = {k.decode() for k in client.zrange(CACHE_INDEX, 0, -1)}
    assert len(kept) == 3 and cache_usage(client, 0).used_bytes == 3 * one
    assert all(k.startswith(version) for k in kept)
    assert any(k.endswith(views[0].cache_token()) for k in kept)
    assert not any(k.endswith(views[1].cache_token()) for k in kept)
    writer.close()
    reader.close()


def test_worker_users_evict_other_esafs_images_but_cannot_read_them(
    redis_url: str, client: redis.Redis, held: int
) -> None:
    """With the supervisor's per-identity ACL users: B's write evicts A's image (UNLINK
    alone is allowed on other ESAFs' keys), and B still gets NOPERM reading A's."""
    acl = AclManager(redis_url, redis_url, redis_url, tag="budgettest")
    assert acl.probe() == "on"
    a, b = Identity(1001, 5001), Identity(1002, 5002)
    worker_a = redis.Redis.from_url(acl.grant(a).cache)
    worker_b = redis.Redis.from_url(acl.grant(b).cache)
    try:
        budget = _budget(1, held)
        _store(worker_a, budget, a.gid, "a")
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker_b.get(reduced_key(a.gid, "a", "v"))
        assert _store(worker_b, budget, b.gid, "b") == (held, 1)
        assert client.exists(reduced_key(a.gid, "a", "v")) == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker_b.set(reduced_key(a.gid, "a", "v"), b"poisoned")
    finally:
        worker_a.close()
        worker_b.close()
        acl.revoke_all()
        acl.close()


# -- the start-up check ------------------------------------------------------------------


def test_check_names_the_setting_for_a_shared_instance_without_maxmemory(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    problems = cache_server_problems(redis_url, redis_url, 1 << 30)
    assert len(problems) == 2
    assert "no maxmemory" in problems[0] and "ops/redis/cache.conf" in problems[0]
    assert "shares the broker's Redis" in problems[1] and "IS_CACHE_URL" in problems[1]
    cache_budget._warned.clear()
    with caplog.at_level(logging.WARNING, logger="istasks.cache_budget"):
        for _ in range(3):  # supervisor and bridge in one process, say: once each
            cache_budget.warn_about_cache_server(redis_url, redis_url, 1 << 30)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert all("IS_CACHE_MAX_BYTES=1073741824" in r.getMessage() for r in caplog.records)


def test_check_of_the_two_instance_layout_and_of_noeviction(redis_url: str) -> None:
    cache = start_redis(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"))
    full = start_redis(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "noeviction"))
    try:
        assert cache_server_problems(cache.url, redis_url, 1 << 30) == []
        (problem,) = cache_server_problems(full.url, redis_url, 1 << 30)
        assert "noeviction" in problem and "maxmemory-policy allkeys-lru" in problem
        # The same server under another URL is still the broker's.
        shared = cache_server_problems(cache.url, cache.url.replace("/0", "/1"), 1 << 30)
        assert len(shared) == 1 and "may evict queued requests" in shared[0]
    finally:
        cache.stop()
        full.stop()


def test_unreachable_cache_is_not_a_start_up_failure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="istasks.cache_budget"):
        cache_budget.warn_about_cache_server("redis://127.0.0.1:1/0", None, 1 << 30)
    assert "not checked" in caplog.text


def test_a_redis_without_memory_usage_counts_the_value_length() -> None:
    """A managed Redis may disable MEMORY: the budget then counts the value's length."""
    server = start_redis(extra_args=("--rename-command", "MEMORY", ""))
    client = redis.Redis.from_url(server.url)
    try:
        with pytest.raises(redis.ResponseError):
            client.memory_usage("x")
        budget = CacheBudget(2 * (IMAGE_BYTES + 64))
        for name in "abc":
            _store(client, budget, 5001, name)
        usage = cache_usage(client, budget.max_bytes)
        assert (usage.used_bytes, usage.entries, usage.evictions) == (2 * (IMAGE_BYTES + 64), 2, 1)
    finally:
        client.close()
        server.stop()
