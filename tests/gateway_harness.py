"""The HTTP gateway under test: a real uvicorn on a free loopback port, in a thread.

The end-to-end tests use the gateway ``isctl up`` starts (ops.stack, ``gateway=True``);
this harness serves a :class:`bridge.gateway.app.Gateway` built in the test process for
the cases that need parts the stack cannot give: a session Redis that is down, a queue
no worker serves (timeouts), a tiny per-session limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from bridge.gateway.app import Gateway
from ops.redisserver import free_port


@contextmanager
def serve(gateway: Gateway) -> Iterator[str]:
    """Serve ``gateway`` until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        gateway.app(), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
