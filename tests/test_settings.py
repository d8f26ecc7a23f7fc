from __future__ import annotations

import os

import pytest

from istasks.settings import Settings, get_settings


def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IS_REDIS_URL", "redis://x:1/0")
    monkeypatch.setenv("IS_CACHE_TTL_S", "42")
    monkeypatch.setenv("IS_LOG_SYSLOG", "yes")
    monkeypatch.setenv("IS_METRICS_PORT", "")
    s = get_settings()
    assert s.cache == "redis://x:1/0" and s.broker == "redis://x:1/0"
    assert s.cache_ttl_s == 42 and s.log_syslog is True and s.metrics_port is None


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="IS_CACHE_TTL_S"):
        Settings.from_env({"IS_CACHE_TTL_S": "soon"})


def test_core_threads_default_to_the_cpus_we_may_use_at_most_four() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert Settings().image_threads == max(1, min(4, cpus))
    assert Settings(core_threads=1).image_threads == 1
    assert Settings(core_threads=6).image_threads == 6
