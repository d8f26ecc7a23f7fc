"""ops/: systemd units verified by systemd itself, Redis configs loaded by a real
redis-server, the env template checked against the settings object."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from istasks.settings import ENV_PREFIX, Settings
from ops.redisserver import RedisNotFound, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
UNITS = sorted((OPS / "systemd").iterdir())
SERVICES = [p for p in UNITS if p.suffix == ".service"]
#: Where the units expect the installed venv (ops/README.md); tests point it at ours.
INSTALLED_VENV = "/opt/is/.venv"
#: Highest acceptable `systemd-analyze security` exposure (x10) per unit; the supervisor
#: keeps three capabilities and must see the users' homes, the rest keep nothing.
MAX_EXPOSURE = {"is-supervisor.service": 30}
DEFAULT_MAX_EXPOSURE = 20


def _directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, repeated keys kept (configparser drops them)."""
    section, out = "", []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _values(path: Path, key: str) -> list[str]:
    return [value for _, k, value in _directives(path) if k == key]


def _one(path: Path, key: str) -> str:
    values = _values(path, key)
    assert len(values) == 1, f"{path.name}: {key} set {len(values)} times"
    return values[0]


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this test run's venv (verify needs the files)."""
    venv = str(Path(sys.executable).parent.parent)
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_VENV, venv))
    return tmp_path


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    analyze = _systemd_analyze()
    for tool in ("is-bridge", "is-supervisor", "python"):
        binary = Path(sys.executable).parent / tool
        if not binary.exists():
            pytest.skip(f"{binary} not installed (run make setup)")
    names = sorted(p.name for p in unit_dir.iterdir())
    done = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        cwd=unit_dir,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys and bad values are only warnings (exit 0): any line about our units fails.
    ours = [line for line in done.stderr.splitlines() if any(n in line for n in names)]
    assert done.returncode == 0, done.stderr
    assert ours == []


@pytest.mark.parametrize("unit", [p.name for p in SERVICES])
def test_unit_exposure_is_low(unit_dir: Path, unit: str) -> None:
    analyze = _systemd_analyze()
    threshold = MAX_EXPOSURE.get(unit, DEFAULT_MAX_EXPOSURE)
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={threshold}", unit],
        cwd=unit_dir,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert overall is not None, done.stdout + done.stderr
    assert done.returncode == 0, f"{unit}: exposure {overall[1]} above {threshold / 10}"


def test_every_service_restarts_on_failure_and_is_hardened() -> None:
    for unit in SERVICES:
        assert _one(unit, "Restart") == "on-failure", unit.name
        assert _one(unit, "NoNewPrivileges") == "yes", unit.name
        assert _one(unit, "ProtectSystem") == "strict", unit.name
        assert _one(unit, "PrivateTmp") == "yes", unit.name
        assert _one(unit, "AmbientCapabilities") == "", unit.name
        assert _one(unit, "WantedBy") == "is.target", unit.name
    wanted = _one(OPS / "systemd" / "is.target", "Wants").split()
    assert sorted(wanted) == sorted(p.name for p in SERVICES)


def test_bridge_runs_unprivileged_as_is() -> None:
    bridge = OPS / "systemd" / "is-bridge.service"
    assert _one(bridge, "User") == "is"
    assert _one(bridge, "CapabilityBoundingSet") == ""
    assert _one(bridge, "ProtectHome") == "yes"
    assert _one(bridge, "ExecStart").endswith("/bin/is-bridge")
    assert "is-supervisor.service" in _one(bridge, "After").split()


def test_supervisor_keeps_exactly_three_capabilities() -> None:
    supervisor = OPS / "systemd" / "is-supervisor.service"
    caps = set(_one(supervisor, "CapabilityBoundingSet").split())
    assert caps == {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    assert _one(supervisor, "Group") == "is"
    assert _one(supervisor, "RuntimeDirectory") == "is"
    assert _one(supervisor, "KillMode") == "control-group"
    assert _one(supervisor, "ExecStart").split()[1:] == ["--group", "is"]


def test_flower_unit_runs_our_entry_point_without_privilege() -> None:
    flower = OPS / "systemd" / "is-flower.service"
    assert _one(flower, "DynamicUser") == "yes"
    assert _one(flower, "CapabilityBoundingSet") == ""
    assert _one(flower, "ExecStart").split()[1:] == ["-m", "ops.flower"]
    assert not _values(flower, "LoadCredential"), "Flower must not get the task secret"


def test_secret_reaches_services_as_credential_only() -> None:
    for name in ("is-bridge.service", "is-supervisor.service"):
        unit = OPS / "systemd" / name
        assert _one(unit, "LoadCredential") == "task-secret:/etc/is/task-secret"
        env = dict(v.split("=", 1) for v in _values(unit, "Environment"))
        assert env["IS_TASK_SECRET_FILE"] == "%d/task-secret"
        assert env["IS_SUPERVISOR_SOCKET"] == "/run/is/supervisor.sock"
        files = _values(unit, "EnvironmentFile")
        assert files[0] == "/etc/is/is.env"


# -- env template ---------------------------------------------------------------------

_ENV_LINE = re.compile(r"^(#?)(IS_[A-Z0-9_]+)=(.*)$")


def _env_template() -> list[tuple[bool, str, str]]:
    """(active, name, value) of every IS_* line of ops/is.env."""
    out = []
    for line in (OPS / "is.env").read_text().splitlines():
        match = _ENV_LINE.match(line)
        if match:
            out.append((not match[1], match[2], match[3]))
    return out


def test_env_template_lists_every_setting_once() -> None:
    names = [name for _, name, _ in _env_template()]
    expected = {
        ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings) if f.name != "extra"
    }
    assert sorted(names) == sorted(expected), "ops/is.env out of step with istasks/settings.py"


def test_env_template_values_parse_and_units_own_their_paths() -> None:
    lines = _env_template()
    for _, name, value in lines:
        Settings.from_env({name: value})  # raises on a value of the wrong type
    active = {name: value for on, name, value in lines if on}
    settings = Settings.from_env(active)
    assert settings.broker and settings.cache and settings.broker != settings.cache
    assert settings.flower_basic_auth
    # EnvironmentFile= overrides Environment=: these must stay the units' business.
    assert "IS_TASK_SECRET_FILE" not in active
    assert "IS_TASK_SECRET" not in active
    assert "IS_SUPERVISOR_SOCKET" not in active


# -- Redis configs ---------------------------------------------------------------------


@pytest.fixture
def redis_binary() -> str:
    try:
        binary = redis_server_binary()
    except RedisNotFound as exc:
        pytest.skip(str(exc))
    version = subprocess.run(
        [binary, "--version"], check=False, capture_output=True, text=True
    ).stdout
    major = re.search(r"v=(\d+)\.", version)
    if major is None or int(major[1]) < 7:
        pytest.skip(f"Redis >= 7 needed (ACL selectors), found {version.strip()}")
    return binary


def _start_redis(binary: str, conf: Path, workdir: Path) -> Iterator[redis.Redis]:
    """redis-server on the shipped conf, with the unit's --dir/--aclfile and a Unix socket
    instead of its TCP port (tests must not take 6380/6381)."""
    acl = workdir / "users.acl"
    # The ACL file exactly as ops/README.md tells the operator to write it.
    acl.write_text("user default off\nuser is on >s3cret ~* &* +@all\n")
    sock = workdir / "redis.sock"
    args = [binary, str(conf), "--dir", str(workdir), "--aclfile", str(acl)]
    args += ["--port", "0", "--unixsocket", str(sock), "--supervised", "no"]
    log = workdir / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server rejected {conf.name}:\n{log.read_text()}")
            time.sleep(0.02)
        client = redis.Redis(unix_socket_path=str(sock), username="is", password="s3cret")
        yield client
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def broker_redis(redis_binary: str, tmp_path: Path) -> Iterator[redis.Redis]:
    yield from _start_redis(redis_binary, OPS / "redis" / "broker.conf", tmp_path)


@pytest.fixture
def cache_redis(redis_binary: str, tmp_path: Path) -> Iterator[redis.Redis]:
    yield from _start_redis(redis_binary, OPS / "redis" / "cache.conf", tmp_path)


def _config(client: redis.Redis, name: str) -> str:
    value = client.config_get(name)[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def test_broker_conf_never_evicts(broker_redis: redis.Redis) -> None:
    assert _config(broker_redis, "maxmemory-policy") == "noeviction"
    assert int(_config(broker_redis, "maxmemory")) > 0
    assert _config(broker_redis, "save") == ""
    assert _config(broker_redis, "appendonly") == "no"
    assert _config(broker_redis, "port") == "0"  # our override
    # Full: writes are refused, and nothing already queued disappears.
    broker_redis.rpush("1000:1000", b"task")
    broker_redis.config_set("maxmemory", str(int(broker_redis.info("memory")["used_memory"])))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for i in range(1000):
            broker_redis.set(f"filler{i}", b"x" * 10000)
    assert broker_redis.llen("1000:1000") == 1


def test_cache_conf_evicts_least_recently_used(cache_redis: redis.Redis) -> None:
    assert _config(cache_redis, "maxmemory-policy") == "allkeys-lru"
    assert int(_config(cache_redis, "maxmemory")) >= 1 << 30
    assert _config(cache_redis, "save") == ""
    used = int(cache_redis.info("memory")["used_memory"])
    cache_redis.config_set("maxmemory", str(used + 2 * 1024 * 1024))
    for i in range(100):
        cache_redis.set(f"is:r:1000:f:{i}", b"x" * 100_000)  # 10 MB into a 2 MB budget
    assert 0 < int(cache_redis.dbsize()) < 100
    assert int(cache_redis.info("stats")["evicted_keys"]) > 0


def test_default_redis_user_is_off(broker_redis: redis.Redis) -> None:
    path = broker_redis.connection_pool.connection_kwargs["path"]
    anonymous = redis.Redis(unix_socket_path=path)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


# -- sysusers --------------------------------------------------------------------------


def test_sysusers_creates_the_is_account(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(OPS / "sysusers.d" / "is.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert users["is"][6] == "/usr/sbin/nologin"
    assert "is" in groups
