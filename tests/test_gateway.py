"""The HTTP gateway end to end: httpx -> uvicorn -> session check -> Celery worker -> back.

The stack is started as ``isctl up`` starts it (ops.stack with ``gateway=True``): its own
redis-server, the supervisor (as root: workers under the session's identity), the bridge
and the gateway as separate processes. The few cases the stack cannot produce (session
Redis down, no worker for a queue, a per-session limit of one) run a Gateway built here
on real parts: a real uvicorn, real Redis, a real Celery dispatcher.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import redis
from PIL import Image

from bridge.dispatch import CeleryDispatcher
from bridge.gateway.app import API, COOKIE, Gateway
from bridge.gateway.openapi import META_SCHEMA, PIXEL_SCHEMA, openapi_document
from bridge.sessions import SessionVerifier, load_public_key, session_redis
from istasks import keys
from istasks.app import create_app
from istasks.core.readers import open_reader
from istasks.core.view import prepare_frame
from istasks.settings import Settings
from ops.client import request
from ops.devsession import isauth_for, sign_isauth, write_session
from ops.redisserver import free_port
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from queues.identity import IdentityResolver, IdRange
from tests.gateway_harness import serve
from tests.wire_assert import assert_success_reply

pytestmark = pytest.mark.slow

INDEXER = """#!/bin/bash
while [ $# -gt 0 ]; do
  case "$1" in --json-fd) J=$2; shift;; --progress-fd) P=$2; shift;; *) LAST=$1;; esac
  shift
done
echo "indexing $LAST" >&$P
sleep 0.3
echo "step 2" >&$P
echo '{"spacegroup":"P212121","cell":[40.1,50.2,60.3,90,90,90]}' >&$J
"""
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="is-gw-"))
    path.chmod(0o755)
    write_eiger(path, "x", nimages=4, frames_per_file=2, shape=(1062, 1028), seed=7)
    secret = path / "locked"
    secret.mkdir()
    write_eiger(secret, "s", nimages=1, frames_per_file=1, shape=(64, 64), seed=3)
    (path / "fake-index.sh").write_text(INDEXER)
    for item in [*path.iterdir(), *secret.iterdir()]:
        item.chmod(0o755 if item.is_dir() or item.suffix == ".sh" else 0o644)
    (secret / "s_master.h5").chmod(0o600)  # root's: the dev identity may not read it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        indexer_command=str(data_dir / "fake-index.sh"),
        worker_idle_s=300,
        view_timeout_s=20,
        gateway_port=0,
    )
    with Stack.start(tmp_path_factory.mktemp("run"), settings, gateway=True) as running:
        yield running


@pytest.fixture(scope="module")
def pid(stack: Stack) -> str:
    return stack.add_session([0], user=dev_user())


@pytest.fixture(scope="module")
def http(stack: Stack, pid: str) -> Iterator[httpx.Client]:
    """A client that sends the session as a bearer token."""
    headers = {"Authorization": f"Bearer {pid}"}
    with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as client:
        yield client


def _view_url(esaf: int = 0) -> str:
    return f"{API}/esaf/{esaf}/view"


def _computed(stack: Stack) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return sum(int(client.get(k) or 0) for k in client.scan_iter(f"{keys.STATS}:*:computed"))
    finally:
        client.close()


def _assert_problem(response: httpx.Response, status: int, text: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert text in body["detail"], body
    assert "Traceback" not in response.text
    return body


# -- views ------------------------------------------------------------------------------


def test_view_with_every_jpeg_field(http: httpx.Client, data_dir: Path) -> None:
    params = {"fn": str(data_dir / "x_master.h5"), "frame": 3, "xsize": 512, "zoom": 2,
              "segcol": 0.5, "segrow": 0.25, "wval": 2, "contrast": 40, "label": "hello",
              "labelHeight": 16, "keepAspect": "false"}  # fmt: skip
    response = http.get(_view_url(), params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"].startswith("private")
    assert response.headers["etag"].startswith('"') and not response.headers["etag"].startswith(
        "W/"
    )
    assert (response.headers["x-is-wval-used"], response.headers["x-is-bval-used"]) == ("2", "40")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.size == (512, 512 + 16)


def test_view_is_the_same_bytes_as_the_zeromq_reply(
    stack: Stack, pid: str, http: httpx.Client, data_dir: Path
) -> None:
    fields = {"fn": str(data_dir / "x_master.h5"), "frame": 2, "xsize": 300, "zoom": 1.5,
              "segcol": 0.2, "segrow": 0.1, "wval": 1, "contrast": 30}  # fmt: skip
    over_http = http.get(_view_url(), params=fields)
    assert over_http.status_code == 200
    frames = request(
        stack.endpoint, {"type": "jpeg", "pid": pid, "esaf": 0, **fields}, timeout_s=30
    )
    assert assert_success_reply(frames, 4)[2] == over_http.content


def test_etag_gives_304(http: httpx.Client, data_dir: Path) -> None:
    params = {"fn": str(data_dir / "x_master.h5"), "frame": 1, "xsize": 256}
    first = http.get(_view_url(), params=params)
    etag = first.headers["etag"]
    again = http.get(_view_url(), params=params, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    other = http.get(_view_url(), params={**params, "frame": 2}, headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag


def test_etag_follows_the_file_version_and_the_view(http: httpx.Client, data_dir: Path) -> None:
    """The ETag names the file version and the view parameters (the worker's validator),
    not merely the bytes: a rewritten file gets a new one even with the same pixels, and
    a 304 is never given for the old version."""
    room = data_dir / "versions"
    room.mkdir(mode=0o755)
    master = write_eiger(room, "v", nimages=1, frames_per_file=1, shape=(64, 64), seed=5)
    for item in room.iterdir():
        item.chmod(0o644)
    params = {"fn": str(master), "xsize": 64}
    first = http.get(_view_url(), params=params)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert len(etag) == 2 + keys.VALIDATOR_HEX and etag.strip('"') != etag
    other_view = http.get(_view_url(), params={**params, "wval": 3, "contrast": 9})
    assert other_view.headers["etag"] != etag
    stat = master.stat()
    os.utime(master, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = http.get(_view_url(), params=params, headers={"If-None-Match": etag})
    assert again.status_code == 200 and again.headers["etag"] != etag
    assert again.content == first.content  # same pixels, new version: a new validator


def test_levels_and_meta_without_a_second_reduction(
    stack: Stack, http: httpx.Client, data_dir: Path
) -> None:
    params = {"fn": str(data_dir / "x_master.h5"), "frame": 4, "xsize": 200}
    before = _computed(stack)
    view = http.get(_view_url(), params=params)
    assert _computed(stack) == before + 1
    sibling = http.get(f"{API}/esaf/0/view.json", params=params)
    assert sibling.status_code == 200
    body = sibling.json()
    assert _computed(stack) == before + 1  # the same cache: nothing reduced again
    assert body["etag"] == view.headers["etag"]
    assert body["levels"]["wval_used"] == int(view.headers["x-is-wval-used"])
    assert body["levels"]["bval_used"] == int(view.headers["x-is-bval-used"])
    assert body["meta"]["frame"] == 4 and body["meta"]["wavelength"] > 0


def test_meta_with_spots_and_statistics(http: httpx.Client, data_dir: Path) -> None:
    response = http.get(f"{API}/esaf/0/meta", params={"fn": str(data_dir / "x_master.h5")})
    assert response.status_code == 200, response.text
    meta = response.json()
    assert meta["spots"] > 0 and meta["last_frame"] == 4
    assert {"mean", "stddev", "wavelength", "beam_center_x"} <= set(meta)
    jsonschema.validate(meta, META_SCHEMA)  # as the OpenAPI document says
    rings = meta["rings"]  # the ring statistics: the whole view's numbers, ring by ring
    assert [r["ring"] for r in rings] == list(range(16))
    assert (
        sum(r["n"] for r in rings) == meta["n"] and sum(r["spots"] for r in rings) == meta["spots"]
    )
    assert all(r["inner_px"] < r["outer_px"] for r in rings)


def test_pixel_at_full_depth_is_the_frames_own(http: httpx.Client, data_dir: Path) -> None:
    fn = str(data_dir / "x_master.h5")
    reader = open_reader(fn)
    try:
        prepared = prepare_frame(reader.read_frame(3))
    finally:
        reader.close()
    frame, code = prepared.pixels, prepared.saturation
    y, x = np.unravel_index(int(np.argmax(frame)), frame.shape)  # the brightest: saturated
    for px, py in ((int(x), int(y)), (0, 0), (1027, 1061)):
        response = http.get(f"{API}/esaf/0/pixel", params={"fn": fn, "frame": 3, "x": px, "y": py})
        assert response.status_code == 200, response.text
        body = response.json()
        jsonschema.validate(body, PIXEL_SCHEMA)
        value = int(frame[py, px])
        assert body == {"x": px, "y": py, "frame": 3, "value": value, "saturated": value == code}
    outside = http.get(f"{API}/esaf/0/pixel", params={"fn": fn, "x": 1028, "y": 0}).json()
    assert outside["value"] is None
    _assert_problem(http.get(f"{API}/esaf/0/pixel", params={"fn": fn, "x": 3}), 422, "y")
    _assert_problem(http.get(f"{API}/esaf/0/pixel", params={"fn": fn, "x": -1, "y": 0}), 422)
    gone = {"fn": str(data_dir / "nope_master.h5"), "x": 1, "y": 1}
    _assert_problem(http.get(f"{API}/esaf/0/pixel", params=gone), 404, "No such file")
    _assert_problem(http.get(f"{API}/esaf/51234/pixel", params={"fn": fn, "x": 1, "y": 1}), 403)


# -- sessions ---------------------------------------------------------------------------


def test_cookie_session(stack: Stack, pid: str, data_dir: Path) -> None:
    with httpx.Client(base_url=stack.gateway_url, timeout=60) as browser:
        _assert_problem(browser.get(f"{API}/session"), 401)
        signed_in = browser.post(f"{API}/session", json={"pid": pid})
        assert signed_in.status_code == 200 and signed_in.json()["user"] == dev_user()
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        params = {"fn": str(data_dir / "x_master.h5"), "xsize": 64}
        assert browser.get(_view_url(), params=params).status_code == 200
        assert browser.delete(f"{API}/session").status_code == 204
        assert COOKIE not in browser.cookies
        _assert_problem(browser.get(_view_url(), params=params), 401, "no session")
        form = browser.post(f"{API}/session", data={"pid": pid})  # a cross-site form's way
        _assert_problem(form, 415)


def test_session_refusals_are_401(stack: Stack, data_dir: Path) -> None:
    params = {"fn": str(data_dir / "x_master.h5"), "xsize": 64}
    with httpx.Client(base_url=stack.gateway_url, timeout=60) as anonymous:
        body = _assert_problem(anonymous.get(_view_url(), params=params), 401)
        assert body["instance"] == _view_url()
        response = anonymous.get(_view_url(), params=params)
        assert response.headers["www-authenticate"].startswith("Bearer")
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        _assert_problem(anonymous.get(_view_url(), params=params, headers=basic), 401)
        never = {"Authorization": "Bearer no-such-session"}
        _assert_problem(anonymous.get(_view_url(), params=params, headers=never), 401, "(2)")
        # A session whose signature is not the login service's.
        client = redis.Redis.from_url(stack.redis_url)
        text, _ = sign_isauth(stack.signing_key.read_bytes(), isauth_for("forged", "x", [0]))  # type: ignore[union-attr]
        write_session(client, "forged", text, "AAAA")
        client.close()
        forged = {"Authorization": "Bearer forged"}
        _assert_problem(anonymous.get(_view_url(), params=params, headers=forged), 401, "(4)")


def test_another_esaf_is_403(http: httpx.Client, data_dir: Path) -> None:
    params = {"fn": str(data_dir / "x_master.h5"), "xsize": 64}
    _assert_problem(http.get(_view_url(51234), params=params), 403, "not authorized for esaf")
    meta = {"fn": params["fn"], "frame": 1}
    _assert_problem(http.get(f"{API}/esaf/51234/meta", params=meta), 403)


def test_logout_mid_session_refuses_the_next_request(stack: Stack, data_dir: Path) -> None:
    other = stack.add_session([0], user=dev_user())
    params = {"fn": str(data_dir / "x_master.h5"), "xsize": 64}
    headers = {"Authorization": f"Bearer {other}"}
    with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as client:
        assert client.get(_view_url(), params=params).status_code == 200
        admin = redis.Redis.from_url(stack.redis_url)
        admin.delete(other)
        admin.close()
        body = _assert_problem(client.get(_view_url(), params=params), 401, "(7)")
        assert other not in body["detail"]  # the token is not echoed whole


# -- bad input --------------------------------------------------------------------------


def test_missing_file_and_frame_are_404(http: httpx.Client, data_dir: Path) -> None:
    missing = {"fn": str(data_dir / "nope_master.h5"), "xsize": 64}
    _assert_problem(http.get(_view_url(), params=missing), 404, "No such file")
    _assert_problem(http.get(f"{API}/esaf/0/meta", params={"fn": missing["fn"]}), 404)
    beyond = {"fn": str(data_dir / "x_master.h5"), "frame": 99, "xsize": 64}
    _assert_problem(http.get(_view_url(), params=beyond), 404, "frame 99")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: workers then run as nobody")
def test_unreadable_file_is_403(http: httpx.Client, data_dir: Path) -> None:
    params = {"fn": str(data_dir / "locked" / "s_master.h5"), "xsize": 64}
    _assert_problem(http.get(_view_url(), params=params), 403, "Permission denied")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"xsize": "abc"}, "xsize must be an integer"),
        ({"xsize": 100_000}, "xsize must be between"),
        ({"zoom": "nan"}, "zoom must be a finite number"),
        ({"frame": 0}, "frame must be between"),
        ({"keepAspect": "maybe"}, "keepAspect must be true or false"),
        ({"colour": "red"}, "unknown parameter 'colour'"),
        ({"fn": ""}, "parameter fn"),
    ],
)
def test_bad_parameters_are_422(
    http: httpx.Client, data_dir: Path, params: dict[str, Any], text: str
) -> None:
    query = {"fn": str(data_dir / "x_master.h5"), **params}
    _assert_problem(http.get(_view_url(), params=query), 422, text)


def test_sizes_are_bounded(http: httpx.Client, data_dir: Path) -> None:
    _assert_problem(http.get(_view_url(), params={"fn": "x" * 9000}), 414)
    repeated = http.get(_view_url() + "?fn=a&fn=b")
    _assert_problem(repeated, 422, "repeated")
    big = http.post(f"{API}/esaf/0/index", json={"fn1": "x" * 20000})
    _assert_problem(big, 413)


# -- index ------------------------------------------------------------------------------


def _events(client: httpx.Client, url: str) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    name, data = "message", []
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                events.append((name, "\n".join(data)))
                if name in ("result", "error"):
                    break
                name, data = "message", []
    return events


def test_index_with_progress_as_server_sent_events(
    stack: Stack, http: httpx.Client, data_dir: Path
) -> None:
    started = http.post(f"{API}/esaf/0/index", json={"fn1": str(data_dir / "x_master.h5")})
    assert started.status_code == 202, started.text
    run = started.json()
    assert started.headers["location"] == run["events"]
    events = _events(http, run["events"])
    progress = [json.loads(data) for name, data in events if name == "progress"]
    assert any("indexing" in m.get("progress", "") for m in progress), events
    assert events[-1][0] == "result"
    assert json.loads(events[-1][1])["result"]["spacegroup"] == "P212121"
    # Replayed from the start to a late listener; another session cannot see the run.
    assert _events(http, run["events"]) == events
    other = stack.add_session([0], user=dev_user())
    theirs = http.get(run["events"], headers={"Authorization": f"Bearer {other}"})
    _assert_problem(theirs, 404)


def test_index_needs_fn1(http: httpx.Client) -> None:
    _assert_problem(http.post(f"{API}/esaf/0/index", json={"frame1": 1}), 422, "fn1")
    _assert_problem(http.post(f"{API}/esaf/0/index", content=b"{", headers={
        "Content-Type": "application/json"}), 422, "not valid JSON")  # fmt: skip


# -- the rest of the surface ------------------------------------------------------------


def test_health_metrics_and_openapi(http: httpx.Client, data_dir: Path) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    http.get(_view_url(), params={"fn": str(data_dir / "x_master.h5"), "xsize": 32})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert 'is_requests_total{outcome="ok",type="jpeg"}' in metrics.text
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1") and document == openapi_document(10000)
    for path in ("/view", "/view.json", "/meta", "/index"):
        assert f"/api/v1/esaf/{{esaf}}{path}" in document["paths"]
    assert "/api/v1/index/{run_id}/events" in document["paths"]


def test_page_and_security_headers(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    script = http.get("/static/viewer.js")
    assert script.status_code == 200 and "https://" not in script.text
    for response in (page, http.get("/nowhere")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
    _assert_problem(http.get("/nowhere"), 404)


# -- what the stack cannot show: a Gateway built here on real parts ---------------------


@pytest.fixture
def own_gateway(stack: Stack, redis_url: str) -> Iterator[tuple[Settings, str]]:
    """Settings for a gateway on the test's own Redis (sessions signed with the stack's
    key) where no worker serves any queue."""
    settings = Settings(
        redis_url=redis_url,
        session_public_key=stack.env["IS_SESSION_PUBLIC_KEY"],
        task_secret="gateway-test",
        view_timeout_s=1.0,
        worker_start_timeout_s=0.5,
        gateway_session_in_flight=1,
    )
    client = redis.Redis.from_url(redis_url)
    key = stack.signing_key.read_bytes()  # type: ignore[union-attr]
    text, sig = sign_isauth(key, isauth_for("own-pid", dev_user(), [0]))
    write_session(client, "own-pid", text, sig)
    client.close()
    yield settings, "own-pid"


def _gateway(settings: Settings, *, sessions_url: str | None = None) -> Gateway:
    verifier = SessionVerifier(
        session_redis(sessions_url or settings.sessions),
        load_public_key(settings.session_public_key),
    )
    any_id = IdRange(1, 2**32 - 2)
    identities = IdentityResolver("user", uids=any_id, gids=any_id)
    dispatcher = CeleryDispatcher(create_app(settings), settings, send_inline=True)  # as main
    return Gateway(settings, dispatcher, verifier, identities)


def test_no_worker_is_504_and_the_session_limit_is_429(
    own_gateway: tuple[Settings, str],
) -> None:
    settings, own_pid = own_gateway
    gateway = _gateway(settings)
    headers = {"Authorization": f"Bearer {own_pid}"}
    params = {"fn": "/nowhere/x_master.h5", "xsize": 64}
    results: list[httpx.Response] = []
    with serve(gateway) as url, httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        slow = threading.Thread(target=lambda: results.append(c.get(_view_url(), params=params)))
        slow.start()
        deadline = time.monotonic() + 5
        while gateway.metrics.registry.get_sample_value("is_requests_in_flight") != 1.0:
            assert time.monotonic() < deadline, "the first request never got in flight"
            time.sleep(0.01)
        busy = c.get(_view_url(), params=params)
        _assert_problem(busy, 429)
        assert busy.headers["retry-after"] == "1"
        slow.join(timeout=30)
    _assert_problem(results[0], 504, "timed out")
    gateway_close(gateway)


def test_unavailable_parts_are_503(own_gateway: tuple[Settings, str]) -> None:
    settings, own_pid = own_gateway
    headers = {"Authorization": f"Bearer {own_pid}"}
    params = {"fn": "/nowhere/x_master.h5", "xsize": 64}
    down = _gateway(settings, sessions_url=f"redis://127.0.0.1:{free_port()}/0")
    with serve(down) as url, httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        _assert_problem(c.get(_view_url(), params=params), 503, "session store unavailable")
    gateway_close(down)
    closed = _gateway(dataclasses.replace(settings, gateway_session_in_flight=4))
    closed._dispatcher.close()  # a dispatcher that stopped: no worker can be reached
    with serve(closed) as url, httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        _assert_problem(c.get(_view_url(), params=params), 503, "dispatcher closed")
    gateway_close(closed)


def gateway_close(gateway: Gateway) -> None:
    """Release what :func:`_gateway` opened."""
    gateway._dispatcher.close()
    gateway._sessions.close()


def test_is_gateway_refuses_to_start_without_a_session_key(
    capsys: pytest.CaptureFixture[str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.gateway.main import main

    monkeypatch.setenv("IS_REDIS_URL", redis_url)
    assert main(["--port", str(free_port())]) == 2
    assert "IS_SESSION_PUBLIC_KEY" in capsys.readouterr().err


def test_gateway_process_says_what_it_is(stack: Stack) -> None:
    gateway = next(c.process.pid for c in stack.components if c.name == "gateway")
    cmdline = Path(f"/proc/{gateway}/cmdline").read_bytes().split(b"\0")[0]
    assert cmdline == b"is-gateway"


def test_one_session_runs_two_index_jobs_at_most(http: httpx.Client, data_dir: Path) -> None:
    body = {"fn1": str(data_dir / "x_master.h5")}
    runs = [http.post(f"{API}/esaf/0/index", json=body) for _ in range(3)]
    assert [r.status_code for r in runs[:2]] == [202, 202]
    _assert_problem(runs[2], 429, "index runs")
    for run in runs[:2]:  # both still end with their result
        assert _events(http, run.json()["events"])[-1][0] == "result"
    assert http.post(f"{API}/esaf/0/index", json=body).status_code == 202
