"""The broker transport of the bridge and workers: kombu's, one client per pool."""

from __future__ import annotations

import redis

from istasks import broker
from istasks.app import create_app
from istasks.settings import Settings


def test_publishes_reuse_one_client_per_pool(redis_url: str) -> None:
    app = create_app(Settings(redis_url=redis_url, task_secret="x"))
    broker.use_pooled_client(app, redis_url)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, broker.Channel)
        client = channel._create_client()
        assert channel._create_client() is client
        assert client.ping()
        channel._pool = None  # what kombu does when it reconnects
        assert channel._create_client() is not client
    for n in range(3):
        app.send_task("is.jpeg", args=[f"token {n}"], queue="4001:5001")
    assert redis.Redis.from_url(redis_url).llen("4001:5001") == 3
    app.close()


def test_other_schemes_keep_kombus_transport() -> None:
    app = create_app(Settings(redis_url="rediss://127.0.0.1:1/0", task_secret="x"))
    broker.use_pooled_client(app, "rediss://127.0.0.1:1/0")
    assert app.conf.broker_transport is None
