"""``isctl status``: per-identity backlog read straight from the broker, and live workers.

Flower's ``/api/queues/length`` only counts queues that some live worker consumes, so a
user whose worker is down or not yet started is invisible there although their requests
wait (field notes 3.7). kombu's Redis transport keeps each queue as a Redis list, plus one
list per priority step named ``<queue>\\x06\\x16<step>``, and records every declared
queue in a ``_kombu.binding.<exchange>`` set; we read those directly. Workers come from
the supervisor's control socket when it answers, else from its Redis registry
(:data:`istasks.keys.WORKERS`), else they are reported as unknown. Every host's workers
(several hosts on one broker) come from their heartbeats (queues.liveness): per identity,
the hosts whose worker beats, with node name and running tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from istasks import keys
from istasks.cache_budget import cache_usage
from istasks.errors import WorkerUnavailable
from istasks.redisconn import connect
from istasks.settings import Settings, get_settings
from queues.naming import parse_queue_name

#: kombu's Redis transport: binding sets, the separator before a priority step, and its
#: default priority steps.
BINDING_PREFIX = "_kombu.binding."
PRIORITY_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
#: Exchanges of Celery's remote control and events: their queues are not task queues.
_INTERNAL_EXCHANGES = ("celery.pidbox", "reply.celery.pidbox", "celeryev")
_REDIS_TIMEOUT_S = 5.0
_SCAN_COUNT = 1000
_VALUE_MAX_CHARS = 200


@dataclass
class _QueueScan:
    """Queue names found in the broker, and the priority sub-lists seen per queue."""

    identity: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)
    sublists: dict[str, set[str]] = field(default_factory=dict)


def collect_status(settings: Settings) -> dict[str, Any]:
    """Backlog per queue, reserved messages and workers, as JSON-ready values.

    Never raises for an unreachable broker: the result then has an ``error`` entry.
    """
    if not settings.broker:
        return {"error": "no broker configured: set IS_BROKER_URL or IS_REDIS_URL"}
    status: dict[str, Any] = {"broker": _redacted(settings.broker)}
    client = connect(
        settings.broker, settings, socket_connect_timeout=2.0, socket_timeout=_REDIS_TIMEOUT_S
    )
    try:
        scan = _find_queues(client)
        steps = _priority_steps(settings)
        identity_queues = sorted(scan.identity, key=_identity_sort_key)
        status["queues"] = [
            _identity_row(q, _backlog(client, q, steps, scan)) for q in identity_queues
        ]
        status["other_queues"] = [
            {"queue": q, **_backlog(client, q, steps, scan)} for q in sorted(scan.other)
        ]
        status["workers"] = _workers(settings, client)
        _attach_worker_states(status["queues"], status["workers"])
        status["hosts"] = _hosts(client)
        _attach_hosts(status["queues"], status["hosts"])
        status["cache"] = _cache_budget(settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        status["error"] = f"broker unreachable at {status['broker']}: {exc}"
    except redis.RedisError as exc:  # e.g. NOPERM: a Redis user without SCAN/LLEN rights
        status["error"] = f"broker {status['broker']} refused: {exc}"
    finally:
        client.close()
    return status


def _redacted(url: str) -> str:
    """``url`` without its password, for display."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _priority_steps(settings: Settings) -> tuple[int, ...]:
    """The priority steps the app's transport uses (its options, else kombu's default)."""
    from istasks.app import celery_config

    options = celery_config(settings).get("broker_transport_options", {})
    return tuple(options.get("priority_steps", DEFAULT_PRIORITY_STEPS))


def _text(value: object) -> str:
    """Redis replies are bytes; show them as text whatever they hold."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _is_identity_queue(name: str) -> bool:
    try:
        parse_queue_name(name)
    except ValueError:
        return False
    return True


def _find_queues(client: redis.Redis) -> _QueueScan:
    """Queues declared in binding sets, plus any non-empty identity-queue list (its binding
    may be gone, e.g. after a broker restart without persistence)."""
    scan = _QueueScan()
    for key in client.scan_iter(match=BINDING_PREFIX + "*", count=_SCAN_COUNT, _type="set"):
        exchange = _text(key)[len(BINDING_PREFIX) :]
        internal = exchange in _INTERNAL_EXCHANGES
        for member in client.smembers(key):
            queue = _text(member).split(PRIORITY_SEP)[-1]
            if _is_identity_queue(queue):
                scan.identity.add(queue)
            elif not internal and queue:
                scan.other.add(queue)
    # Identity queue names start with a digit (uid); sub-lists carry the separator.
    for key in client.scan_iter(match="[0-9]*", count=_SCAN_COUNT, _type="list"):
        name = _text(key)
        base, sep, _step = name.partition(PRIORITY_SEP)
        if _is_identity_queue(base):
            scan.identity.add(base)
            if sep:
                scan.sublists.setdefault(base, set()).add(name)
    return scan


def _backlog(
    client: redis.Redis, queue: str, steps: Iterable[int], scan: _QueueScan
) -> dict[str, Any]:
    """Messages waiting in ``queue``: total and per priority step (LLEN of each list)."""
    lists = {queue: 0}
    lists.update({f"{queue}{PRIORITY_SEP}{s}": s for s in steps if s})
    for name in scan.sublists.get(queue, ()):
        suffix = name.partition(PRIORITY_SEP)[2]
        lists.setdefault(name, int(suffix) if suffix.isdigit() else -1)
    pipe = client.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    by_priority: dict[int, int] = {}
    for step, length in zip(lists.values(), pipe.execute(), strict=True):
        if length:
            by_priority[step] = by_priority.get(step, 0) + int(length)
    return {"backlog": sum(by_priority.values()), "by_priority": by_priority}


def _identity_sort_key(queue: str) -> tuple[int, int, bool]:
    identity, prefetch = parse_queue_name(queue)
    return identity.uid, identity.gid, prefetch


def _identity_row(queue: str, backlog: dict[str, Any]) -> dict[str, Any]:
    identity, prefetch = parse_queue_name(queue)
    return {
        "queue": queue,
        "uid": identity.uid,
        "gid": identity.gid,
        "prefetch": prefetch,
        **backlog,
    }


def _workers(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """Live workers: the supervisor's own table when it answers, else its Redis registry."""
    result: dict[str, Any] = {"source": None, "supervisor": None, "registry": None}
    if Path(settings.supervisor_socket).exists():
        from queues.pool import SupervisorClient

        supervisor = SupervisorClient(settings)
        try:
            result["supervisor"] = supervisor.status()
            result["source"] = "supervisor"
        except WorkerUnavailable as exc:
            result["supervisor_error"] = str(exc)
        finally:
            supervisor.close()
    registry = _read_registry(client)
    if registry:
        result["registry"] = registry
        result["source"] = result["source"] or "registry"
    return result


def _cache_budget(settings: Settings) -> dict[str, Any]:
    """The reduced-image cache's byte budget in Redis (istasks.cache_budget): budget,
    bytes used, images, evictions; or why they could not be read."""
    if not settings.cache:
        return {"error": "no cache configured"}
    client = connect(
        settings.cache, settings, socket_connect_timeout=2.0, socket_timeout=_REDIS_TIMEOUT_S
    )
    try:
        return dataclasses.asdict(cache_usage(client, settings.cache_max_bytes))
    except redis.RedisError as exc:
        return {"error": f"cache {_redacted(settings.cache)} unreadable: {exc}"}
    finally:
        client.close()


def _attach_worker_states(rows: list[dict[str, Any]], workers: dict[str, Any]) -> None:
    """Each queue row gets its identity's worker state from the supervisor's table
    (one worker serves both queues of an identity): "none" when it has no worker, None
    when no supervisor answered."""
    table = (workers.get("supervisor") or {}).get("workers")
    states: dict[str, str] | None = None
    if isinstance(table, list):
        states = {
            str(w.get("queue")): str(w.get("state", "running"))
            for w in table
            if isinstance(w, dict)
        }
    for row in rows:
        interactive = f"{row['uid']}:{row['gid']}"
        row["worker"] = None if states is None else states.get(interactive, "none")


def _hosts(client: redis.Redis) -> list[dict[str, Any]]:
    """Every host's live workers, from their heartbeats: one row per identity and host."""
    rows: list[dict[str, Any]] = []
    pattern = f"{keys.HEARTBEAT}:*"
    for key in client.scan_iter(match=pattern, count=_SCAN_COUNT, _type="set"):
        parts = _text(key).split(":")
        if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
            continue
        uid, gid = int(parts[2]), int(parts[3])
        for host in sorted(_text(h) for h in client.smembers(key)):
            beat_key = keys.heartbeat_key(uid, gid, host)
            raw, ttl_ms = client.get(beat_key), client.pttl(beat_key)
            if raw is None:
                continue  # expired: that host's worker is gone
            try:
                beat = json.loads(raw)
            except ValueError:
                beat = {}
            running = beat.get("active", []) if isinstance(beat, dict) else []
            rows.append({
                "queue": f"{uid}:{gid}", "host": host, "node": beat.get("node", "?"),
                "running": len(running) if isinstance(running, list) else 0, "ttl_ms": ttl_ms,
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["queue"], r["host"]))


def _attach_hosts(rows: list[dict[str, Any]], hosts: list[dict[str, Any]]) -> None:
    """Each queue row gets the hosts whose worker of its identity beats."""
    by_queue: dict[str, list[str]] = {}
    for row in hosts:
        by_queue.setdefault(row["queue"], []).append(row["host"])
    for row in rows:
        row["hosts"] = by_queue.get(f"{row['uid']}:{row['gid']}", [])


def _read_registry(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry under the supervisor's registry prefix, whatever Redis type it uses."""
    names = [keys.WORKERS]
    names += [_text(k) for k in client.scan_iter(match=f"{keys.WORKERS}:*", count=_SCAN_COUNT)]
    entries: list[dict[str, Any]] = []
    for name in sorted(set(names)):
        for member, value in _registry_items(client, name):
            entries.append({"key": name, "member": member, "value": value[:_VALUE_MAX_CHARS]})
    return entries


def _registry_items(client: redis.Redis, name: str) -> list[tuple[str | None, str]]:
    """(member, value) pairs of one registry key of any type; [] when it does not exist."""
    kind = _text(client.type(name))
    if kind == "hash":
        return [(_text(k), _text(v)) for k, v in sorted(client.hgetall(name).items())]
    if kind == "string":
        return [(None, _text(client.get(name) or b""))]
    if kind == "set":
        return [(_text(m), "") for m in sorted(client.smembers(name))]
    if kind == "zset":
        scored = client.zrange(name, 0, -1, withscores=True)
        return [(_text(item[0]), f"{float(item[1]):g}") for item in scored]
    if kind == "list":
        return [(None, _text(v)) for v in client.lrange(name, 0, -1)]
    return []


def format_status(status: dict[str, Any]) -> str:
    """Human-readable report of :func:`collect_status`'s result."""
    lines: list[str] = []
    if "broker" in status:
        lines.append(f"broker: {status['broker']}")
    if "error" in status:
        lines.append(f"error: {status['error']}")
        return "\n".join(lines)
    lines.append("queues (waiting messages; Flower only lists queues a live worker consumes):")
    lines += _queue_table(status.get("queues", []))
    for row in status.get("other_queues", []):
        lines.append(f"other queue {row['queue']}: backlog {row['backlog']}")
    lines += _format_workers(status.get("workers", {}))
    lines += _format_hosts(status.get("hosts", []))
    lines += _format_cache(status.get("cache"))
    return "\n".join(lines)


def _format_hosts(hosts: list[dict[str, Any]]) -> list[str]:
    """Every host's live workers (heartbeats)."""
    out = [f"workers on every host (heartbeats {keys.HEARTBEAT}:*):"]
    if not hosts:
        return [*out, "  (none beating)"]
    for row in hosts:
        out.append(f"  {row['queue']:<24} {row['host']:<20} {row['node']} "
                   f"running={row['running']} ttl_ms={row['ttl_ms']}")  # fmt: skip
    return out


def _format_cache(cache: dict[str, Any] | None) -> list[str]:
    if not cache:
        return []
    if "error" in cache:
        return [f"cache: {cache['error']}"]
    return [
        f"cache (Redis, every ESAF): {_mib(cache['used_bytes'])} of {_mib(cache['max_bytes'])} "
        f"used by {cache['entries']} image(s), {cache['evictions']} evicted"
    ]


def _format_memory(memory: object) -> list[str]:
    """The supervisor's host memory budget and the share each worker now has."""
    if not isinstance(memory, dict) or not isinstance(memory.get("share"), dict):
        return []
    share = memory["share"]
    return [
        f"  memory: workers' PSS {_mib(memory.get('pss_bytes', 0))} of "
        f"{_mib(memory.get('workers_max_bytes', 0))} for {share.get('live')} worker(s); each: "
        f"lru {_mib(share.get('lru_max_bytes', 0))}, jpeg lru "
        f"{_mib(share.get('jpeg_lru_max_bytes', 0))}, frame lru "
        f"{_mib(share.get('frame_lru_max_bytes', 0))}, hard limit "
        f"{_mib(share.get('hard_max_bytes', 0))}; recycled {memory.get('recycled', 0)}"
    ]


def _mib(value: object) -> str:
    return f"{int(value) / 1048576:.1f} MiB" if isinstance(value, int | float) else "?"


def _queue_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["  (no per-identity queues)"]
    out = [
        f"  {'QUEUE':<24} {'UID':>10} {'GID':>10} {'KIND':<11} {'WORKER':<9} "
        f"{'BACKLOG':>8}  BY PRIORITY"
    ]
    for row in rows:
        kind = "prefetch" if row["prefetch"] else "interactive"
        worker = row.get("worker") or "unknown"
        steps = " ".join(f"{p}:{n}" for p, n in sorted(row["by_priority"].items())) or "-"
        out.append(
            f"  {row['queue']:<24} {row['uid']:>10} {row['gid']:>10} {kind:<11} {worker:<9} "
            f"{row['backlog']:>8}  {steps}"
        )
    return out


def _format_workers(workers: dict[str, Any]) -> list[str]:
    if not workers.get("source"):
        reason = workers.get("supervisor_error") or "no supervisor answered, no registry"
        return [f"workers: unknown ({reason})"]
    out: list[str] = []
    if workers.get("supervisor") is not None:
        out.append("workers (supervisor):")
        out += _format_supervisor(workers["supervisor"])
    if workers.get("registry"):
        out.append(f"workers (registry {keys.WORKERS}):")
        for entry in workers["registry"]:
            member = f" {entry['member']}" if entry["member"] is not None else ""
            value = f" = {entry['value']}" if entry["value"] else ""
            out.append(f"  {entry['key']}{member}{value}")
    return out


def _format_supervisor(reply: dict[str, Any]) -> list[str]:
    """The supervisor's status reply: scalars as ``key: value``, then one line per worker
    (queue first; uid and gid are in the queue name)."""
    scalars = {k: v for k, v in reply.items() if k != "ok" and not isinstance(v, list | dict)}
    out = [f"  {k}: {v}" for k, v in sorted(scalars.items())]
    out += _format_memory(reply.get("memory"))
    table = reply.get("workers")
    if isinstance(table, list):
        out.append(f"  {len(table)} worker(s)")
        for item in table:
            if not isinstance(item, dict):
                out.append(f"    {item}")
                continue
            rest = " ".join(
                f"{k}={v}" for k, v in sorted(item.items()) if k not in ("queue", "uid", "gid")
            )
            out.append(f"    {item.get('queue', '?')} {rest}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``isctl status [--json]``: 0 when the broker answered, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="isctl status", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    args = parser.parse_args(argv)
    status = collect_status(get_settings())
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 1 if "error" in status else 0


if __name__ == "__main__":
    sys.exit(main())
