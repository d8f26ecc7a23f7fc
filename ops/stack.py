"""The local service as ``isctl up`` (and the end-to-end tests) run it.

One object starts, in order: Redis (a private ``redis-server`` when ``IS_REDIS_URL`` is
unset), the supervisor (root: workers under each UID:GID; otherwise workers run as the
invoking user), the bridge bound to a local endpoint, and optionally Flower. Children
get their configuration through ``IS_*`` variables derived here, so every process reads
the same settings object the same way. ``stop()`` ends them all.

Settings the user gave win over the dev values filled in here, never silently lost:
``IS_SESSION_PUBLIC_KEY`` is the bridge's key (dev sessions are then signed only if the
run directory holds its private half, see :attr:`Stack.signing_key`),
``IS_PROXY_ENDPOINT`` makes the bridge connect to that is_proxy instead of binding
(:attr:`Stack.endpoint` is then empty: clients go through the proxy's frontend),
``IS_TASK_SECRET``/``IS_TASK_SECRET_FILE``, ``IS_SUPERVISOR_SOCKET``, ``IS_BIND_ENDPOINT``
and ``IS_REDIS_URL`` are used as given. Contradictory ones raise :class:`StackConfigError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from istasks.settings import Settings
from ops.redisserver import RedisProcess, free_port, start_redis

log = logging.getLogger(__name__)

#: The dev session's account when ``isctl up`` runs as root: uid 0 is always refused,
#: and ``nobody`` exists on every Debian/Ubuntu system.
ROOT_DEV_USER = "nobody"
#: What the bridge logs once its socket is open (bridge.server); a bridge connected to an
#: is_proxy cannot be probed with a request, so the stack waits for this line instead.
BRIDGE_SERVING = "bridge serving on "


class StackConfigError(ValueError):
    """Settings the stack cannot honour together; the message says which and why."""


@dataclass
class Component:
    """One child process of the stack."""

    name: str
    process: subprocess.Popen[bytes]
    code: str = ""  # what ``python -c`` runs: :meth:`Stack.restart` starts it again


@dataclass
class Stack:
    """A running local service. Build with :meth:`start`, end with :meth:`stop` (or use
    it as a context manager: ``with Stack.start(...) as stack``)."""

    run_dir: Path
    settings: Settings
    redis_url: str = ""
    endpoint: str = ""
    env: dict[str, str] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)
    redis: RedisProcess | None = None
    flower_port: int | None = None
    #: The is_proxy DEALER the bridge connects to (``IS_PROXY_ENDPOINT``, or the stack's
    #: own is-proxy backend), else "".
    proxy_endpoint: str = ""
    #: Private key whose public half the bridge trusts, when the stack holds it: the dev
    #: key pair, or the user's ``IS_SESSION_PUBLIC_KEY`` if ``run_dir`` has its private
    #: half. None: only the user's login service can sign sessions for this bridge.
    signing_key: Path | None = None
    #: The HTTP gateway's base URL (``http://127.0.0.1:<port>``) when it runs, else "".
    gateway_url: str = ""
    #: Put in front of every component's command: e.g. ``ip netns exec NS unshare --uts
    #: ...`` to run this stack as one host of several (tests/hosts_scenario.py).
    command_prefix: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        run_dir: Path,
        settings: Settings,
        *,
        flower_port: int | None = None,
        supervisor: bool = True,
        via_proxy: bool = False,
        gateway: bool = False,
        command_prefix: tuple[str, ...] = (),
    ) -> Stack:
        """Start every component; on any failure stop what was started and re-raise.

        ``via_proxy`` puts an is-proxy (ROUTER/DEALER) in front, as at LS-CAT: clients
        talk to its frontend and the bridge connects to its backend. ``gateway`` starts
        the HTTP gateway (``is-gateway``) next to the bridge, on ``IS_GATEWAY_PORT`` (0:
        any free port), and waits until its ``/healthz`` answers.
        """
        _check_settings(settings, via_proxy=via_proxy)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stack = cls(
            run_dir=run_dir.resolve(),
            settings=settings,
            flower_port=flower_port,
            command_prefix=command_prefix,
        )
        try:
            stack._start_redis()
            stack._write_secrets()
            if via_proxy:
                stack._start_proxy()
            if supervisor:
                stack._spawn("supervisor", "from queues.supervisor import main; main()")
                stack._wait_for_path(Path(stack.env["IS_SUPERVISOR_SOCKET"]), "supervisor")
            stack._spawn("bridge", "from bridge.main import main; raise SystemExit(main())")
            stack._wait_for_bridge()
            if gateway:
                stack._start_gateway()
            if flower_port:
                # Dev stack: no credentials configured means a loopback, read-only Flower.
                args = "[]" if settings.flower_basic_auth else "['--unauthenticated']"
                stack._spawn(
                    "flower", f"from ops.flower import main; raise SystemExit(main({args}))"
                )
        except BaseException:
            stack.stop()
            raise
        return stack

    def _start_redis(self) -> None:
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
        else:
            self.redis = start_redis(extra_args=self._redis_budget())
            self.redis_url = self.redis.url
            log.info("started redis-server on %s", self.redis_url)

    def _redis_budget(self) -> tuple[str, ...]:
        """Arguments that bound the private redis-server: reduced images of a long
        session (or an ``isctl prefetch``) would otherwise grow it without limit."""
        budget = self.settings.embedded_redis_maxmemory
        return ("--maxmemory", budget, "--maxmemory-policy", "volatile-lru")

    def _write_secrets(self) -> None:
        settings = self.settings
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IS_")},
            # Every setting the user gave (they differ from the defaults), then the dev
            # values for those left unset.
            **_passthrough(settings),
            "IS_REDIS_URL": self.redis_url,
            "IS_IDENTITY_POLICY": settings.identity_policy,
            "IS_LOG_LEVEL": settings.log_level,
        }
        if not (settings.task_secret or settings.task_secret_file):
            self.env["IS_TASK_SECRET_FILE"] = str(self._dev_task_secret())
        self.env["IS_SESSION_PUBLIC_KEY"] = str(self._session_public_key())
        if settings.supervisor_socket == Settings().supervisor_socket:
            # The default is the installed service's path; the dev stack keeps its own.
            self.env["IS_SUPERVISOR_SOCKET"] = str(self.run_dir / "supervisor.sock")
        if settings.proxy_endpoint:
            self.proxy_endpoint = settings.proxy_endpoint
        else:
            self.endpoint = settings.bind_endpoint or f"tcp://127.0.0.1:{free_port()}"
            self.env["IS_BIND_ENDPOINT"] = self.endpoint
        if self.flower_port:
            self.env["IS_FLOWER_PORT"] = str(self.flower_port)
            # Flower is part of this deployment: workers send task events from their
            # first task, not from Flower's next enable-events broadcast (up to 5 s on).
            self.env["IS_TASK_EVENTS"] = "true"

    def _dev_task_secret(self) -> Path:
        secret_file = self.run_dir / "task-secret"
        if not secret_file.exists():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        return secret_file

    def _session_public_key(self) -> Path:
        """The key the bridge verifies sessions with: the user's, else the dev key pair's
        (generated in ``run_dir``); sets :attr:`signing_key`."""
        from ops.devsession import PRIVATE_KEY_NAME, ensure_keypair, matching_private_key

        given = self.settings.session_public_key
        if given is None:
            self.signing_key, public = ensure_keypair(self.run_dir)
            return public
        self.signing_key = matching_private_key(Path(given), self.run_dir / PRIVATE_KEY_NAME)
        return Path(given)

    def _start_proxy(self) -> None:
        backend = f"tcp://127.0.0.1:{free_port()}"
        frontend = self.endpoint
        args = f"['--frontend', {frontend!r}, '--backend', {backend!r}]"
        self._spawn("proxy", f"from bridge.proxy import main; raise SystemExit(main({args}))")
        self.env.pop("IS_BIND_ENDPOINT")
        self.env["IS_PROXY_ENDPOINT"] = self.proxy_endpoint = backend

    def _start_gateway(self) -> None:
        address = self.settings.gateway_address
        port = self.settings.gateway_port or free_port()
        if port == Settings().gateway_port and not _port_free(address, port):
            port = free_port()  # the default is taken (another stack): any port will do
        self.env["IS_GATEWAY_PORT"] = str(port)
        host = f"[{address}]" if ":" in address else address
        if address in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        self.gateway_url = f"http://{host}:{port}"
        code = "from bridge.gateway.main import main; raise SystemExit(main())"
        self._spawn("gateway", code)
        self._wait_for_gateway()

    def _wait_for_gateway(self, timeout_s: float = 30.0) -> None:
        """Until ``/healthz`` answers 200 (uvicorn binds after the app is built)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_if_dead()
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=1.0) as got:
                    if got.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not answer on {self.gateway_url}")
            time.sleep(0.1)

    def _spawn(self, name: str, code: str) -> None:
        self.components.append(Component(name, self._popen(name, code), code))

    def _popen(self, name: str, code: str) -> subprocess.Popen[bytes]:
        log_path = self.run_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-c", code],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        return proc

    def _wait_for_path(self, path: Path, name: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            self._raise_if_dead()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up within {timeout_s:g} s")
            time.sleep(0.05)

    def _wait_for_bridge(self, timeout_s: float = 30.0) -> None:
        from ops.client import request

        if not self.endpoint:  # connected to the user's is_proxy: nothing to send to
            self._wait_for_log("bridge", BRIDGE_SERVING, timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_if_dead()
            with contextlib.suppress(TimeoutError):
                # No pid: the bridge answers with its one-frame error without any worker.
                if request(self.endpoint, {"type": "jpeg"}, timeout_s=0.5):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridge did not answer on {self.endpoint}")

    def _wait_for_log(self, name: str, text: str, timeout_s: float) -> None:
        """Until component ``name`` logs ``text``. Below INFO logging the line never
        comes; then a second alive after the start must do."""
        log_path = self.run_dir / f"{name}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        level = logging.getLevelName(self.settings.log_level.upper())
        quiet = isinstance(level, int) and level > logging.INFO
        started = time.monotonic()
        while True:
            self._raise_if_dead()
            with open(log_path, "rb") as logged:
                logged.seek(start)
                if text.encode() in logged.read():
                    return
            if quiet and time.monotonic() - started > 1.0:
                return
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{name} did not start serving within {timeout_s:g} s")
            time.sleep(0.05)

    def _raise_if_dead(self) -> None:
        for comp in self.components:
            if comp.process.poll() is not None:
                tail = (self.run_dir / f"{comp.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{comp.name} exited ({comp.process.returncode}):\n{tail}")

    def restart(self, name: str, *, grace_s: float = 10.0) -> None:
        """Stop component ``name`` (at once if it already died) and start it again as
        :meth:`start` did, waiting until it serves. ``"redis"`` restarts the private
        redis-server on the same port, empty: it keeps nothing (the fault tests)."""
        if name == "redis":
            if self.redis is None:
                raise ValueError("redis is not this stack's own (IS_REDIS_URL is set)")
            port = self.redis.port
            self.redis.stop()
            self.redis = start_redis(port, extra_args=self._redis_budget())
            return
        index = next((i for i, c in enumerate(self.components) if c.name == name), None)
        if index is None:
            raise ValueError(f"no component {name!r} in this stack")
        comp = self.components[index]
        _end(comp.process, grace_s)
        self.components[index] = Component(name, self._popen(name, comp.code), comp.code)
        if name == "bridge":
            self._wait_for_bridge()
        elif name == "gateway":
            self._wait_for_gateway()
        elif name == "supervisor":
            self._wait_for_supervisor()

    def _wait_for_supervisor(self, timeout_s: float = 30.0) -> None:
        """Until the control socket answers (a killed supervisor leaves its file behind)."""
        from queues.pool import SupervisorClient

        client = SupervisorClient(self.settings, socket_path=self.env["IS_SUPERVISOR_SOCKET"])
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._raise_if_dead()
                with contextlib.suppress(Exception):
                    if client.status().get("ok"):
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"supervisor did not answer within {timeout_s:g} s")
                time.sleep(0.05)
        finally:
            client.close()

    def dead(self) -> list[str]:
        """Names of components that have exited."""
        return [c.name for c in self.components if c.process.poll() is not None]

    def add_session(self, esafs: list[int], user: str | None = None, pid: str | None = None) -> str:
        """Sign and store a dev session for ``user`` (default: a usable local account).

        StackConfigError when the bridge trusts a key the stack cannot sign with.
        """
        import redis

        from ops.devsession import isauth_for, sign_isauth, write_session

        if self.signing_key is None:
            raise StackConfigError(
                f"cannot sign a dev session: the bridge verifies sessions with "
                f"IS_SESSION_PUBLIC_KEY={self.settings.session_public_key}, whose private key "
                f"is not in {self.run_dir}; sessions must come from the login service"
            )
        pid = pid or f"dev-{secrets.token_hex(6)}"
        user = user or dev_user()
        text, sig = sign_isauth(self.signing_key.read_bytes(), isauth_for(pid, user, esafs))
        client = redis.Redis.from_url(self.settings.session_redis_url or self.redis_url)
        try:
            write_session(client, pid, text, sig)
        finally:
            client.close()
        return pid

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every component (newest first), SIGKILL after ``grace_s``."""
        for comp in reversed(self.components):
            if comp.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    comp.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for comp in reversed(self.components):
            _wait_or_kill(comp.process, deadline)
        self.components.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _end(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM one component, SIGKILL its process group after ``grace_s``; reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    _wait_or_kill(process, time.monotonic() + grace_s)


def _wait_or_kill(process: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _check_settings(settings: Settings, *, via_proxy: bool) -> None:
    """StackConfigError for settings that contradict each other or the stack's layout."""
    if settings.proxy_endpoint and settings.bind_endpoint:
        raise StackConfigError(
            f"IS_PROXY_ENDPOINT={settings.proxy_endpoint} and IS_BIND_ENDPOINT="
            f"{settings.bind_endpoint} are both set: the bridge either connects to an "
            "is_proxy or binds its own endpoint; unset one"
        )
    if settings.proxy_endpoint and via_proxy:
        raise StackConfigError(
            f"IS_PROXY_ENDPOINT={settings.proxy_endpoint} is set, but this stack starts "
            "its own is-proxy and connects the bridge to it; unset IS_PROXY_ENDPOINT"
        )


def _passthrough(settings: Settings) -> dict[str, str]:
    """Settings that differ from the defaults, as IS_* variables for the children."""
    import dataclasses

    defaults = Settings()
    out: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name != "extra" and value is not None and value != getattr(defaults, f.name):
            out[f"IS_{f.name.upper()}"] = str(value)
    return out


def _port_free(address: str, port: int) -> bool:
    """True when a TCP listener could bind ``address:port`` now."""
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def dev_user() -> str:
    """The account dev sessions use: the invoking user, or ``nobody`` when root."""
    if os.geteuid() == 0:
        return ROOT_DEV_USER
    return pwd.getpwuid(os.geteuid()).pw_name
