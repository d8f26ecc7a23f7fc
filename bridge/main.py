"""``is-bridge``: the process that serves is.js requests (console script).

Reads the settings, checks the session key and store, builds the Celery dispatcher
(with the supervisor's worker pool when one is running), serves ``/metrics`` when
``IS_METRICS_PORT`` is set, and serves requests until SIGTERM or SIGINT. Heavy or
optional parts are imported inside functions so that importing this module stays cheap
and never pulls in numpy or h5py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from bridge.sessions import SessionConfigError, SessionVerifier
from istasks.cache_budget import warn_about_cache_server
from istasks.logs import configure_logging
from istasks.settings import Settings, get_settings
from queues import proctitle
from queues.identity import IdentityResolver

if TYPE_CHECKING:
    from bridge.dispatch import Dispatcher
    from bridge.metrics import BridgeMetrics
    from queues.pool import SupervisorClient

log = logging.getLogger(__name__)


def worker_pool(settings: Settings) -> SupervisorClient | None:
    """The supervisor's pool client when its socket exists, else None (workers started
    by hand, e.g. ``python -m istasks.worker``)."""
    if not Path(settings.supervisor_socket).exists():
        log.info("no supervisor at %s: workers must be started separately",
                 settings.supervisor_socket)  # fmt: skip
        return None
    from queues.pool import SupervisorClient

    return SupervisorClient(settings)


def build_dispatcher(settings: Settings) -> Dispatcher:
    """The Celery dispatcher for ``settings``."""
    from bridge.dispatch import CeleryDispatcher
    from istasks.app import create_app

    # Inline: the server calls submit() from its admission threads (bridge.server).
    return CeleryDispatcher(create_app(settings), settings, worker_pool(settings), send_inline=True)


def start_metrics(settings: Settings, port: int) -> tuple[BridgeMetrics, list[Callable[[], None]]]:
    """The bridge's metrics, served on ``settings.metrics_address:port``, with the live
    worker count from the supervisor when one runs; and what closes them."""
    from bridge.metrics import (
        BridgeMetrics,
        CacheUsageReader,
        MetricsEndpoint,
        SupervisorWorkerCount,
    )

    metrics = BridgeMetrics()
    closers: list[Callable[[], None]] = []
    if Path(settings.supervisor_socket).exists():
        from queues.pool import SupervisorClient

        count = SupervisorWorkerCount(SupervisorClient(settings))  # its own connection
        metrics.track_workers(count)
        metrics.track_memory(count.status)
        closers.append(count.close)
    if settings.cache:
        usage = CacheUsageReader(settings.cache, settings.cache_max_bytes)
        metrics.track_cache(usage)
        closers.append(usage.close)
    try:
        endpoint = MetricsEndpoint(metrics, settings.metrics_address, port)
    except BaseException:
        _release(*closers)
        raise
    closers.append(endpoint.close)
    return metrics, closers


def _parse_args(argv: list[str] | None, settings: Settings) -> Settings:
    parser = argparse.ArgumentParser(prog="is-bridge", description="is.js request bridge")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--connect", metavar="ENDPOINT", help="is_proxy DEALER to connect to")
    where.add_argument("--bind", metavar="ENDPOINT", help="bind a ROUTER here (standalone)")
    args = parser.parse_args(argv)
    if args.connect:
        return dataclasses.replace(settings, proxy_endpoint=args.connect, bind_endpoint=None)
    if args.bind:
        return dataclasses.replace(settings, proxy_endpoint=None, bind_endpoint=args.bind)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Run the bridge until a signal; 2 when the configuration is unusable."""
    from bridge.server import BridgeServer

    settings = _parse_args(argv, get_settings())
    proctitle.set_title(proctitle.BRIDGE)
    configure_logging(settings, "is-bridge")
    warn_about_cache_server(settings.cache, settings.broker, settings.cache_max_bytes)
    try:
        sessions = SessionVerifier.from_settings(settings)
        identities = IdentityResolver.from_settings(settings)
        dispatcher = build_dispatcher(settings)
    except (SessionConfigError, ValueError) as exc:
        print(f"is-bridge: {exc}", file=sys.stderr)
        return 2
    closers: list[Callable[[], None]] = [dispatcher.close, sessions.close]
    metrics = None
    try:
        if settings.metrics_port is not None:
            metrics, metric_closers = start_metrics(settings, settings.metrics_port)
            closers[:0] = metric_closers
        server = BridgeServer(settings, dispatcher, sessions, identities, metrics=metrics)
    except Exception as exc:  # bad endpoint, address in use: say so and stop
        print(f"is-bridge: cannot open a listening socket: {exc}", file=sys.stderr)
        _release(*closers)
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever()
    finally:
        _release(*closers)
    return 0


def _release(*closers: Callable[[], None]) -> None:
    """Run every closer even if one fails: shutdown must finish (failures are logged)."""
    for close in closers:
        try:
            close()
        except Exception:
            log.exception("error while shutting down")


if __name__ == "__main__":
    raise SystemExit(main())
