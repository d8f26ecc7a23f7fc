"""Per-identity Redis ACL users: a worker reaches its own ESAF's cache and its own queues.

Every worker the supervisor starts gets a Redis user ``is_w_<uid>_<gid>@<host>.<hash>``
(the tag after ``@`` names the supervisor instance: its host, readable, and a short hash
of host and socket, so that supervisors sharing a Redis, on several hosts or on one,
never remove each other's users) with a fresh random password, handed over only inside the worker's
broker/result/cache URLs. The user may touch the cache keys of its ESAF gid
(:func:`istasks.keys.gid_pattern`), the keys of its own two queues, its own results
(keys and channels under ``is:res:<uid>:<gid>:``), its own progress channel and the few
shared keys kombu's Redis transport needs for remote control (found by watching a real
worker with MONITOR and ACL LOG). The worker's Celery app names those keys after its identity
(:func:`istasks.app.worker_isolation`). It cannot list keys (no KEYS/SCAN), subscribe to
anything but the remote-control broadcast, or run admin commands, so a worker of ESAF B
gets NOPERM on ESAF A's cached images, A's results (JPEGs of A's frames) and A's queued
envelopes, and cannot publish a forged result for A.

Needs Redis >= 7.0 (read/write key permissions and selectors) and an admin connection;
when that is impossible the supervisor runs without ACLs and says so (:attr:`AclManager.status`).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import redis

from istasks.errors import WorkerUnavailable
from istasks.keys import (
    budget_patterns,
    eviction_pattern,
    gid_pattern,
    heartbeat_patterns,
    progress_channel,
    result_prefix,
)
from istasks.redisconn import connect
from queues.naming import Identity

log = logging.getLogger(__name__)

USER_PREFIX = "is_w_"
#: kombu's separator between a queue name and its priority suffix (``q\x06\x163``).
KOMBU_SEP = "\x06\x16"
#: Commands a worker never needs. Key permissions alone do not stop enumeration (KEYS,
#: SCAN and RANDOMKEY return any key's name, e.g. another ESAF's result keys) nor
#: pattern subscriptions to every result channel, so these go explicitly.
_COMMANDS = (
    "+@all", "-@admin", "-@dangerous", "-@pubsub", "+publish",
    "-scan", "-randomkey", "-function", "-script|flush", "-script|kill",
)  # fmt: skip
#: Exchanges whose queues expire (remote control and event receivers): the only binding
#: tables kombu's sweep may delete.
_EXPIRING_EXCHANGES = ("reply.celery.pidbox", "celeryev")
_ADMIN_TIMEOUT_S = 2.0


def supervisor_tag(host: str, *parts: str) -> str:
    """Stable tag of one supervisor instance: its host (readable in ``ACL LIST``) and a
    short hash of the host and ``parts`` (its socket path: two on one host differ)."""
    digest = hashlib.blake2b("\0".join((host, *parts)).encode(), digest_size=4).hexdigest()
    return f"{host}.{digest}"


def user_name(identity: Identity, tag: str) -> str:
    """ACL user of one worker identity of supervisor ``tag``: ``is_w_<uid>_<gid>@<tag>``."""
    return f"{USER_PREFIX}{identity.uid}_{identity.gid}@{tag}"


def is_own_user(name: str, tag: str) -> bool:
    """Whether ``name`` is a worker user (or the probe) of supervisor ``tag``."""
    return name.startswith(USER_PREFIX) and name.endswith(f"@{tag}")


def node_name(identity: Identity) -> str:
    """Celery node-name prefix of the identity's worker (``is_<uid>_<gid>@``, contract 4)."""
    return f"is_{identity.uid}_{identity.gid}@"


def _queue_keys(queue: str) -> list[str]:
    """A kombu queue's lists (plain + priority) and its exchange's binding sets."""
    return [
        f"~{queue}",
        f"~{queue}{KOMBU_SEP}*",
        f"~_kombu.binding.{queue}",
        f"~_kombu.binding_permanent.{queue}",
    ]


def worker_rules(identity: Identity, broker_db: int) -> list[str]:
    """``ACL SETUSER`` rules (after ``reset on #hash``) for the identity's worker."""
    rules = [*_COMMANDS]
    for queue in (identity.queue, identity.prefetch_queue):
        rules += _queue_keys(queue)
    rules += [f"~{pattern}" for pattern in gid_pattern(identity.gid)]
    # The cache budget shared by every ESAF (istasks.cache.CacheBudget): its index keys,
    # and UNLINK alone on any reduced image, to evict the least recently used: a
    # selector, so another ESAF's images can be deleted but never read or written.
    rules += [f"~{pattern}" for pattern in budget_patterns()]
    rules.append(f"(~{eviction_pattern()} +unlink)")
    # Results: SET (and PUBLISH, below) under the identity's own prefix only.
    results = result_prefix(identity.uid, identity.gid)
    rules.append(f"~{results}*")
    # Liveness across hosts: its own heartbeats (queues.liveness), every host's.
    rules += [f"~{pattern}" for pattern in heartbeat_patterns(identity.uid, identity.gid)]
    # Remote control (pidbox): its own node queue, the broadcast binding, replies.
    node = node_name(identity)
    rules += [f"~{node}*.celery.pidbox", f"~{node}*.celery.pidbox{KOMBU_SEP}*"]
    rules += ["~_kombu.binding.celery.pidbox", "~_kombu.binding_permanent.celery.pidbox"]
    rules.append("~_kombu.binding_deadlines")
    rules += ["%W~*.reply.celery.pidbox", f"%W~*.reply.celery.pidbox{KOMBU_SEP}*"]
    # kombu's periodic sweep of overdue binding tables (every channel consuming an
    # expiring queue runs it): it reads any permanent set and deletes overdue tables,
    # which only the expiring exchanges below ever have.
    rules += [f"~_kombu.binding.{exchange}" for exchange in _EXPIRING_EXCHANGES]
    rules.append("%R~_kombu.binding_permanent.*")
    # Channels: publish its own results, its own index progress (the bridge relays it)
    # and events only; subscribing is limited to the one broadcast pattern by a
    # selector, so no worker can listen to others' results.
    rules += [f"&{results}*", f"&{progress_channel(identity.uid, identity.gid)}"]
    rules.append(f"&/{broker_db}.celeryev/*")
    rules.append(f"(&/{broker_db}.celery.pidbox +psubscribe +punsubscribe +ping)")
    return rules


def with_credentials(url: str, username: str, password: str) -> str:
    """``url`` with its user and password replaced (redis://, rediss://, unix://)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_db(url: str) -> int:
    """Database number of a Redis URL (path ``/N`` or ``?db=N``), 0 when absent."""
    parts = urlsplit(url)
    db = parse_qs(parts.query).get("db", [""])[0]
    if not db and parts.scheme != "unix":
        db = parts.path.lstrip("/")
    return int(db) if db.isdigit() else 0


def server_of(url: str) -> str:
    """What identifies one Redis server (ACL users are per server, not per db)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path if parts.scheme == 'unix' else ''}"


@dataclass(frozen=True)
class WorkerUrls:
    """The Redis URLs one worker is given (each with its own credentials when ACLs are on)."""

    broker: str
    results: str
    cache: str


class AclManager:
    """Creates and removes worker ACL users on the servers behind the given URLs.

    ``status`` is ``"on"``, ``"off: <reason>"`` (the server cannot do it: workers get the
    supervisor's own URLs) or ``"unknown: <reason>"`` (not reachable yet; retried).
    """

    def __init__(self, broker: str, results: str, cache: str, *, tag: str) -> None:
        self._urls = WorkerUrls(broker, results, cache)
        self.tag = tag
        admin: dict[str, str] = {}
        for url in (broker, results, cache):
            admin.setdefault(server_of(url), url)
        self._admin = admin
        self._clients: dict[str, redis.Redis] = {}
        self._granted: dict[str, tuple[Identity, str]] = {}  # user -> (identity, digest)
        self.status = "unknown: not probed yet"

    @property
    def enabled(self) -> bool:
        """True when workers get their own ACL users."""
        return self.status == "on"

    def _client(self, server: str) -> redis.Redis:
        client = self._clients.get(server)
        if client is None:
            client = connect(
                self._admin[server],
                socket_timeout=_ADMIN_TIMEOUT_S,
                socket_connect_timeout=_ADMIN_TIMEOUT_S,
            )
            self._clients[server] = client
        return client

    def probe(self) -> str:
        """Decide whether ACLs can be used; remove users left by an earlier run of us."""
        if self.status == "on" or self.status.startswith("off"):
            return self.status
        try:
            for server in self._admin:
                self._probe_server(server)
        except redis.ConnectionError as exc:
            self.status = f"unknown: redis unreachable ({exc})"
            return self.status
        except redis.ResponseError as exc:
            self.status = f"off: cannot administer ACL users ({exc})"
            log.warning("redis ACLs off, every worker shares the supervisor's redis user: %s", exc)
            return self.status
        self.status = "on"
        self.revoke_all()
        return self.status

    def _probe_server(self, server: str) -> None:
        client = self._client(server)
        version = str(client.info("server").get("redis_version", "0"))
        if int(version.split(".", maxsplit=1)[0]) < 7:
            raise redis.ResponseError(f"redis {version} < 7.0 has no ACL selectors")
        probe = f"{USER_PREFIX}probe@{self.tag}"
        _setuser(client, probe, "reset", "off")
        client.acl_deluser(probe)

    def grant(self, identity: Identity) -> WorkerUrls:
        """Create (or renew) the identity's user; the URLs its worker must use.

        Without ACLs the supervisor's own URLs are returned. When ACLs are on but the
        user cannot be created, WorkerUnavailable: never fall back to wider rights.
        """
        if not self.enabled and self.probe() != "on":
            if self.status.startswith("off"):
                return self._urls
            raise WorkerUnavailable(f"redis ACL setup pending: {self.status}")
        password = secrets.token_urlsafe(24)
        digest = hashlib.sha256(password.encode()).hexdigest()
        name = user_name(identity, self.tag)
        try:
            for server in self._admin:
                self._create(server, name, identity, digest)
        except redis.RedisError as exc:
            raise WorkerUnavailable(f"cannot create redis user {name}: {exc}") from exc
        self._granted[name] = (identity, digest)
        return WorkerUrls(
            broker=with_credentials(self._urls.broker, name, password),
            results=with_credentials(self._urls.results, name, password),
            cache=with_credentials(self._urls.cache, name, password),
        )

    def _create(self, server: str, name: str, identity: Identity, digest: str) -> None:
        rules = worker_rules(identity, url_db(self._urls.broker))
        _setuser(self._client(server), name, "reset", "on", f"#{digest}", *rules)

    def restore_missing(self) -> list[str]:
        """Re-create users a server lost, with their passwords (a restarted Redis forgets
        ACL users, and running workers could then never reconnect); their names."""
        restored: list[str] = []
        if not self.enabled or not self._granted:
            return restored
        for server in self._admin:
            try:
                present = {_text(u) for u in self._client(server).acl_users()}
                for name, (identity, digest) in list(self._granted.items()):
                    if name not in present:
                        self._create(server, name, identity, digest)
                        restored.append(name)
            except redis.RedisError as exc:
                log.debug("cannot check redis ACL users on %s: %s", server, exc)
        return restored

    def revoke(self, identity: Identity) -> None:
        """Delete the identity's user (Redis also drops its connections)."""
        name = user_name(identity, self.tag)
        self._granted.pop(name, None)
        if self.enabled:
            self._delete([name])

    def revoke_all(self) -> None:
        """Delete every worker user of this supervisor (start-up after a crash, shutdown)."""
        self._granted.clear()
        if not self.enabled:
            return
        for server in self._admin:
            try:
                users = self._client(server).acl_users()
            except redis.RedisError as exc:
                log.warning("cannot list redis ACL users on %s: %s", server, exc)
                continue
            names = [_text(u) for u in users]
            self._delete([n for n in names if is_own_user(n, self.tag)], servers=[server])

    def _delete(self, names: Sequence[str], servers: Iterable[str] | None = None) -> None:
        if not names:
            return
        for server in servers or self._admin:
            try:
                self._client(server).acl_deluser(*names)
            except redis.RedisError as exc:
                log.warning("cannot delete redis users %s on %s: %s", names, server, exc)

    def close(self) -> None:
        """Close the admin connections."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _setuser(client: redis.Redis, name: str, *rules: str) -> Any:
    """Raw ``ACL SETUSER``: redis-py's helper cannot express selectors or %R~/%W~ keys."""
    return client.execute_command("ACL", "SETUSER", name, *rules)  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
