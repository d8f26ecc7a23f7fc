"""``isctl flower``: Flower on our broker, with authentication and a bounded memory.

Flower runs in this process through Celery's own command line (``app.start``), on the
app :func:`istasks.app.create_app` builds, so it sees exactly the broker and serializers
the bridge and the workers use. Pitfalls handled here (field notes 3.7):

* Flower's REST API is disabled unless authentication is on (or the environment
  variable ``FLOWER_UNAUTHENTICATED_API`` is set). We refuse to start without
  ``IS_FLOWER_BASIC_AUTH`` unless ``--unauthenticated`` is given, which is for local
  development only: loopback address, read-only mode, API enabled.
* ``max_tasks`` defaults to 100000 task records in memory; we keep 10000.
* The credentials travel in ``FLOWER_BASIC_AUTH`` (environment, readable only by our
  uid and root), never on the command line where ``ps`` shows them to every user.
* Flower executes ``flowerconfig.py`` from the current directory when present; we point
  ``--conf`` at ``/dev/null`` so the working directory cannot inject code.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from istasks.settings import Settings, get_settings
from queues import proctitle

#: Task records Flower keeps in memory (its default of 100000 grows without need).
MAX_TASKS = 10000
#: Per-identity workers are reaped when idle; forget them an hour after they went away.
PURGE_OFFLINE_S = 3600
DEFAULT_ADDRESS = "127.0.0.1"
#: Flower variables whose only source must be our settings: an inherited value would
#: otherwise switch authentication or the open API on or off behind our back.
_OWNED_ENV = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_UNAUTHENTICATED_API")


@dataclass(frozen=True)
class FlowerOptions:
    """Command-line choices of ``isctl flower`` (the rest comes from settings)."""

    port: int
    address: str = DEFAULT_ADDRESS
    unauthenticated: bool = False
    read_only: bool = False
    max_tasks: int = MAX_TASKS


def check_basic_auth(value: str) -> list[str]:
    """Split ``user:password[,user:password...]`` (Flower's format); ValueError if malformed."""
    credentials = [item for item in value.split(",") if item]
    if not credentials:
        raise ValueError("IS_FLOWER_BASIC_AUTH is empty")
    for item in credentials:
        user, sep, password = item.partition(":")
        if not (user and sep and password):
            raise ValueError("IS_FLOWER_BASIC_AUTH must be user:password (comma-separated)")
    return credentials


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and 127.0.0.0/8 or ::1 literals."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(settings: Settings, options: FlowerOptions) -> list[str]:
    """The ``celery flower ...`` arguments; ValueError when the configuration is unsafe."""
    if not settings.broker:
        raise ValueError("no broker: set IS_BROKER_URL or IS_REDIS_URL")
    if settings.flower_basic_auth:
        check_basic_auth(settings.flower_basic_auth)
    elif not options.unauthenticated:
        raise ValueError(
            "refusing to run Flower without authentication: set IS_FLOWER_BASIC_AUTH=user:"
            "password (or pass --unauthenticated for local development)"
        )
    elif not is_loopback(options.address):
        raise ValueError(f"--unauthenticated only on a loopback address, not {options.address}")
    if options.max_tasks < 1:
        raise ValueError("--max-tasks must be at least 1")
    read_only = options.read_only or not settings.flower_basic_auth
    argv = [
        "flower",
        f"--conf={os.devnull}",
        f"--port={options.port}",
        f"--address={options.address}",
        f"--max_tasks={options.max_tasks}",
        f"--purge_offline_workers={PURGE_OFFLINE_S}",
    ]
    if read_only:
        argv.append("--read_only=True")
    return argv


def flower_env(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the Flower authentication variables set from ``settings`` only."""
    env = {k: v for k, v in base.items() if k not in _OWNED_ENV}
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    else:
        # Without credentials Flower's API is off; dev mode turns it on (read-only).
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return env


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """Arguments of ``isctl flower``."""
    parser = argparse.ArgumentParser(prog="isctl flower", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=settings.flower_port)
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help="listen address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--unauthenticated",
        action="store_true",
        help="local development only: no IS_FLOWER_BASIC_AUTH; loopback, read-only, open API",
    )
    parser.add_argument("--read-only", action="store_true", help="disable worker/task control")
    parser.add_argument("--max-tasks", type=int, default=MAX_TASKS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run Flower until SIGTERM/SIGINT; 2 on a configuration error."""
    settings = get_settings()
    args = build_parser(settings).parse_args(argv)
    proctitle.set_title(proctitle.FLOWER)
    options = FlowerOptions(
        port=args.port,
        address=args.address,
        unauthenticated=args.unauthenticated,
        read_only=args.read_only,
        max_tasks=args.max_tasks,
    )
    try:
        flower_args = flower_argv(settings, options)
    except ValueError as exc:
        print(f"isctl flower: {exc}", file=sys.stderr)
        return 2
    env = flower_env(settings, os.environ)
    for name in _OWNED_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)
    from istasks.app import create_app

    # Flower hands sys.argv[0] to tornado's option parser as the program name.
    sys.argv = ["isctl flower"]
    code = create_app(settings).start(flower_args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
