"""``is-proxy``: a ROUTER/DEALER relay between is.js clients and bridges (LS-CAT's is_proxy).

Clients (REQ) connect to the frontend ROUTER; bridges connect their ROUTER to the
backend DEALER, which spreads requests over every connected bridge. For sites without
LS-CAT's own is_proxy. The relay is libzmq's ``zmq_proxy``, so it costs no Python per
message; SIGTERM terminates its context to stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

import zmq

from istasks.logs import configure_logging
from istasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Same bound as the bridge's sockets (see bridge.server.SOCKET_HWM).
PROXY_HWM = 10_000
#: ZMTP heartbeats towards the bridges (backend only: clients may be old libzmq).
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500


class Proxy:
    """A bound frontend ROUTER and backend DEALER relayed by libzmq in one thread.

    The proxy owns its ZeroMQ context: :meth:`stop` terminates it, which is how a
    blocking ``zmq_proxy`` is ended (``zmq_proxy_steerable``'s TERMINATE proved
    unreliable with libzmq 4.3.5 once traffic had flowed).
    """

    def __init__(self, frontend: str, backend: str) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        try:
            self._front = self._bound(zmq.ROUTER, frontend)
            self._back = self._bound(zmq.DEALER, backend, heartbeats=True)
        except zmq.ZMQError:
            self._ctx.destroy(linger=0)
            raise
        self.frontend = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self._back.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread: threading.Thread | None = None

    def _bound(self, kind: int, endpoint: str, *, heartbeats: bool = False) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, PROXY_HWM)
        sock.setsockopt(zmq.RCVHWM, PROXY_HWM)
        sock.setsockopt(zmq.LINGER, 500)
        if heartbeats:  # a bridge whose host vanished (no TCP close) is dropped in ~2 s
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise zmq.ZMQError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}") from exc
        return sock

    def start(self) -> None:
        """Relay in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="is-proxy", daemon=True)
        self._thread.start()

    def stop(self, *, wait_s: float = 5.0) -> None:
        """End the relay and release its sockets (call once, from any thread)."""
        if self._thread is None:  # never started: nobody else will close the sockets
            self._close()
        self._ctx.term()  # returns once the relay thread has closed its sockets
        if self._thread is not None:
            self._thread.join(wait_s)

    def _run(self) -> None:
        log.info("is-proxy relaying %s (clients) <-> %s (bridges)", self.frontend, self.backend)
        try:
            zmq.proxy(self._front, self._back)
        except zmq.ContextTerminated:
            pass
        finally:
            self._close()
            log.info("is-proxy stopped")

    def _close(self) -> None:
        self._front.close(linger=0)
        self._back.close(linger=0)


def default_endpoints(settings: Settings) -> tuple[str | None, str | None]:
    """(frontend, backend) when not given: ``ipc://<run_dir>/is-proxy.sock`` and the
    endpoint the bridges connect to (IS_PROXY_ENDPOINT)."""
    frontend = f"ipc://{settings.run_dir}/is-proxy.sock" if settings.run_dir else None
    return frontend, settings.proxy_endpoint


def main(argv: list[str] | None = None) -> int:
    """Console script ``is-proxy``."""
    settings = get_settings()
    default_front, default_back = default_endpoints(settings)
    parser = argparse.ArgumentParser(
        prog="is-proxy", description="ROUTER/DEALER relay between is.js clients and bridges"
    )
    parser.add_argument("--frontend", default=default_front, help="endpoint for clients (bind)")
    parser.add_argument("--backend", default=default_back, help="endpoint for bridges (bind)")
    args = parser.parse_args(argv)
    # The shared set-up: the level case-insensitive (IS_LOG_LEVEL=debug used to stop
    # the proxy at start), syslog like every other program.
    configure_logging(settings, "is-proxy")
    if not args.frontend or not args.backend:
        parser.error("need --frontend (or IS_RUN_DIR) and --backend (or IS_PROXY_ENDPOINT)")
    try:
        proxy = Proxy(args.frontend, args.backend)
    except zmq.ZMQError as exc:
        print(f"is-proxy: {exc}", file=sys.stderr)
        return 1
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proxy.start()
    while not stopped.wait(1.0):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
