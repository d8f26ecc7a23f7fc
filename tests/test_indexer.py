"""The index runner with a stand-in ``rapd.index`` written by the tests (spec 6.2, bug 9)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from istasks.errors import IndexerError, IsError
from istasks.indexer import IndexRequest, detector_option, image_arguments, run_index
from istasks.keys import progress_channel
from istasks.service import build_service
from istasks.settings import Settings
from ops.redisserver import free_port
from ops.testdata.eiger import write_eiger
from queues.naming import Identity

# Stand-in indexer: reports what it was given on the json fd, talks on the progress fd
# and on stderr, like rapd.index does.
STAND_IN = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
opts = {{}}
rest = []
i = 0
while i < len(args):
    if args[i] in ("--json-fd", "--progress-fd", "--detector", "--hdf5_image_range"):
        opts[args[i]] = args[i + 1]; i += 2
    elif args[i] == "--json":
        opts["--json"] = True; i += 1
    else:
        rest.append(args[i]); i += 1
prog = os.fdopen(int(opts["--progress-fd"]), "w")
for text in ("starting", 'quoted "step" 2', "done\\tstage"):
    prog.write(text + "\\n"); prog.flush(); time.sleep(0.05)
prog.write("partial"); prog.flush()
sys.stderr.write("warning: stand-in\\n")
print("noise on stdout")
links = {{n: os.readlink(n) if os.path.islink(n) else None for n in rest}}
result = {{"opts": opts, "images": rest, "cwd": os.getcwd(), "links": links,
          "env_has_secret": "IS_TASK_SECRET" in os.environ}}
with os.fdopen(int(opts["--json-fd"]), "w") as out:
    json.dump(result, out)
"""

HANGING = """#!{python}
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["PIDFILE"], "w") as f:
    f.write(f"{{os.getpid()}} {{child.pid}} {{os.getcwd()}}")
time.sleep(600)
"""


IDENT = Identity(4001, 5001)


def write_script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text(body.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    data = tmp_path / "data"
    master = write_eiger(data, "x_1", nimages=2, shape=(64, 64), dcu="1.8")
    other = data / "x_2_0001.mccd"
    other.write_bytes(b"II*\0" + bytes(4092))
    return str(master), str(other)


class Channel:
    """Progress for one target channel as the bridge receives it, by a real subscriber:
    on the worker identity's own channel, each message wrapped with the target's name."""

    def __init__(self, url: str, name: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(progress_channel(IDENT.uid, IDENT.gid))
        self.pubsub.get_message(timeout=1.0)
        self.name = name
        self.messages: list[dict[str, object]] = []

    def collect(self, until_done_s: float = 5.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + until_done_s
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            wrapped = json.loads(message["data"])
            assert set(wrapped) == {"channel", "message"} and wrapped["channel"] == self.name
            self.messages.append(json.loads(wrapped["message"]))
            if self.messages[-1].get("done") is True:
                break
        return self.messages

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def channel(redis_url: str) -> Iterator[Channel]:
    ch = Channel(redis_url, "index-progress-7")
    yield ch
    ch.close()


def test_index_reply_progress_and_cleanup(
    redis_url: str,
    tmp_path: Path,
    images: tuple[str, str],
    channel: Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IS_TASK_SECRET", "must-not-leak")
    script = write_script(tmp_path, "rapd.index", STAND_IN)
    tmp_dir = tmp_path / "indextmp"
    tmp_dir.mkdir()
    settings = Settings(
        redis_url=redis_url, indexer_command=script, index_tmp_dir=str(tmp_dir), task_secret="x"
    )
    service = build_service(settings, IDENT)
    job = {
        "type": "index",
        "fn1": images[0],
        "fn2": images[1],
        "tag": "t-9",
        "progressPublisher": "index-progress-7",
        "progressAddress": "203.0.113.9",  # ignored: never connect to client-named hosts
        "progressPort": 6379,
    }
    try:
        frames = service.index(job)
    finally:
        service.close()
    assert frames[0] == json.dumps(job, separators=(",", ":"), sort_keys=True).encode()
    result = json.loads(frames[1])
    assert result["stderr"] == "warning: stand-in\n"
    assert result["opts"]["--json"] is True
    assert result["opts"]["--detector"] == "lscat_dectris_eiger2_16m"
    assert result["images"] == ["x_1_master.h5", "x_2_0001.mccd"]
    assert result["links"] == {"x_1_master.h5": images[0], "x_2_0001.mccd": images[1]}
    assert result["env_has_secret"] is False
    assert Path(result["cwd"]).parent == tmp_dir
    assert not Path(result["cwd"]).exists()
    assert list(tmp_dir.iterdir()) == []
    messages = channel.collect()
    assert messages == [
        {"progress": "starting", "done": False, "tag": "t-9"},
        {"progress": 'quoted "step" 2', "done": False, "tag": "t-9"},
        {"progress": "donestage", "done": False, "tag": "t-9"},
        {"progress": "partial", "done": False, "tag": "t-9"},
        {"done": True, "tag": "t-9"},
    ]


def test_index_without_progress_channel_publishes_nothing(
    redis_url: str, tmp_path: Path, images: tuple[str, str], channel: Channel
) -> None:
    script = write_script(tmp_path, "rapd.index", STAND_IN)
    settings = Settings(redis_url=redis_url, indexer_command=script)
    service = build_service(settings, IDENT)
    try:
        frames = service.index({"type": "index", "fn1": images[1], "frame1": 3, "frame2": 9})
    finally:
        service.close()
    result = json.loads(frames[1])
    assert "--detector" not in result["opts"]  # not an HDF5 file
    assert result["opts"]["--hdf5_image_range"] == "3,9"
    assert channel.collect(until_done_s=0.5) == []


def test_progress_failure_is_logged_once_and_not_fatal(
    tmp_path: Path, images: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    script = write_script(tmp_path, "rapd.index", STAND_IN)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(cache_url=dead, result_url=dead, indexer_command=script)
    service = build_service(settings, IDENT)
    try:
        frames = service.index({"fn1": images[1], "progressPublisher": "ch", "tag": "t"})
    finally:
        service.close()
    assert json.loads(frames[1])["images"] == ["x_2_0001.mccd"]
    assert caplog.text.count("not published") == 1


def test_missing_fn1_is_a_request_error(redis_url: str) -> None:
    service = build_service(Settings(redis_url=redis_url), IDENT)
    try:
        with pytest.raises(IsError) as info:
            service.index({"type": "index", "tag": "x"})
    finally:
        service.close()
    assert (
        info.value.wire_text()
        == 'isIndex.c isIndex: Missing fn1 for job {"tag":"x","type":"index"}'
    )


def test_timeout_kills_process_group_and_removes_temp_dir(
    tmp_path: Path, images: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "pids"
    monkeypatch.setenv("PIDFILE", str(pidfile))
    script = write_script(tmp_path, "hang", HANGING)
    started = time.monotonic()
    with pytest.raises(IndexerError, match="timed out after 1 s"):
        run_index(IndexRequest(fn1=images[1]), command=script, timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 4.0
    child_pid, grandchild_pid, cwd = pidfile.read_text().split()
    assert not Path(cwd).exists()
    for pid in (int(child_pid), int(grandchild_pid)):
        assert not _alive(pid), f"pid {pid} survived"
    with pytest.raises(ChildProcessError):
        os.waitpid(int(child_pid), os.WNOHANG)  # already reaped: no zombie


def test_command_that_cannot_run_is_an_indexer_error(
    tmp_path: Path, images: tuple[str, str]
) -> None:
    with pytest.raises(IndexerError, match="cannot run indexer"):
        run_index(IndexRequest(fn1=images[1]), command=str(tmp_path / "nope"), timeout_s=5.0)
    with pytest.raises(IndexerError, match="no indexer command"):
        run_index(IndexRequest(fn1=images[1]), command="  ", timeout_s=5.0)


def test_output_that_is_not_json_gives_no_result(tmp_path: Path, images: tuple[str, str]) -> None:
    script = write_script(
        tmp_path,
        "bad",
        "#!{python}\nimport os, sys\n"
        "os.write(int(sys.argv[sys.argv.index('--json-fd') + 1]), b'{{oops')\n",
    )
    assert run_index(IndexRequest(fn1=images[1]), command=script, timeout_s=5.0) is None


def test_arguments_and_detector_option(tmp_path: Path) -> None:
    one = IndexRequest(fn1="/d/a.h5")
    assert image_arguments(one, ["a.h5"]) == ["a.h5"]
    ranged = IndexRequest(fn1="/d/a.h5", frame1=1, frame2=10)
    assert image_arguments(ranged, ["a.h5"]) == ["--hdf5_image_range", "1,10", "a.h5"]
    assert image_arguments(ranged, ["a.h5", "b.h5"]) == ["a.h5", "b.h5"]
    old = write_eiger(tmp_path / "old", "e9m", nimages=1, shape=(32, 32), dcu="1.6")
    new = write_eiger(tmp_path / "new", "e16m", nimages=1, shape=(32, 32), dcu="1.8")
    assert detector_option(str(old)) == []
    assert detector_option(str(new)) == ["--detector", "lscat_dectris_eiger2_16m"]
    assert detector_option(str(tmp_path / "missing.h5")) == []


def test_concurrent_index_jobs_leave_a_thread_for_views(
    redis_url: str, tmp_path: Path, images: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIDFILE", str(tmp_path / "pids"))
    script = write_script(tmp_path, "hang", HANGING)
    settings = Settings(
        redis_url=redis_url, indexer_command=script, worker_concurrency=2, index_timeout_s=2.0
    )
    service = build_service(settings, IDENT)
    errors: list[str] = []

    def first() -> None:
        try:
            service.index({"fn1": images[1]})
        except IndexerError as exc:
            errors.append(str(exc))

    runner = threading.Thread(target=first)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not (tmp_path / "pids").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(IndexerError, match="too many index jobs"):
            service.index({"fn1": images[1]})
    finally:
        runner.join()
        service.close()
    assert errors == ["indexer timed out after 2 s"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
