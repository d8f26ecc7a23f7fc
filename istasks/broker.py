"""The Redis broker transport: kombu's, with its synchronous client made once per pool.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish, ack and
queue operation (``Channel.conn_or_acquire``); each one copies redis-py's ~170 response
callbacks into a new dict. That was about 0.25 ms of every task sent by the bridge and
of every task event a worker publishes (``python -m bench tasks``). The client object
holds no connection of its own (each command borrows one from the pool) and is
thread-safe, so one per connection pool does the same work. :func:`use_pooled_client`
selects it through Celery's ``broker_transport`` in the two processes that publish on
every request (bridge and worker); broker URLs stay ``redis://``. Tools keep kombu's own
transport: Flower derives the broker's scheme from the transport's name.

Imported by the bridge: Celery and kombu only.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one synchronous client per connection pool."""

    _sync_client: tuple[Any, Any] | None = None
    _sync_client_lock = threading.Lock()

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # kombu keeps that one itself (Channel.client)
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool  # a reconnect installs a new pool: the client follows it
        cached = self._sync_client
        if cached is not None and cached[0] is pool:
            return cached[1]
        with self._sync_client_lock:
            client = super()._create_client(asynchronous=False)  # type: ignore[no-untyped-call]
            self._sync_client = (pool, client)
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def use_pooled_client(app: Celery, broker_url: str | None) -> None:
    """Make ``app`` use :class:`Transport` for a ``redis://`` broker (before it connects);
    other schemes (``rediss://``, ``sentinel://``) keep kombu's own."""
    if broker_url and broker_url.startswith("redis://"):
        app.conf.broker_transport = f"{__name__}:Transport"
