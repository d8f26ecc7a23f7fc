"""One scannable line per request (bridge) and per task (worker), and syslog as an option.

Lines are ``key=value`` (values JSON-quoted when they could break the line) and carry
what issue 5 names: request id, pid prefix, esaf, identity, type, file, frame, size,
cache outcome, bytes, ms, outcome. Checked at three levels: the format itself, the
worker's task adapter and the bridge loop in process, and the whole stack as ``isctl up``
runs it, with a real syslog socket receiving the bridge's, supervisor's and workers' lines.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bridge.outcome import Reply, exception_outcome, frames_outcome
from istasks.cache import ReducedCache, report_outcome
from istasks.context import WorkerContext
from istasks.errors import AuthError, IdentityError, RequestError, WorkerUnavailable
from istasks.logs import log_value, parse_fields
from istasks.service import build_service
from istasks.settings import Settings
from istasks.tasks import run_task
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from queues.envelope import queue_key, seal
from queues.naming import Identity
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:  # a plugin module: imported by pytest, not here (assert rewriting)
    from tests.bridge_harness import HarnessFactory

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

#: Every field of the bridge's request line (issue 5) plus the worker's time and send status.
REQUEST_FIELDS = {
    "rid", "pid", "esaf", "identity", "type", "fn", "frame", "xsize", "cache", "outcome",
    "bytes", "ms", "worker_ms", "sent",
}  # fmt: skip
TASK_FIELDS = {
    "id", "rid", "queue", "kind", "fn", "frame", "xsize", "cache", "outcome", "bytes", "ms",
}  # fmt: skip
SECRET = b"request-log-test-secret"
IDENT = Identity(4001, 5001)


def _lines(text: str, marker: str) -> list[dict[str, str]]:
    """The parsed lines of ``text`` containing ``marker``."""
    return [parse_fields(line) for line in text.splitlines() if marker in line]


# -- the format -----------------------------------------------------------------------


def test_values_are_bare_when_safe_and_quoted_otherwise() -> None:
    assert log_value("/data/x_master.h5") == "/data/x_master.h5"
    assert log_value(None) == "-" and log_value("") == "-"
    assert log_value("x" * 500) == "x" * 200
    hostile = 'a b" frame=9\nrid=forged \u2028 é'
    line = f"INFO bridge.server: rid=1 fn={log_value(hostile)} frame=3 sent=sent"
    assert len(line.splitlines()) == 1
    assert parse_fields(line) == {"rid": "1", "fn": hostile, "frame": "3", "sent": "sent"}


def test_outcomes_from_exceptions_and_frames() -> None:
    assert exception_outcome(RequestError("x")) == "bad_request"
    assert exception_outcome(IdentityError("x")) == "refused"
    assert exception_outcome(AuthError("x")) == "refused"
    assert exception_outcome(WorkerUnavailable("x")) == "unavailable"
    assert exception_outcome(KeyError("x")) == "error"
    assert frames_outcome("jpeg", [b"", b"{}", b"{}", b"\xff\xd8"]) == "ok"
    assert frames_outcome("jpeg", [b"", b"{}", b"", b"\xff\xd8"]) == "blank"
    assert frames_outcome("spots", [b"", b"{}", b""]) == "ok"
    assert frames_outcome("jpeg", [b"isJpeg.c isJpeg: failed"]) == "error"
    assert frames_outcome("jpeg", Reply([b"bridge: late"], outcome="timeout")) == "timeout"


def test_reply_keeps_only_well_formed_worker_reports() -> None:
    reply = Reply([b"", b"x"], cache="lru", worker_ms=12)
    assert reply == [b"", b"x"] and reply.cache == "lru" and reply.worker_ms == 12.0
    odd = Reply([b""], cache="x" * 300, worker_ms=float("nan"))
    assert odd.cache == "none" and odd.worker_ms is None
    assert Reply([b""], cache=["lru"], worker_ms=True).cache == "none"
    assert Reply([b""], worker_ms=-1).worker_ms is None
    assert Reply([b""], cache="jpeg").cache == "jpeg"  # served from the worker's JPEG LRU
    assert Reply([b""], validator="0123456789abcdef" * 2 + "01234567").validator is not None
    for bad in ("ABC", "0" * 39, "0" * 41, "g" * 40, b"0" * 40, 7, '"' + "0" * 38 + '"'):
        assert Reply([b""], validator=bad).validator is None, bad  # never a header as sent


# -- the cache reports how it served --------------------------------------------------


class _Blob:
    """The smallest cacheable value."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_bytes(self) -> bytes:
        return self.data


def _cache(redis_url: str) -> ReducedCache[_Blob]:
    return ReducedCache(redis_url, 5001, _Blob, ttl_s=60, lru_max_bytes=1 << 20)


def _outcome_of(lookup: Callable[[], object]) -> str:
    with report_outcome() as report:
        lookup()
    return report.outcome


def test_cache_reports_computed_lru_redis(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "frame.img"
    path.write_bytes(b"pixels")
    first, other = _cache(redis_url), _cache(redis_url)  # two workers of one ESAF
    compute = lambda version: _Blob(b"reduced")  # noqa: E731
    assert _outcome_of(lambda: first.get(str(path), "v1", compute)) == "computed"
    assert _outcome_of(lambda: first.get(str(path), "v1", compute)) == "lru"
    assert _outcome_of(lambda: other.get(str(path), "v1", compute)) == "redis"
    assert _outcome_of(lambda: None) == "none"
    assert first.get(str(path), "v1", compute).data == b"reduced"  # no block: no report
    first.close()
    other.close()


def test_reports_of_concurrent_requests_never_mix(redis_url: str, tmp_path: Path) -> None:
    """Each task thread sees only its own lookups, even while another one computes."""
    path = tmp_path / "frame.img"
    path.write_bytes(b"pixels")
    cache = _cache(redis_url)
    cache.get(str(path), "warm", lambda version: _Blob(b"warm"))
    entered, gate = threading.Event(), threading.Event()

    def slow(version: object) -> _Blob:
        entered.set()
        gate.wait(10)
        return _Blob(b"reduced")

    outcomes: list[str] = []
    leader = threading.Thread(
        target=lambda: outcomes.append(_outcome_of(lambda: cache.get(str(path), "v", slow)))
    )
    leader.start()
    assert entered.wait(10)
    # Meanwhile, in this thread: a different request served from the LRU.
    assert _outcome_of(lambda: cache.get(str(path), "warm", slow)) == "lru"
    gate.set()
    leader.join(10)
    assert outcomes == ["computed"]
    cache.close()


# -- the worker's task line -----------------------------------------------------------


@pytest.fixture
def worker_context(redis_url: str) -> Iterator[WorkerContext]:
    settings = Settings(cache_url=redis_url)
    service = build_service(settings, IDENT, threads=2)
    yield WorkerContext(IDENT.queue, queue_key(SECRET, IDENT.queue), settings, service)
    service.close()


def _run(context: WorkerContext, kind: str, job: dict[str, Any], rid: str) -> dict[str, Any]:
    handler = getattr(context.service, kind)
    token = seal(SECRET, context.queue, {"job": job, "rid": rid})
    return run_task(kind, handler, context, token, task_id=f"task-{rid}")


def test_task_result_and_line_report_cache_and_outcome(
    worker_context: WorkerContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    master = write_eiger(tmp_path, "t", nimages=2, frames_per_file=1, shape=(256, 256))
    job = {"type": "jpeg", "fn": str(master), "frame": 2, "xsize": 128}
    with caplog.at_level(logging.INFO, logger="istasks.tasks"):
        first = _run(worker_context, "jpeg", job, "r1")
        again = _run(worker_context, "jpeg", {**job, "contrast": 40}, "r2")
        blank = _run(worker_context, "jpeg", {**job, "fn": str(tmp_path / "no.h5")}, "r3")
        failed = _run(worker_context, "spots", {"type": "spots", "pid": "secret-pid"}, "r4")
        repeat = _run(worker_context, "jpeg", job, "r5")
    assert (first["cache"], again["cache"], blank["cache"], failed["cache"]) == (
        "computed", "lru", "none", "none",
    )  # fmt: skip
    assert all(isinstance(r["elapsed_ms"], float) for r in (first, again, blank, failed))
    # An image names its bytes (the gateway's ETag); a blank or an error names nothing.
    assert len({first["validator"], again["validator"]}) == 2
    assert (repeat["cache"], repeat["validator"]) == ("jpeg", first["validator"])
    assert "validator" not in blank and "validator" not in failed
    lines = {f["rid"]: f for f in _lines(caplog.text, "task id=")}
    assert set(lines) == {"r1", "r2", "r3", "r4", "r5"}
    assert all(set(f) >= TASK_FIELDS for f in lines.values())
    r1 = lines["r1"]
    assert (r1["id"], r1["queue"], r1["kind"], r1["fn"]) == (
        "task-r1",
        "4001:5001",
        "jpeg",
        str(master),
    )
    assert (r1["frame"], r1["xsize"], r1["cache"], r1["outcome"]) == ("2", "128", "computed", "ok")
    assert int(r1["bytes"]) == sum(map(len, first["frames"])) and float(r1["ms"]) > 0
    assert (lines["r2"]["cache"], lines["r3"]["outcome"]) == ("lru", "blank")
    assert lines["r4"]["outcome"] == "error" and "secret-pid" in failed["error"]
    assert lines["r4"]["error"] == failed["error"].replace("secret-pid", "secret...")


def test_refused_envelope_result_stays_bare(worker_context: WorkerContext) -> None:
    forged = seal(b"not the secret", worker_context.queue, {"job": {}, "rid": "x"})
    result = run_task("spots", worker_context.service.spots, worker_context, forged)
    assert result == {"error": "istasks envelope: task envelope signature invalid"}


# -- the bridge's request line (in process) -------------------------------------------


def test_bridge_logs_one_line_per_request_with_every_field(
    bridges: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = bridges.start(view_timeout_s=0.3, worker_start_timeout_s=0.0, margin_s=0.2)
    pid = bridge.login("log-pid-123456", esafs=[77])
    base = {"type": "jpeg", "pid": pid, "esaf": 77, "frame": 4, "xsize": 256}
    with caplog.at_level(logging.INFO, logger="bridge.server"):
        assert_success_reply(bridge.request({**base, "fn": "/d/a b.h5", "test_cache": "lru"}), 4)
        assert_error_reply(bridge.request({**base, "test_script": "error"}), "scripted error")
        assert_error_reply(bridge.request({**base, "test_script": "never"}), "no reply within")
        assert_error_reply(bridge.request({**base, "pid": "nobody"}), "not authorized")
        assert_error_reply(bridge.request({"type": "jpeg"}), "request does not contain pid")
        assert_error_reply(bridge.request({**base, "type": "dance"}), "Unknown job type")
        bridge.server.stop(wait_s=10.0)
    lines = _lines(caplog.text, " rid=")
    assert len(lines) == 6 and len({f["rid"] for f in lines}) == 6
    assert all(set(f) >= REQUEST_FIELDS for f in lines)
    ok, error, timeout, refused, bad, unknown = lines
    identity = f"{bridge.user.uid}:{bridge.user.gid}"
    assert (ok["pid"], ok["esaf"], ok["identity"], ok["type"]) == (
        "log-pi...",
        "77",
        identity,
        "jpeg",
    )
    assert (ok["fn"], ok["frame"], ok["xsize"]) == ("/d/a b.h5", "4", "256")
    assert (ok["cache"], ok["outcome"], ok["worker_ms"], ok["sent"]) == ("lru", "ok", "1.5", "sent")
    assert "error" not in ok and float(ok["ms"]) > 0 and int(ok["bytes"]) > 0
    assert (error["outcome"], error["error"], error["cache"]) == ("error", "scripted error", "none")
    assert timeout["outcome"] == "timeout" and "no reply within" in timeout["error"]
    assert (refused["outcome"], refused["pid"], refused["identity"]) == ("refused", "nobody", "-")
    assert (bad["outcome"], bad["pid"], bad["esaf"], bad["fn"]) == ("bad_request", "-", "0", "-")
    assert (unknown["outcome"], unknown["type"]) == ("bad_request", "dance")
    assert '"pid":"log-pi..."' in unknown["error"] and pid not in caplog.text  # echoed job


# -- syslog ---------------------------------------------------------------------------


class SyslogSink:
    """A local syslog socket (what /dev/log is) collecting the datagrams it receives."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "log.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self.path.chmod(0o666)  # workers run as another account when root
        self._sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self._sock.recv(65536).decode("utf-8", "replace"))
            except TimeoutError:
                continue

    def text(self) -> str:
        return "\n".join(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def _log_once(settings_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import logging\n"
        "from istasks.logs import configure_logging\n"
        "from istasks.settings import get_settings\n"
        "configure_logging(get_settings(), 'is-test', tag='1:2')\n"
        "logging.getLogger('probe').info('rid=%s outcome=ok', 'r-1')\n"
    )
    env = {"PATH": "/usr/bin:/bin", **settings_env}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_syslog_is_an_option(tmp_path: Path) -> None:
    sink = SyslogSink(tmp_path)
    try:
        done = _log_once({"IS_LOG_SYSLOG": "1", "IS_LOG_SYSLOG_ADDRESS": str(sink.path)})
        _wait_for(lambda: sink.messages)
    finally:
        sink.close()
    assert "[1:2] probe: rid=r-1 outcome=ok" in done.stderr  # stderr (journald) as always
    (message,) = sink.messages
    # <daemon.info> = 3 * 8 + 6, then the program's ident.
    assert message.startswith("<30>is-test: [1:2] probe: rid=r-1 outcome=ok")


def test_syslog_missing_socket_is_not_fatal(tmp_path: Path) -> None:
    done = _log_once({"IS_LOG_SYSLOG": "1", "IS_LOG_SYSLOG_ADDRESS": str(tmp_path / "none")})
    assert "is-test: no syslog at" in done.stderr
    assert "rid=r-1 outcome=ok" in done.stderr and "Traceback" not in done.stderr


def _wait_for(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# -- the whole stack ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """World-traversable data and syslog socket (root workers run as another account)."""
    path = Path(tempfile.mkdtemp(prefix="is-log-"))
    path.chmod(0o755)
    write_eiger(path, "x", nimages=2, frames_per_file=1, shape=(512, 514), seed=3)
    for item in path.iterdir():
        item.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def syslog(shared_dir: Path) -> Iterator[SyslogSink]:
    sink = SyslogSink(shared_dir)
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def stack(syslog: SyslogSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(log_syslog=True, log_syslog_address=str(syslog.path), worker_idle_s=300)
    with Stack.start(tmp_path_factory.mktemp("run"), settings) as running:
        yield running


@pytest.mark.slow
def test_stack_logs_requests_and_tasks(stack: Stack, shared_dir: Path, syslog: SyslogSink) -> None:
    pid = stack.add_session([0], user=dev_user())
    view = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(shared_dir / "x_master.h5"),
            "frame": 2, "xsize": 200}  # fmt: skip
    assert_success_reply(request(stack.endpoint, view, timeout_s=30), 4)
    assert_success_reply(request(stack.endpoint, {**view, "contrast": 30}, timeout_s=30), 4)
    blank = {**view, "fn": str(shared_dir / "gone_master.h5")}
    assert_success_reply(request(stack.endpoint, blank, timeout_s=30), 4)
    spots = {"type": "spots", "pid": pid, "esaf": 0}
    assert_error_reply(request(stack.endpoint, spots, timeout_s=30), "Missing filename")
    stack.stop()  # flushes every log
    bridge_log = (stack.run_dir / "bridge.log").read_text()
    supervisor_log = (stack.run_dir / "supervisor.log").read_text()

    ours = [f for f in _lines(bridge_log, " rid=") if f.get("pid") == pid[:6] + "..."]
    assert len(ours) == 4 and all(set(f) >= REQUEST_FIELDS for f in ours)
    first, failed = ours[0], ours[3]
    assert [f["outcome"] for f in ours] == ["ok", "ok", "blank", "error"]
    assert [f["cache"] for f in ours] == ["computed", "lru", "none", "none"]
    assert first["identity"] == _dev_identity() and first["fn"] == view["fn"]
    assert (first["frame"], first["xsize"], first["esaf"]) == ("2", "200", "0")
    assert failed["type"] == "spots" and "Missing filename" in failed["error"]
    assert all(float(f["worker_ms"]) <= float(f["ms"]) for f in ours)

    # The worker's task lines (its stderr goes to the supervisor's log), joined by rid.
    tasks = {f["rid"]: f for f in _lines(supervisor_log, "task id=")}
    for line in ours:
        task = tasks[line["rid"]]
        assert set(task) >= TASK_FIELDS and task["queue"] == line["identity"]
        for name in ("fn", "frame", "xsize", "cache", "outcome", "bytes"):
            assert task[name] == line[name]  # bytes: the leading empty frame adds nothing

    # Syslog got the same from every program.
    text = syslog.text()
    assert f"is-bridge: bridge.server: rid={first['rid']} " in text
    assert f"is-worker: [{_dev_identity()}] istasks.tasks: task id=" in text
    assert "is-supervisor: " in text
    # The session token is a bearer credential: no log has it whole, though the spots
    # error text echoes the job (pid included) to the client.
    assert all(pid not in log for log in (bridge_log, supervisor_log, text))


def _dev_identity() -> str:
    import pwd

    account = pwd.getpwnam(dev_user())
    return f"{account.pw_uid}:{account.pw_gid}"
