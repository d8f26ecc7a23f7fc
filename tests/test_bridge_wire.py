"""Wire framing of the bridge (spec 1.2, 1.3): routes, replies, malformed envelopes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import zmq

from bridge.proxy import Proxy
from bridge.wire import MAX_ENVELOPE_FRAMES, MAX_PAYLOAD_BYTES
from ops import client
from ops.redisserver import free_port
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:  # imported at runtime by pytest as plugins (below)
    from tests.bridge_harness import BridgeHarness, HarnessFactory

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

FORMAT_ERROR = "isMain.c main: Unexpected incoming message format"


def _job(pid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "jpeg", "pid": pid, "esaf": 0, "fn": "/data/x_1_master.h5", **fields}


def _recv(sock: zmq.Socket[Any], timeout_s: float = 10.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    frames: list[bytes] = sock.recv_multipart()
    return frames


def _still_serving(bridge: BridgeHarness) -> None:
    """After any abuse, a good request is still answered."""
    pid = bridge.login("alive")
    assert_success_reply(bridge.request(_job(pid)), 4)


def test_req_round_trip_echoes_job_and_identity(bridge: BridgeHarness) -> None:
    pid = bridge.login("s3ss10n")
    reply = assert_success_reply(bridge.request(_job(pid, tag="img-3")), 4)
    assert json.loads(reply[0])["tag"] == "img-3"
    assert reply[1] == f"{bridge.user.uid}:{bridge.user.gid}".encode()
    assert reply[2] == b"jpeg"


@pytest.mark.parametrize("hops", [0, 1, 5, MAX_ENVELOPE_FRAMES - 2])
def test_any_number_of_routing_frames_comes_back(bridge: BridgeHarness, hops: int) -> None:
    pid = bridge.login("hops")
    route = [f"hop-{i}".encode() for i in range(hops)]
    with bridge.dealer() as sock:
        sock.send_multipart([*route, b"", json.dumps(_job(pid)).encode()])
        frames = _recv(sock)
    assert frames[:hops] == route
    assert frames[hops] == b""
    assert_success_reply(frames[hops + 1 :], 4)


def test_too_many_envelope_frames_is_one_error_to_the_sender(bridge: BridgeHarness) -> None:
    route = [f"h{i}".encode() for i in range(MAX_ENVELOPE_FRAMES)]
    with bridge.dealer() as sock:
        sock.send_multipart([*route, b"", b"{}"])
        frames = _recv(sock)
    assert frames[: len(route)] == route
    assert frames[len(route)] == b""
    assert_error_reply(frames[len(route) + 1 :], f"more than {MAX_ENVELOPE_FRAMES}")
    _still_serving(bridge)


def test_extra_frames_after_payload_are_consumed(bridge: BridgeHarness) -> None:
    pid = bridge.login("extra")
    with bridge.dealer() as sock:
        sock.send_multipart([b"", json.dumps(_job(pid, tag="a")).encode(), b"x", b"{}"])
        sock.send_multipart([b"", json.dumps(_job(pid, tag="b")).encode()])
        first, second = _recv(sock), _recv(sock)
        assert not sock.poll(300), "an extra frame was taken for a request"
    tags = {json.loads(assert_success_reply(f[1:], 4)[0])["tag"] for f in (first, second)}
    assert tags == {"a", "b"}
    reply = client.request_frames(bridge.endpoint, [json.dumps(_job(pid)).encode(), b"more"])
    assert_success_reply(reply, 4)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ([b"{}"], "no empty delimiter frame"),
        ([b""], "no payload after the delimiter"),
        ([b"hop", b""], "no payload after the delimiter"),
        ([f"f{i}".encode() for i in range(100)], "no empty delimiter frame"),
    ],
    ids=["no-delimiter", "only-delimiter", "hop-and-delimiter", "100-frames"],
)
def test_malformed_envelope_answered_once(
    bridge: BridgeHarness, message: list[bytes], expected: str
) -> None:
    with bridge.dealer() as sock:
        sock.send_multipart(message)
        frames = _recv(sock)
        assert not sock.poll(300), "answered more than once"
    # Replies go back along the frames before the payload, then the delimiter.
    delimiter = frames.index(b"")
    assert_error_reply(frames[delimiter + 1 :], FORMAT_ERROR)
    assert expected in frames[-1].decode()
    _still_serving(bridge)


PARSE = "isMain.c main: Failed to parse request: "


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xff\xfe\x00garbage\x80", f"{PARSE}unable to decode byte 0xff"),
        (b"{not json", f"{PARSE}string or '}}' expected near 'not'"),
        (b"", f"{PARSE}'[' or '{{' expected near end of file"),
        (b"42", f"{PARSE}'[' or '{{' expected near '42'"),
        (b'"text"', f"{PARSE}'[' or '{{' expected near '\"text\"'"),
        (b'[{"pid":"x"}]', "isMain.c main: request does not contain pid"),
        (b'{"pid":"x","esaf":NaN}', f"{PARSE}invalid token near 'NaN'"),
        (b"[" * 100_000 + b"]" * 100_000, "Failed to parse request: nested deeper than 32"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), f"exceeds {MAX_PAYLOAD_BYTES}"),
        (b'{"type":"jpeg"}', "isMain.c main: request does not contain pid"),
        (b'{"type":"jpeg","pid":12}', "isMain.c main: request does not contain pid"),
    ],
    ids=[
        "binary", "bad-json", "empty", "number", "string", "array", "nan",
        "deep", "huge", "no-pid", "int-pid",
    ],
)  # fmt: skip
def test_bad_payload_is_one_error_frame(
    bridge: BridgeHarness, payload: bytes, expected: str
) -> None:
    reply = client.request_frames(bridge.endpoint, [payload])
    assert_error_reply(reply, expected)
    _still_serving(bridge)


@pytest.mark.parametrize(
    "case_id", ["err_bad_json", "err_empty_request"], ids=["truncated", "empty"]
)
def test_recorded_parse_errors_of_the_original(bridge: BridgeHarness, case_id: str) -> None:
    # The texts the original C server sent (../shared/compat/golden), written out here so
    # that the test runs without the kit.
    recorded = {
        "err_bad_json": (
            b'{"type":"jpeg","pid":"PID","esaf":50001,',
            "isMain.c main: Failed to parse request: string or '}' expected near end of file",
        ),
        "err_empty_request": (
            b"",
            "isMain.c main: Failed to parse request: '[' or '{' expected near end of file",
        ),
    }
    payload, text = recorded[case_id]
    assert client.request_frames(bridge.endpoint, [payload]) == [text.encode()]


def test_error_frame_is_capped_at_4095_bytes(bridge: BridgeHarness) -> None:
    pid = bridge.login("long")
    reply = bridge.request({"type": "nope", "pid": pid, "label": "é" * 10_000})
    assert_error_reply(reply, "isWorker.c isWorker: Unknown job type 'nope' in job '")
    assert len(reply[0]) > 4000


@pytest.fixture
def proxied(bridges: HarnessFactory, ipc_dir: Path) -> Iterator[tuple[BridgeHarness, str]]:
    """A bridge connected to an in-process is-proxy; yields (bridge, client endpoint)."""
    proxy = Proxy(f"ipc://{ipc_dir}/front", "tcp://127.0.0.1:*")
    proxy.start()
    harness = bridges.start(bind_endpoint=None, proxy_endpoint=proxy.backend)
    try:
        yield harness, proxy.frontend
    finally:
        proxy.stop()


def test_through_proxy(proxied: tuple[BridgeHarness, str]) -> None:
    harness, front = proxied
    pid = harness.login("via-proxy")
    reply = client.request(front, _job(pid, tag="p"))
    assert json.loads(assert_success_reply(reply, 4)[0])["tag"] == "p"
    assert_error_reply(client.request_frames(front, [b"\x00\x01"]), "Failed to parse request")


def test_through_proxy_dealer_with_hops_and_no_delimiter(
    proxied: tuple[BridgeHarness, str],
) -> None:
    harness, front = proxied
    pid = harness.login("via-proxy")
    ctx: zmq.Context[Any] = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(front)
        sock.send_multipart([b"a", b"b", b"", json.dumps(_job(pid)).encode()])
        frames = _recv(sock)
        assert frames[:3] == [b"a", b"b", b""]
        assert_success_reply(frames[3:], 4)
        sock.send_multipart([b"garbage-without-delimiter"])
        frames = _recv(sock)
        assert frames[0] == b""
        assert_error_reply(frames[1:], "no empty delimiter frame")


def test_two_chained_proxies_add_hops(bridges: HarnessFactory, ipc_dir: Path) -> None:
    """client -> outer proxy -> hand relay -> inner proxy -> bridge: four routing frames."""
    outer = Proxy(f"ipc://{ipc_dir}/outer", "tcp://127.0.0.1:*")
    inner = Proxy(f"ipc://{ipc_dir}/inner", "tcp://127.0.0.1:*")
    outer.start()
    inner.start()
    ctx: zmq.Context[Any] = zmq.Context.instance()
    try:
        harness = bridges.start(bind_endpoint=None, proxy_endpoint=inner.backend)
        pid = harness.login("two-hops")
        with ctx.socket(zmq.ROUTER) as relay_in, ctx.socket(zmq.DEALER) as relay_out:
            relay_in.connect(outer.backend)  # the relay faces outer like a bridge would
            relay_out.connect(inner.frontend)  # and inner like a client would
            with ctx.socket(zmq.REQ) as req:
                req.connect(outer.frontend)
                req.send(json.dumps(_job(pid)).encode())
                request = _recv(relay_in)
                assert len(request) == 4  # outer conn, client id, delimiter, payload
                relay_out.send_multipart(request)
                relay_in.send_multipart(_recv(relay_out))
                assert req.poll(10_000)
                assert_success_reply(req.recv_multipart(), 4)
    finally:
        inner.stop()
        outer.stop()


def test_is_proxy_console_script_as_users_start_it(bridges: HarnessFactory, ipc_dir: Path) -> None:
    backend = f"tcp://127.0.0.1:{free_port()}"
    front = f"ipc://{ipc_dir}/front"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env["IS_LOG_LEVEL"] = "debug"  # lower case, as admins write it (it once stopped the proxy)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.proxy", "--frontend", front, "--backend", backend],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        harness = bridges.start(bind_endpoint=None, proxy_endpoint=backend)
        pid = harness.login("proc-proxy")
        assert_success_reply(client.request(front, _job(pid), timeout_s=15.0), 4)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_is_proxy_refuses_missing_endpoints() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    done = subprocess.run(
        [sys.executable, "-m", "bridge.proxy"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert b"--frontend" in done.stderr
