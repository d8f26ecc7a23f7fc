"""Shared fixtures: a private Redis per test session, settings reset, seeded RNG."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from istasks.settings import reset_settings
from ops.redisserver import RedisProcess, start_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a redis-server started for this test run (or IS_TEST_REDIS when set)."""
    given = os.environ.get("IS_TEST_REDIS")
    if given:
        yield given
        return
    server: RedisProcess = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The test Redis, flushed before and after each test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    try:
        yield redis_server
    finally:
        client.flushall()
        client.close()


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees settings rebuilt from its own environment."""
    for key in list(os.environ):
        if key.startswith("IS_") and key != "IS_TEST_REDIS":
            monkeypatch.delenv(key)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded generator: test data is reproducible."""
    return np.random.default_rng(20261121)
