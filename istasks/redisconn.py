"""Clients of the service's own Redis (broker, results, cache): plain, or behind Sentinel.

With ``IS_REDIS_SENTINELS`` set (``host:port,host:port``), the broker, result and cache
URLs keep only their credentials and database: which server is the primary is asked of
the sentinels (master ``IS_REDIS_SENTINEL_MASTER``), and a client follows a promotion on
its next reconnect. Celery and kombu get ``sentinel://`` URLs with the master's name in
their transport options. The login service's session store is not ours and stays a
plain URL (bridge.sessions).

Standard library, redis-py and our settings only: the bridge imports this module.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from istasks.settings import Settings, get_settings

DEFAULT_SENTINEL_PORT = 26379
#: Timeouts towards the sentinels themselves: a dead one must cost little.
_SENTINEL_TIMEOUT_S = 1.0


def sentinel_hosts(settings: Settings) -> list[tuple[str, int]]:
    """The sentinels' addresses (``IS_REDIS_SENTINELS``), [] when not configured."""
    hosts: list[tuple[str, int]] = []
    for raw in (settings.redis_sentinels or "").split(","):
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            host, port = item, str(DEFAULT_SENTINEL_PORT)
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def connect(url: str, settings: Settings | None = None, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` (broker, results or cache): ``redis.Redis.from_url``, or the
    current primary of the Sentinel master with the URL's credentials and database."""
    settings = settings or get_settings()
    sentinels = sentinel_hosts(settings)
    if not sentinels:
        client: redis.Redis = redis.Redis.from_url(url, **kwargs)
        return client
    username, password, db = _credentials(url)
    timeouts = {
        "socket_timeout": _SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
    }
    sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, username=username, password=password, db=db, **kwargs
    )
    return master


def celery_url(url: str | None, settings: Settings) -> str | None:
    """The URL Celery/kombu get: ``url`` itself, or with sentinels one ``sentinel://``
    URL per sentinel (joined by ``;``) carrying the URL's credentials and database."""
    sentinels = sentinel_hosts(settings)
    if not url or not sentinels:
        return url
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    auth = f"{userinfo}@" if userinfo else ""
    db = _credentials(url)[2]
    return ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in sentinels)


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """Transport options Celery/kombu need for ``sentinel://`` URLs ({} without)."""
    if not sentinel_hosts(settings):
        return {}
    timeouts = {
        "socket_timeout": _SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
    }
    return {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": timeouts}


def _credentials(url: str) -> tuple[str | None, str | None, int]:
    """(username, password, db) of a Redis URL."""
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    db_text = parse_qs(parts.query).get("db", [""])[0] or parts.path.lstrip("/")
    return username, password, int(db_text) if db_text.isdigit() else 0
