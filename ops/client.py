"""A REQ client that talks to the bridge (or an is-proxy) the way is.js does.

Used by ``isctl get`` and by the tests. A fresh socket per request: REQ sockets are
stuck after a timeout (their strict send/recv alternation), so one is never reused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import zmq


def request(endpoint: str, job: dict[str, Any], *, timeout_s: float = 10.0) -> list[bytes]:
    """Send ``job`` as one JSON frame and return the reply frames; TimeoutError if none."""
    payload = json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode()
    return request_frames(endpoint, [payload], timeout_s=timeout_s)


def request_frames(
    endpoint: str, frames: Sequence[bytes], *, timeout_s: float = 10.0
) -> list[bytes]:
    """Send raw payload frames (the REQ socket adds the delimiter); the reply frames."""
    context: zmq.Context[Any] = zmq.Context.instance()
    sock: zmq.Socket[Any] = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(list(frames))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s:g} s")
        reply: list[bytes] = sock.recv_multipart()
        return reply
    finally:
        sock.close(linger=0)
