"""The reduced-image cache's byte budget in Redis, and the start-up check of its instance.

Redis' own ``maxmemory`` cannot be relied on to bound the cache: a site may point the
service at a shared or managed instance without one (Redis grew to 9 GB in 150 s that
way), with ``noeviction`` (writes then fail, the broker's included), or with
``allkeys-lru`` shared with the broker (queues may then be evicted). So the service keeps
its own budget (:class:`CacheBudget`) and says once at start-up what is wrong with the
instance (:func:`warn_about_cache_server`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from istasks.keys import CACHE_BYTES, CACHE_EVICTIONS, CACHE_INDEX, REDUCED, budget_keys
from istasks.redisconn import connect

log = logging.getLogger(__name__)

#: Index entries unused for longer than the TTL (their keys expired) forgotten per write.
STALE_PER_WRITE = 64

#: Account for one reduced image just SET in the same MULTI, within the budget (KEYS: the
#: image's key, then keys.budget_keys(); ARGV: now, max_bytes, reduced prefix, stale
#: before, how many stale entries at most). Sizes are what Redis holds (MEMORY USAGE).
#: Evicts least recently used images (only keys under the reduced prefix are ever
#: deleted: a foreign member is just dropped from the index) until the value fits.
#: Returns {bytes used, evicted}. The value itself is not passed to Lua: as an argument
#: it was copied twice more (Lua string, then the stored object), 3 x 9 MB per write of
#: a 1500 px image held by Redis while 16 workers wrote at once.
_STORE_LUA = """
local key, index, sizes, used_key, evictions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, budget = ARGV[1], tonumber(ARGV[2])
local prefix, stale_before, stale_max = ARGV[3], ARGV[4], tonumber(ARGV[5])
local function forget(member, unlink)
  local size = tonumber(redis.call('HGET', sizes, member) or '0')
  redis.call('ZREM', index, member)
  redis.call('HDEL', sizes, member)
  if size > 0 then redis.call('DECRBY', used_key, size) end
  if unlink and string.sub(member, 1, #prefix) == prefix then
    redis.call('UNLINK', member)
  end
end
forget(key, false)
local stale = redis.call('ZRANGEBYSCORE', index, '-inf', stale_before, 'LIMIT', 0, stale_max)
for _, member in ipairs(stale) do forget(member, true) end
if tonumber(redis.call('GET', used_key) or '0') < 0 then redis.call('SET', used_key, 0) end
-- What Redis holds for it (allocator rounding included: a 4 MiB value takes 5 MiB); a
-- managed Redis may refuse MEMORY: then the value's length and a little.
local held = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', '0')
local size = type(held) == 'number' and held or redis.call('STRLEN', key) + 64
local evicted = 0
while tonumber(redis.call('GET', used_key) or '0') + size > budget do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if not oldest then
    redis.call('SET', used_key, 0)
    break
  end
  forget(oldest, true)
  evicted = evicted + 1
end
redis.call('ZADD', index, now, key)
redis.call('HSET', sizes, key, size)
local used = redis.call('INCRBY', used_key, size)
if evicted > 0 then redis.call('INCRBY', evictions, evicted) end
return {used, evicted}
"""


@dataclass(frozen=True)
class CacheUsage:
    """The cache budget as Redis holds it (``isctl status``, metrics)."""

    max_bytes: int
    used_bytes: int
    entries: int
    evictions: int


class CacheBudget:
    """A byte budget for reduced images in Redis, every ESAF together, enforced on write.

    Every write is one MULTI: the SET, then a Lua script that evicts the least recently
    used images (a sorted set of keys by last use, a hash of their sizes, a byte
    counter) until the new one fits and records it; both run atomically. Reads and LRU
    hits refresh the last use. Only reduced-image keys are entered in the index and only
    they are ever deleted, so queues and results are never evicted to make room. The
    workers' Redis users may touch the budget's keys and UNLINK any reduced image
    (queues.acl), which at worst lets a hijacked worker evict other ESAFs' cached images,
    never read them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._scripts: dict[int, Any] = {}

    def store(
        self, r: redis.Redis, key: str, data: bytes, ttl_s: int, *, counter: str | None = None
    ) -> tuple[int, int]:
        """Write ``key`` within the budget; (bytes used after, images evicted). One
        MULTI: the SET, then the accounting script, atomically; ``counter`` (the
        ESAF's "computed" statistic) is incremented in the same round trip."""
        script = self._scripts.get(id(r))
        if script is None:
            script = self._scripts[id(r)] = r.register_script(_STORE_LUA)
        now = time.time()
        args: list[str | int] = [repr(now), self.max_bytes, f"{REDUCED}:", repr(now - ttl_s)]
        with r.pipeline(transaction=True) as pipe:
            if counter is not None:
                pipe.incr(counter)
            pipe.set(key, data, ex=ttl_s)
            script(keys=[key, *budget_keys()], args=[*args, STALE_PER_WRITE], client=pipe)
            used, evicted = pipe.execute()[-1]
        if evicted:
            log.info("cache budget: evicted %d image(s) for %s, %d of %d bytes used",
                     evicted, key, used, self.max_bytes)  # fmt: skip
        return int(used), int(evicted)


def cache_usage(r: redis.Redis, max_bytes: int) -> CacheUsage:
    """What the budget's keys say now."""
    with r.pipeline(transaction=False) as pipe:
        pipe.get(CACHE_BYTES)
        pipe.zcard(CACHE_INDEX)
        pipe.get(CACHE_EVICTIONS)
        used, entries, evictions = pipe.execute()
    return CacheUsage(max_bytes, int(used or 0), int(entries or 0), int(evictions or 0))


# -- start-up check of the cache instance ------------------------------------------------

_warned: set[str] = set()
_warned_lock = threading.Lock()


def cache_server_problems(cache_url: str, broker_url: str | None, max_bytes: int) -> list[str]:
    """What is wrong with the cache's Redis instance, each naming the setting to fix:
    no ``maxmemory``, ``noeviction``, or the broker's own instance (same ``run_id``)."""
    cache = connect(cache_url, socket_timeout=2.0, socket_connect_timeout=1.0)
    try:
        memory = cache.info("memory")
        cache_run = cache.info("server").get("run_id")
    finally:
        cache.close()
    budget = f"meanwhile only IS_CACHE_MAX_BYTES={max_bytes} bounds the cache"
    problems = []
    maxmemory = int(memory.get("maxmemory", 0) or 0)
    policy = str(memory.get("maxmemory_policy", ""))
    if maxmemory == 0:
        problems.append(
            "cache Redis has no maxmemory: set maxmemory and maxmemory-policy allkeys-lru in its "
            "redis.conf (ops/redis/cache.conf) or point IS_CACHE_URL at such an instance; " + budget
        )
    elif policy == "noeviction":
        problems.append(
            "cache Redis has maxmemory-policy noeviction: when full every write fails; set "
            "maxmemory-policy allkeys-lru (ops/redis/cache.conf) or point IS_CACHE_URL elsewhere; "
            + budget
        )
    if broker_url and _run_id(broker_url) == cache_run:
        queues = (
            " (its allkeys policy may evict queued requests)"
            if policy.startswith("allkeys")
            else ""
        )
        problems.append(
            f"the cache shares the broker's Redis{queues}: set IS_CACHE_URL to an instance of "
            f"its own (ops/redis/cache.conf); {budget}"
        )
    return problems


def warn_about_cache_server(cache_url: str | None, broker_url: str | None, max_bytes: int) -> None:
    """Log each problem of the cache instance once per process (start-up of the
    supervisor and the bridge; workers' Redis users may not run INFO)."""
    if not cache_url:
        return
    try:
        problems = cache_server_problems(cache_url, broker_url, max_bytes)
    except (redis.RedisError, OSError) as exc:
        log.info("cache Redis not checked (%s)", exc)
        return
    for problem in problems:
        with _warned_lock:
            if problem in _warned:
                continue
            _warned.add(problem)
        log.warning("%s", problem)


def _run_id(url: str) -> object:
    client = connect(url, socket_timeout=2.0, socket_connect_timeout=1.0)
    try:
        return client.info("server").get("run_id")
    finally:
        client.close()
