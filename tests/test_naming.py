from __future__ import annotations

import time

import pytest

from istasks.errors import EnvelopeError
from queues.envelope import open_envelope, queue_key, seal
from queues.naming import Identity, parse_queue_name, prefetch_queue_name, queue_name


@pytest.mark.parametrize("uid,gid", [(1000, 51234), (0, 0), (4294967294, 1)])
def test_queue_names_round_trip(uid: int, gid: int) -> None:
    assert parse_queue_name(queue_name(uid, gid)) == (Identity(uid, gid), False)
    assert parse_queue_name(prefetch_queue_name(uid, gid)) == (Identity(uid, gid), True)


@pytest.mark.parametrize(
    "bad", ["", "1000", "1000:", ":1", "01:2", "1:2:3", "1:2:prefetchx", " 1:2", "1:2\n", "-1:2",
            "4294967295:1", "a:b", "1:2:PREFETCH"],
)  # fmt: skip
def test_anything_else_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_queue_name(bad)


def test_envelope_binds_queue_and_key() -> None:
    master = b"m" * 32
    token = seal(master, "1000:2000", {"job": {"type": "jpeg"}})
    assert open_envelope(queue_key(master, "1000:2000"), "1000:2000", token, 60) == {
        "job": {"type": "jpeg"}
    }
    with pytest.raises(EnvelopeError, match="signature"):
        open_envelope(queue_key(master, "1001:2000"), "1001:2000", token, 60)
    with pytest.raises(EnvelopeError, match="another queue"):
        # a worker that somehow has the right key but serves another queue name
        open_envelope(queue_key(master, "1000:2000"), "1000:2001", token, 60)
    time.sleep(2.1)
    with pytest.raises(EnvelopeError, match="expired"):
        open_envelope(queue_key(master, "1000:2000"), "1000:2000", token, 1)
