"""The bridge's event loop: request types, concurrency, deadlines, failures, shutdown."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
import zmq

from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:
    from tests.bridge_harness import BridgeHarness, HarnessFactory

pytest_plugins = ("tests.accounts", "tests.bridge_harness")


def _job(pid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "jpeg", "pid": pid, "esaf": 0, **fields}


def _compact(job: dict[str, Any]) -> str:
    return json.dumps(job, separators=(",", ":"), sort_keys=True)


# -- request types (spec 2.5) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kind"), [("jpeg", "jpeg"), ("JPEG", "jpeg"), ("Spots", "spots"), ("index", "index")]
)
def test_types_are_case_insensitive(bridge: BridgeHarness, given: str, kind: str) -> None:
    pid = bridge.login("t")
    reply = assert_success_reply(bridge.request(_job(pid, type=given)), 4)
    assert reply[2] == kind.encode()
    assert json.loads(reply[0])["type"] == given  # the job is echoed as sent


@pytest.mark.parametrize(
    "obsolete", ["rsync_host_test", "rsync_connection_test", "local_dir_stats", "RSYNC_TRANSFER"]
)
def test_obsolete_types(bridge: BridgeHarness, obsolete: str) -> None:
    pid = bridge.login("t")
    reply = bridge.request(_job(pid, type=obsolete))
    text = assert_error_reply(
        reply, f"isWorker.c isWorker: Obsolete job type '{obsolete}' in job '"
    )
    assert text.endswith("'")
    assert json.loads(text.split(" in job '", 1)[1][:-1])["type"] == obsolete


def test_unknown_and_missing_types(bridge: BridgeHarness) -> None:
    pid = bridge.login("t")
    job = _job(pid, type="header")
    assert_error_reply(
        bridge.request(job),
        f"isWorker.c isWorker: Unknown job type 'header' in job '{_compact(job)}'",
    )
    no_type = {"pid": pid, "esaf": 0}
    assert bridge.request(no_type) == [
        b'isWorker.c isWorker: No type parameter in job {"esaf":0,"pid":"t"}'
    ]
    assert_error_reply(bridge.request({"pid": pid, "type": 5}), "No type parameter in job")
    assert not bridge.dispatcher.calls


def test_session_is_checked_before_the_type(bridge: BridgeHarness) -> None:
    assert_error_reply(bridge.request({"pid": "unknown", "type": "bogus"}), "not authorized (2)")


# -- concurrency ----------------------------------------------------------------------


def test_slow_request_does_not_delay_a_fast_one(bridge: BridgeHarness) -> None:
    pid = bridge.login("t")
    with bridge.dealer() as sock:
        sock.send_multipart([b"", json.dumps(_job(pid, tag="slow", test_delay_s=3.0)).encode()])
        sock.send_multipart([b"", json.dumps(_job(pid, tag="fast")).encode()])
        started = time.monotonic()
        assert sock.poll(10_000)
        first = sock.recv_multipart()
        fast_s = time.monotonic() - started
        assert sock.poll(10_000)
        second = sock.recv_multipart()
    assert json.loads(first[2])["tag"] == "fast"
    assert json.loads(second[2])["tag"] == "slow"
    assert fast_s < 2.0, f"fast reply took {fast_s:.2f} s behind a 3 s request"


def test_many_in_flight_each_answered_once(bridges: HarnessFactory) -> None:
    bridge = bridges.start(session_max_in_flight=0)  # one session: no per-session limit
    pid = bridge.login("t")
    count = 300
    with bridge.dealer() as sock:
        for i in range(count):
            delay = (i % 7) * 0.05
            sock.send_multipart([b"", json.dumps(_job(pid, tag=i, test_delay_s=delay)).encode()])
        tags: list[int] = []
        while len(tags) < count and sock.poll(5000):
            frames = sock.recv_multipart()
            tags.append(json.loads(assert_success_reply(frames[1:], 4)[0])["tag"])
        assert not sock.poll(300), "a request was answered twice"
    assert sorted(tags) == list(range(count))
    assert bridge.server.in_flight == 0


# -- dispatcher failures --------------------------------------------------------------


def test_dispatcher_that_never_answers_hits_the_bridge_deadline(bridges: HarnessFactory) -> None:
    harness = bridges.start(view_timeout_s=0.3, worker_start_timeout_s=0.1, margin_s=0.1)
    pid = harness.login("t")
    started = time.monotonic()
    reply = harness.request(_job(pid, test_script="never"))
    assert_error_reply(reply, "bridge: no reply within")
    assert time.monotonic() - started < 5.0
    assert_success_reply(harness.request(_job(pid)), 4)


def test_deadline_reply_then_late_result_is_dropped(bridges: HarnessFactory) -> None:
    harness = bridges.start(view_timeout_s=0.2, worker_start_timeout_s=0.0, margin_s=0.1)
    pid = harness.login("t")
    with harness.dealer() as sock:
        sock.send_multipart([b"", json.dumps(_job(pid, test_delay_s=1.0)).encode()])
        assert sock.poll(5000)
        assert_error_reply(sock.recv_multipart()[1:], "no reply within")
        assert not sock.poll(1500), "a request was answered twice"


def test_dispatcher_exception_is_a_generic_error_without_traceback(bridge: BridgeHarness) -> None:
    pid = bridge.login("t")
    text = assert_error_reply(
        bridge.request(_job(pid, test_script="raise")), "is: internal error (request "
    )
    assert "secret" not in text
    text = assert_error_reply(
        bridge.request(_job(pid, test_script="garbage")), "is: internal error"
    )
    assert "not bytes" not in text
    assert_error_reply(bridge.request(_job(pid, test_script="error")), "scripted error")


# -- shutdown -------------------------------------------------------------------------


def test_stop_answers_in_flight_requests(bridges: HarnessFactory) -> None:
    harness = bridges.start(grace_s=2.0)
    pid = harness.login("t")
    with harness.dealer() as sock:
        sock.send_multipart([b"", json.dumps(_job(pid, tag="quick", test_delay_s=0.1)).encode()])
        sock.send_multipart([b"", json.dumps(_job(pid, tag="slow", test_delay_s=30)).encode()])
        time.sleep(0.3)
        harness.server.stop(wait_s=5.0)
        replies = []
        while sock.poll(1000):
            replies.append(sock.recv_multipart()[1:])
    assert len(replies) == 2
    assert json.loads(assert_success_reply(replies[0], 4)[0])["tag"] == "quick"
    assert_error_reply(replies[1], "bridge: bridge shutting down (request ")


def test_bind_conflict_is_an_error_at_construction(
    bridge: BridgeHarness, bridges: HarnessFactory
) -> None:
    with pytest.raises(zmq.ZMQError):
        bridges.start(bind_endpoint=bridge.endpoint)
