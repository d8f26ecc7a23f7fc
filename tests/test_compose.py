"""compose.yaml and Dockerfile, checked offline (tests/test_compose_stack.py, run by
`make compose-check`, builds and runs them on a real engine).

The Compose file is validated against the Compose Specification JSON schema shipped in
the docker-compose 1.29.2 wheel (tests/data/compose_spec.README.md), then against the
rules the schema cannot express: health-gated start order, read-only data, loopback-only
ports, files that exist, and the same privileges as the systemd units.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())


@pytest.fixture
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return doc


def _errors(doc: dict[str, Any]) -> list[str]:
    # The schema names draft 2019-09 by a URL jsonschema does not recognise: say it here.
    validator = jsonschema.Draft201909Validator(SCHEMA)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_schema_is_a_valid_schema() -> None:
    jsonschema.Draft201909Validator.check_schema(SCHEMA)


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert _errors(compose) == []
    assert set(compose["services"]) == {
        "redis-broker",
        "redis-cache",
        "supervisor",
        "bridge",
        "gateway",
        "flower",
    }


def test_schema_rejects_what_compose_would(compose: dict[str, Any]) -> None:
    """The schema really constrains the keys we rely on (not a vacuous pass)."""
    bad_condition = copy.deepcopy(compose)
    bad_condition["services"]["bridge"]["depends_on"]["supervisor"]["condition"] = "ready"
    assert _errors(bad_condition)
    unknown_key = copy.deepcopy(compose)
    unknown_key["services"]["flower"]["healthcheck"]["start_interval"] = "1s"
    assert _errors(unknown_key)


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for target, rule in service.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"}, f"{name} -> {target}"
            assert "healthcheck" in services[target]
    assert set(services["bridge"]["depends_on"]) == {"redis-broker", "supervisor"}
    assert set(services["supervisor"]["depends_on"]) == {"redis-broker", "redis-cache"}


def test_healthcheck_snippets_compile(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        if test[1] == "python":
            assert test[2] == "-c"
            compile(test[3], f"<{name} healthcheck>", "exec")


def test_data_is_mounted_read_only_and_only_where_needed(compose: dict[str, Any]) -> None:
    mounts = {
        name: [v for v in service.get("volumes", []) if v["target"] == "${IS_DATA_MOUNT:-/data}"]
        for name, service in compose["services"].items()
    }
    assert [name for name, found in mounts.items() if found] == ["supervisor"]
    (data,) = mounts["supervisor"]
    assert data["type"] == "bind" and data["read_only"] is True
    for name, service in compose["services"].items():
        assert service["read_only"] is True, name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert volume.get("read_only") is True, f"{name}: {volume['target']}"


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
        if name.startswith("redis"):
            assert "ports" not in service
    check = yaml.safe_load((ROOT / "docker" / "compose.check.yaml").read_text())
    for name, service in check["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"overlay {name}: {port}"


def test_privileges_match_the_systemd_units(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service.get("user") not in (None, "root", "0", "0:0"), name
    assert sorted(services["supervisor"]["cap_add"]) == ["KILL", "SETGID", "SETUID"]
    unit = (ROOT / "ops" / "systemd" / "is-supervisor.service").read_text()
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
    assert caps is not None
    assert sorted(c.removeprefix("CAP_") for c in caps[1].split()) == ["KILL", "SETGID", "SETUID"]
    assert all("cap_add" not in s for n, s in services.items() if n != "supervisor")


def test_redis_services_use_the_shipped_configs(compose: dict[str, Any]) -> None:
    for name, conf in (("redis-broker", "broker.conf"), ("redis-cache", "cache.conf")):
        service = compose["services"][name]
        (mount,) = service["volumes"]
        assert (ROOT / mount["source"]) == ROOT / "ops" / "redis" / conf
        assert shlex.split(service["command"])[1] == mount["target"]
        port = re.search(r"^port (\d+)$", (ROOT / "ops/redis" / conf).read_text(), re.M)
        assert port is not None
        assert service["healthcheck"]["test"][3] == port[1]
        assert f"{name}:{port[1]}" in json.dumps(compose["x-is-env"])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)


def test_dockerfile_builds_from_repository_files(compose: dict[str, Any]) -> None:
    build = compose["x-is-build"]
    assert build["context"] == "."
    assert build["args"]["BASE"] == "${IS_BASE_IMAGE:-python:3.11-slim-bookworm}"
    for name in ("supervisor", "bridge", "flower"):
        assert compose["services"][name]["build"] == build
    steps = _dockerfile_instructions()
    assert ("ARG", "BASE=python:3.11-slim-bookworm") in steps
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert len(bases) == 2 and all(b == "${BASE}" for b in bases)
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not _dockerignored(source), f"{source} is excluded by .dockerignore"
    final_user = [args for word, args in steps if word == "USER"][-1]
    assert final_user.split(":")[0] not in ("root", "0")
    assert _dockerignored(".venv") and _dockerignored(".git") and _dockerignored("secrets")


def test_runtime_stage_has_no_compiler() -> None:
    """Compilers and headers only in the build stage; the final stage installs libraries."""
    steps = _dockerfile_instructions()
    final = len(steps) - 1 - [w for w, _ in steps][::-1].index("FROM")
    assert not steps[final][1].split()[1:], "the runtime stage is the unnamed last one"
    runtime = " ".join(args for word, args in steps[final:] if word == "RUN")
    for tool in ("build-essential", "gcc", "-dev ", "python3-dev"):
        assert tool not in runtime, tool
    build = " ".join(args for word, args in steps[:final] if word == "RUN")
    assert "build-essential" in build and "pillow-simd" in build


def test_services_see_the_accounts_read_only(compose: dict[str, Any]) -> None:
    """The supervisor (workers' homes) and the bridge (names -> ids) resolve accounts from
    the host's passwd and group, mounted read-only; both run by number, not by name."""
    for name in ("supervisor", "bridge"):
        service = compose["services"][name]
        mounts = {v["target"]: v for v in service["volumes"] if v["type"] == "bind"}
        assert mounts["/etc/passwd"]["source"] == "${IS_PASSWD_FILE:-/etc/passwd}"
        assert mounts["/etc/group"]["source"] == "${IS_GROUP_FILE:-/etc/group}"
        assert all(mounts[t]["read_only"] is True for t in ("/etc/passwd", "/etc/group"))
        assert all(part.isdigit() for part in service["user"].split(":")), name
    assert compose["services"]["supervisor"]["command"][-2:] == ["--group", "999"]
    data = [
        v
        for v in compose["services"]["supervisor"]["volumes"]
        if v["source"].startswith("${IS_DATA_DIR")
    ]
    assert data[0]["target"] == "${IS_DATA_MOUNT:-/data}"
    assert compose["x-is-env"]["IS_DATA_ROOT"] == "${IS_DATA_MOUNT:-/data}"


def test_redis_image_is_replaceable(compose: dict[str, Any]) -> None:
    """The public Redis image by default; the Debian-built one where no registry answers."""
    for name in ("redis-broker", "redis-cache"):
        assert compose["services"][name]["image"] == "${IS_REDIS_IMAGE:-redis:7.2-bookworm}"
        assert compose["services"][name]["user"] == "redis"
    dockerfile = (ROOT / "docker" / "redis.Dockerfile").read_text()
    assert "FROM ${BASE}" in dockerfile and "redis-server" in dockerfile
    assert "USER redis" in dockerfile
