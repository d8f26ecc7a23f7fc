"""Process logging and the ``key=value`` format of the one-line request and task logs.

Every process (bridge, supervisor, workers) logs to stderr, which systemd sends to the
journal; ``IS_LOG_SYSLOG`` adds a syslog handler (``IS_LOG_SYSLOG_ADDRESS``, default
``/dev/log``) tagged with the program name. Request lines are ``key=value`` pairs so
that ``grep rid=`` and a five-line parser both work; :func:`log_value` quotes values that
would break that. Standard library only: the bridge imports this.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys

from istasks.settings import Settings

#: Longest value put in a log line (file names, error texts); longer ones are cut.
MAX_FIELD_CHARS = 200
TOKEN_PREFIX_CHARS = 6
_BARE = re.compile(r"[^\s\"'=\\]+")
#: One word of a line: ``key=value`` (value bare or a JSON string) or anything else.
_TOKEN = re.compile(r'(?:([a-z_]+)=)?("(?:[^"\\]|\\.)*"|\S+)')


def log_value(value: object, max_chars: int = MAX_FIELD_CHARS) -> str:
    """``value`` as one ``key=value`` token: bare when safe, else JSON-quoted; ``-`` for
    None or empty, cut to ``max_chars``. JSON quoting (ASCII-only) escapes control and
    Unicode line-break characters, so a hostile file name cannot forge a log line."""
    if value is None or value == "":
        return "-"
    text = str(value)[:max_chars]
    return text if _BARE.fullmatch(text) else json.dumps(text)


def token_prefix(token: str | None) -> str:
    """A session token (pid) is a bearer credential: logs show only enough to correlate."""
    if not token:
        return "-"
    return token[:TOKEN_PREFIX_CHARS] + ("..." if len(token) > TOKEN_PREFIX_CHARS else "")


def redact_token(text: str, token: str | None) -> str:
    """``text`` with ``token`` cut to its prefix (error texts echo the whole job)."""
    return text.replace(token, token_prefix(token)) if token else text


def parse_fields(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of a line written with :func:`log_value` (tests, tools);
    kept next to it so the two cannot drift. Words that are not pairs are skipped."""
    out: dict[str, str] = {}
    for match in _TOKEN.finditer(line):
        key, value = match[1], match[2]
        if key:
            out[key] = str(json.loads(value)) if value.startswith('"') else value
    return out


def configure_logging(settings: Settings, program: str, *, tag: str = "") -> None:
    """Root logging of ``program``: stderr, plus syslog when ``settings.log_syslog``.

    ``tag`` (a worker's queue) goes in front of every message. Replaces handlers set
    before (forked workers inherit their parent's); a syslog socket that cannot be
    opened is reported on stderr and skipped, never fatal.
    """
    prefix = f"[{tag}] " if tag else ""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [stderr]
    if settings.log_syslog:
        syslog = _syslog_handler(settings.log_syslog_address, program)
        if syslog is not None:
            syslog.setFormatter(logging.Formatter(f"{prefix}%(name)s: %(message)s"))
            handlers.append(syslog)
    logging.basicConfig(level=settings.log_level.upper(), handlers=handlers, force=True)


def _syslog_handler(address: str, program: str) -> logging.Handler | None:
    """A SysLogHandler on the local socket ``address`` (facility daemon), or None when
    nothing listens there: the handler would otherwise print a traceback per record."""
    handler = logging.handlers.SysLogHandler(
        address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
    )
    sock = getattr(handler, "socket", None)  # not in typeshed; the UNIX socket
    if sock is None or sock.fileno() < 0:  # the constructor swallows the connect error
        handler.close()
        print(f"{program}: no syslog at {address}; logging to stderr only", file=sys.stderr)
        return None
    handler.ident = f"{program}: "
    return handler
