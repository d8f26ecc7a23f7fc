"""Process titles operators recognise in ``ps``, ``top`` and ``systemctl status``.

Without them every worker showed the fork server's command line (``python -m
queues.forkserver --control-fd 7 --parent ... --preload istasks.worker,...``, several
lines of it) and the local stack's services ``python -c "from ... import main"``. Each
process names itself instead: ``is-supervisor``, ``is-forkserver``, ``is-worker
is_<uid>_<gid>@<host>`` (its Celery node name, as Flower and ``isctl status`` show it),
``is-bridge``, ``is-gateway``, ``is-flower``. setproctitle rewrites the command line (what ``ps``,
``top -c`` and systemd show) and the kernel's 15-byte name (``top``, ``ps -o comm``).
"""

from __future__ import annotations

import setproctitle

SUPERVISOR = "is-supervisor"
FORKSERVER = "is-forkserver"
WORKER = "is-worker"
BRIDGE = "is-bridge"
GATEWAY = "is-gateway"
FLOWER = "is-flower"


def worker_title(node: str) -> str:
    """``is-worker is_<uid>_<gid>@<host>``: the worker's Celery node name."""
    return f"{WORKER} {node}"


def set_title(title: str) -> None:
    """Show ``title`` as this process's command line and name."""
    setproctitle.setproctitle(title)
