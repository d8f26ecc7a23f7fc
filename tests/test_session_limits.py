"""Cost limits against one user starving a host: the pixel budget of a view (a real
service on a real file and Redis) and the requests one session may have in flight (the
in-process bridge on real sockets)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from istasks.errors import IsError
from istasks.service import Service, build_service
from istasks.settings import Settings
from ops.testdata.eiger import write_eiger
from queues.naming import Identity
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:
    from tests.bridge_harness import HarnessFactory

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

BUDGET_SIDE = 600


@pytest.fixture
def master(tmp_path: Path) -> Path:
    return write_eiger(tmp_path / "data", "x_1", nimages=2, frames_per_file=2, shape=(512, 514))


@pytest.fixture
def service(redis_url: str) -> Iterator[Service]:
    settings = Settings(redis_url=redis_url, view_max_pixels=BUDGET_SIDE * BUDGET_SIDE)
    svc = build_service(settings, Identity(4001, 5001))
    yield svc
    svc.close()


def _size(jpeg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size


def test_a_view_over_the_pixel_budget_is_the_blank_image_with_the_reason(
    service: Service, master: Path
) -> None:
    echo, meta, jpeg = service.jpeg({"fn": str(master), "xsize": BUDGET_SIDE + 1})
    reason = json.loads(echo)["error"]
    assert meta == b"" and "IS_VIEW_MAX_PIXELS" in reason and str(BUDGET_SIDE**2) in reason
    assert _size(jpeg) == (BUDGET_SIDE, BUDGET_SIDE)  # the blank stays within the budget too
    assert len(service.readers) == 0  # refused before the file was even opened
    assert service.cache.stats()["computed"] == 0
    echo, meta, jpeg = service.jpeg({"fn": str(master), "xsize": BUDGET_SIDE})
    assert "error" not in json.loads(echo) and meta and _size(jpeg) == (BUDGET_SIDE, BUDGET_SIDE)


def test_spots_over_the_pixel_budget_is_an_error(service: Service, master: Path) -> None:
    with pytest.raises(IsError, match="Missing data"):
        service.spots({"fn": str(master), "xsize": 5000})
    assert len(service.spots({"fn": str(master), "xsize": 384})) == 2


def _job(pid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "jpeg", "pid": pid, "esaf": 0, **fields}


def test_a_session_past_its_requests_in_flight_gets_an_error_at_once(
    bridges: HarnessFactory,
) -> None:
    bridge = bridges.start(session_max_in_flight=3)
    busy, other = bridge.login("busy"), bridge.login("other")
    with bridge.dealer() as sock:
        for tag in range(5):
            sock.send_multipart([b"", json.dumps(_job(busy, tag=tag, test_delay_s=1.5)).encode()])
        refused = []
        started = time.monotonic()
        for _ in range(2):  # the 4th and 5th: answered at once, not after the slow ones
            assert sock.poll(1000)
            refused.append(sock.recv_multipart()[1:])
        assert time.monotonic() - started < 1.0
        for frames in refused:
            assert_error_reply(frames, "bridge: this session has 3 requests in flight")
            assert "IS_SESSION_MAX_IN_FLIGHT" in frames[0].decode()
        # Another session is not held up by this one.
        assert_success_reply(bridge.request(_job(other, tag="other")), 4)
        tags = []
        while len(tags) < 3 and sock.poll(5000):
            tags.append(json.loads(assert_success_reply(sock.recv_multipart()[1:], 4)[0])["tag"])
        assert sorted(tags) == [0, 1, 2]
    # Once answered, the session may send again.
    assert_success_reply(bridge.request(_job(busy, tag="again")), 4)
    assert bridge.server.in_flight == 0
