"""``is-gateway``: the HTTP gateway and viewer page under uvicorn (console script).

Builds the same parts as ``is-bridge`` (bridge.main): the session verifier, the identity
resolver and the Celery dispatcher with the supervisor's worker pool, and serves
:class:`bridge.gateway.app.Gateway` on ``IS_GATEWAY_ADDRESS:IS_GATEWAY_PORT`` until
SIGTERM or SIGINT (uvicorn handles both).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from bridge.main import worker_pool
from bridge.sessions import SessionConfigError, SessionVerifier
from istasks.logs import configure_logging
from istasks.settings import Settings, get_settings
from queues import proctitle
from queues.identity import IdentityResolver

log = logging.getLogger(__name__)
#: What the gateway logs once it listens (ops.stack waits for it).
SERVING = "gateway serving on "


def _parse_args(argv: list[str] | None, settings: Settings) -> Settings:
    parser = argparse.ArgumentParser(prog="is-gateway", description="HTTP gateway and viewer")
    parser.add_argument("--port", type=int, help="listen port (IS_GATEWAY_PORT)")
    parser.add_argument("--address", help="listen address (IS_GATEWAY_ADDRESS)")
    args = parser.parse_args(argv)
    if args.port is not None:
        settings = dataclasses.replace(settings, gateway_port=args.port)
    if args.address:
        settings = dataclasses.replace(settings, gateway_address=args.address)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Serve until a signal; 2 when the configuration is unusable."""
    import uvicorn

    from bridge.dispatch import CeleryDispatcher
    from bridge.gateway.app import Gateway, health_check
    from istasks.app import create_app

    settings = _parse_args(argv, get_settings())
    proctitle.set_title(proctitle.GATEWAY)
    configure_logging(settings, "is-gateway")
    try:
        sessions = SessionVerifier.from_settings(settings)
        identities = IdentityResolver.from_settings(settings)
        # Inline: the gateway calls submit() from its admission threads only (never from
        # the event loop, which must not block), so the send needs no further hand-off.
        dispatcher = CeleryDispatcher(
            create_app(settings), settings, worker_pool(settings), send_inline=True
        )
    except (SessionConfigError, ValueError) as exc:
        print(f"is-gateway: {exc}", file=sys.stderr)
        return 2
    gateway = Gateway(
        settings, dispatcher, sessions, identities, health=health_check(settings.broker)
    )
    config = uvicorn.Config(
        gateway.app(),
        host=settings.gateway_address,
        port=settings.gateway_port,
        log_config=None,  # our logging (configure_logging), not uvicorn's
        access_log=False,  # the gateway logs one line per request itself
        proxy_headers=False,
        server_header=False,
        limit_concurrency=1024,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    host = settings.gateway_address
    shown = f"[{host}]" if ":" in host else host
    log.info("%shttp://%s:%d/", SERVING, shown, settings.gateway_port)
    try:
        server.run()
    finally:
        dispatcher.close()
        sessions.close()
    return 0 if server.started else 2


if __name__ == "__main__":
    raise SystemExit(main())
