"""Admin prefetch (``isctl prefetch``) against the service started as ``isctl up`` starts it.

Real redis-server, supervisor, per-identity worker and bridge (ops.stack); datasets
written with bitshuffle-LZ4 like the detector writes them. Whether prefetch worked is
read from the cache's own counters: a view of a prefetched frame computes nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import itsdangerous
import pytest
import redis

from istasks import keys, prefetch_task
from istasks.context import WorkerContext
from istasks.errors import IdentityError
from istasks.prefetch_task import PrefetchError
from istasks.service import build_service
from istasks.settings import Settings
from ops import cli, prefetch, prefetch_watch
from ops.client import request
from ops.prefetch import FrameRange, FrameTask, Options, Sender
from ops.prefetch_progress import ProgressBar, Tally
from ops.prefetch_watch import Watcher
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from queues.envelope import queue_key, seal
from queues.naming import Identity
from tests.wire_assert import assert_success_reply

if TYPE_CHECKING:
    from tests.accounts import Accounts

pytest_plugins = ("tests.accounts",)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1062, 1028)  # an Eiger 1M frame: quick to write, not trivial to reduce


def _world_readable(directory: Path) -> None:
    """As root the worker runs as an unprivileged account: it must read the data."""
    directory.chmod(0o755)
    for item in directory.iterdir():
        item.chmod(0o755 if item.is_dir() else 0o644)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="is-prefetch-"))
    write_eiger(path, "six", nimages=6, frames_per_file=3, shape=SHAPE, seed=11)
    write_eiger(path / "backlog", "bl", nimages=40, frames_per_file=20, shape=SHAPE, seed=12)
    _world_readable(path / "backlog")
    _world_readable(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack.start(tmp_path_factory.mktemp("run"), Settings(worker_idle_s=300)) as running:
        yield running


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    """What ``isctl`` run next to this stack reads from its environment."""
    return Settings.from_env(stack.env)


@pytest.fixture(scope="module")
def identity(settings: Settings) -> Identity:
    """The dev session's identity: the bridge's requests run there too."""
    return prefetch.resolve_identity(settings, 0, dev_user())


@pytest.fixture(scope="module")
def pid(stack: Stack) -> str:
    return stack.add_session([0], user=dev_user())


@pytest.fixture
def sender(settings: Settings, identity: Identity) -> Iterator[Sender]:
    with Sender(settings, identity) as made:
        yield made


def _counter(stack: Stack, gid: int, name: str) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return int(client.get(keys.stats_key(gid, name)) or 0)
    finally:
        client.close()


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _view(stack: Stack, pid: str, fn: Path, frame: int, xsize: int) -> list[bytes]:
    job = {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(fn), "frame": frame, "xsize": xsize}
    return assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)


# -- against the stack ----------------------------------------------------------------------


def test_prefetch_fills_the_cache_views_compute_nothing(
    stack: Stack, pid: str, identity: Identity, sender: Sender, data_dir: Path
) -> None:
    master = data_dir / "six_master.h5"
    before = _counter(stack, identity.gid, "computed")
    stream = io.StringIO()
    tally = prefetch.prefetch(sender, prefetch.plan(master, None), Options(), ProgressBar(stream))
    assert (tally.total, tally.done, tally.errors) == (6, 6, [])
    assert _counter(stack, identity.gid, "computed") == before + 12  # 6 frames x 2 sizes
    assert "[##############################] 6/6 frames, 0 errors" in stream.getvalue()
    assert stream.getvalue().splitlines()[-1].startswith("prefetch: 6/6 frames done, 0 errors")
    for frame in range(1, 7):
        for xsize in (384, 1024):
            _view(stack, pid, master, frame, xsize)
    assert _counter(stack, identity.gid, "computed") == before + 12  # all 12 views cached


def test_frame_range(stack: Stack, identity: Identity, sender: Sender, data_dir: Path) -> None:
    master = data_dir / "backlog" / "bl_master.h5"
    work = prefetch.plan(master, FrameRange(38, 40))
    assert [t.frame for t in work.tasks] == [38, 39, 40]
    before = _counter(stack, identity.gid, "computed")
    tally = prefetch.prefetch(sender, work, Options(sizes=(200,)))
    assert tally.ok and tally.done == 3
    assert _counter(stack, identity.gid, "computed") == before + 3


def test_missing_and_broken_files_are_errors_not_crashes(
    identity: Identity, sender: Sender, data_dir: Path, tmp_path: Path
) -> None:
    mixed = Path(tempfile.mkdtemp(prefix="is-prefetch-mixed-"))
    try:
        write_eiger(mixed, "ok", nimages=2, frames_per_file=2, shape=(256, 256), seed=3)
        (mixed / "broken_master.h5").write_bytes(b"not an hdf5 file at all")
        _world_readable(mixed)
        work = prefetch.plan(mixed, None)
        assert len(work.tasks) == 2 and len(work.errors) == 1
        # A file that vanishes after planning fails in the worker: one error per frame.
        (mixed / "ok_data_000001.h5").unlink()
        tally = prefetch.prefetch(sender, work, Options(sizes=(128,)))
    finally:
        shutil.rmtree(mixed, ignore_errors=True)
    assert (tally.total, tally.done, len(tally.errors)) == (2, 0, 3)
    assert "broken_master.h5" in tally.errors[0]
    assert all("ok_master.h5 frame" in text for text in tally.errors[1:])
    gone = prefetch.plan(tmp_path / "nope_master.h5", None)
    assert not gone.tasks and "nope_master.h5" in gone.errors[0].describe()
    out, err = io.StringIO(), io.StringIO()
    settings = Settings(task_secret="x", supervisor_socket=str(tmp_path / "none.sock"))
    target = tmp_path / "nope_master.h5"
    assert prefetch.command(settings, identity, Options(), target, out=out, err=err) == 1
    assert "0/0 frames done, 1 error" in err.getvalue()


def _isctl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``isctl`` as an admin runs it next to the service (same IS_* environment)."""
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_isctl_waits_and_reports(stack: Stack, data_dir: Path) -> None:
    master = data_dir / "backlog" / "bl_master.h5"
    done = _isctl(stack, "prefetch", str(master), "--esaf", "0", "--user", dev_user(),
                  "--sizes", "320", "--frames", "11-12")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-2] == "[##############################] 2/2 frames, 0 errors"
    assert lines[-1].startswith("prefetch: 2/2 frames done, 0 errors in ")


def test_no_wait_returns_and_the_work_completes(
    stack: Stack, identity: Identity, data_dir: Path
) -> None:
    master = data_dir / "backlog" / "bl_master.h5"
    before = _counter(stack, identity.gid, "computed")
    done = _isctl(stack, "prefetch", str(master), "--esaf", "0", "--user", dev_user(),
                  "--sizes", "256", "--frames", "1-10", "--no-wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"queued 10 prefetch task(s) on {identity.prefetch_queue}"
    _wait_for(lambda: _counter(stack, identity.gid, "computed") == before + 10)


def test_interactive_view_answered_before_the_backlog_drains(
    stack: Stack, pid: str, identity: Identity, sender: Sender, data_dir: Path
) -> None:
    """40 frames x 3 sizes queued at once; a view sent after them is not served last."""
    backlog = prefetch.plan(data_dir / "backlog" / "bl_master.h5", None)
    before = _counter(stack, identity.gid, "computed")
    assert prefetch.enqueue(sender, backlog, (300, 700, 1100)) == 40
    _view(stack, pid, data_dir / "six_master.h5", 1, 333)  # never cached: computed once
    at_reply = _counter(stack, identity.gid, "computed") - before
    assert at_reply < 40 * 3 + 1, "the view waited for the whole prefetch backlog"
    _wait_for(lambda: _counter(stack, identity.gid, "computed") == before + 40 * 3 + 1)


def test_watch_prefetches_a_dataset_as_it_is_written(
    stack: Stack, identity: Identity, sender: Sender
) -> None:
    watched = Path(tempfile.mkdtemp(prefix="is-prefetch-watch-"))
    aside = Path(tempfile.mkdtemp(prefix="is-prefetch-aside-"))
    try:
        write_eiger(watched, "old", nimages=1, frames_per_file=1, shape=(256, 256), seed=4)
        write_eiger(aside, "new", nimages=4, frames_per_file=2, shape=(256, 256), seed=5)
        _world_readable(watched)
        _world_readable(aside)
        watcher = Watcher(sender, watched, Options(sizes=(96,)), give_up_s=3.0)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(0.1, stop), daemon=True)
        before = _counter(stack, identity.gid, "computed")
        thread.start()
        assert watcher.started.wait(10)  # what was there before is listed (and left alone)
        # The detector writes the master and the first data file; the second comes later.
        for name in ("new_data_000001.h5", "new_master.h5"):
            os.replace(aside / name, watched / name)
        _wait_for(lambda: watcher.tally.done == 2)
        assert watcher.tally.total == 4 and not watcher.tally.errors
        os.replace(aside / "new_data_000002.h5", watched / "new_data_000002.h5")
        (watched / "junk_master.h5").write_bytes(b"never a dataset")
        _wait_for(lambda: watcher.tally.done == 4 and len(watcher.tally.errors) == 1)
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert watcher.tracked == 3  # old, new, junk: finished, names kept while present
        for item in watched.iterdir():
            item.unlink()
        watcher.poll()
        assert watcher.tracked == 0  # memory follows the directory
    finally:
        shutil.rmtree(watched, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    assert "junk_master.h5: gave up" in watcher.tally.errors[0]
    # Only the 4 new frames: the dataset present at start was left alone.
    assert _counter(stack, identity.gid, "computed") == before + 4


class _TimedSender(Sender):
    """A real Sender that notes when each frame was sent (wall clock, as the writer's)."""

    def __init__(self, settings: Settings, identity: Identity) -> None:
        super().__init__(settings, identity)
        self.sent: list[tuple[float, str, int]] = []

    def send(self, task: FrameTask, sizes: tuple[int, ...], *, keep_result: bool = True) -> Any:
        self.sent.append((time.time(), task.path, task.frame))
        return super().send(task, sizes, keep_result=keep_result)


def _world_readable_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def test_watch_prefetches_a_nested_dataset_while_it_is_written(
    stack: Stack, settings: Settings, identity: Identity
) -> None:
    """ESAF/user/sample nesting; a detector process writes master, then data files frame
    by frame; each frame is prefetched once its data file is complete, while the rest is
    still being written. What was there before, and what a symlink leads to outside the
    tree, is never prefetched."""
    watched = Path(tempfile.mkdtemp(prefix="is-prefetch-tree-"))
    outside = Path(tempfile.mkdtemp(prefix="is-prefetch-outside-"))
    try:
        write_eiger(watched / "0" / "old", "old", nimages=2, frames_per_file=2, shape=(64, 64))
        (watched / "0" / "escape").symlink_to(outside, target_is_directory=True)
        _world_readable_tree(watched)
        with _TimedSender(settings, identity) as timed:
            watcher = Watcher(timed, watched, Options(sizes=(96,)), depth=4, give_up_s=60)
            stop = threading.Event()
            thread = threading.Thread(target=watcher.run, args=(0.1, stop), daemon=True)
            before = _counter(stack, identity.gid, "computed")
            thread.start()
            assert watcher.started.wait(10)
            write_eiger(outside, "elsewhere", nimages=1, frames_per_file=1, shape=(64, 64))
            _world_readable_tree(outside)
            sample = watched / "0" / dev_user() / "sample_1"
            writer = subprocess.Popen(
                [sys.executable, "-m", "tests.live_writer", str(sample), "live",
                 "--nimages", "6", "--frames-per-file", "2", "--frame-delay", "0.5"],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                out, _ = writer.communicate(timeout=120)
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.communicate()
            assert writer.returncode == 0
            _wait_for(lambda: watcher.tally.done == 6)
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        shutil.rmtree(watched, ignore_errors=True)
        shutil.rmtree(outside, ignore_errors=True)
    assert (watcher.tally.total, watcher.tally.errors) == (6, [])
    closed = {line["closed"]: line["at"] for line in map(json.loads, out.splitlines())}
    master = str(sample / "live_master.h5")
    assert {path for _, path, _ in timed.sent} == {master}
    for sent_at, _, frame in timed.sent:
        data_file = f"live_data_{(frame + 1) // 2:06d}.h5"
        assert sent_at >= closed[data_file], f"frame {frame} sent before its data file was done"
    first = min(sent_at for sent_at, _, frame in timed.sent if frame == 1)
    assert first < closed["live_data_000003.h5"], "frame 1 waited for the whole dataset"
    # The 6 new frames, each computed once: nothing old, nothing outside the tree.
    assert _counter(stack, identity.gid, "computed") == before + 6


def test_watch_command(settings: Settings, identity: Identity, tmp_path: Path) -> None:
    with pytest.raises(PrefetchError, match="not a directory"):
        prefetch_watch.command(settings, identity, Options(), tmp_path / "none")
    stop, err = threading.Event(), io.StringIO()
    stop.set()  # lists the directory once and stops, as after Ctrl-C
    assert prefetch_watch.command(settings, identity, Options(), tmp_path, stop=stop, err=err) == 0
    assert f"watching {tmp_path} (6 levels deep) for {identity.prefetch_queue}" in err.getvalue()
    assert "prefetch: 0/0 frames done, 0 errors" in err.getvalue()


def test_esaf_account_prefetch_warms_its_users_views(
    stack: Stack, settings: Settings, data_dir: Path, accounts: Accounts
) -> None:
    """Prefetch runs as ``e<esaf>``; a user of that ESAF (policy "user": the user's uid,
    the ESAF's gid) is another worker, but the cache is the gid's: nothing is computed."""
    esaf, owner = accounts.esaf()
    user = accounts.user()
    ident = prefetch.resolve_identity(settings, esaf)
    assert ident == Identity(owner.uid, owner.gid)
    master = data_dir / "six_master.h5"
    with Sender(settings, ident) as esaf_sender:
        work = prefetch.plan(master, FrameRange(1, 2))
        assert prefetch.prefetch(esaf_sender, work, Options(sizes=(500,))).ok
    computed = _counter(stack, owner.gid, "computed")
    assert computed == 2
    user_pid = stack.add_session([esaf], user=user.name)
    for frame in (1, 2):
        job = {"type": "jpeg", "pid": user_pid, "esaf": esaf, "fn": str(master),
               "frame": frame, "xsize": 500}  # fmt: skip
        assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    assert _counter(stack, owner.gid, "computed") == computed
    assert _counter(stack, owner.gid, "hits") == 2  # from Redis: another worker's LRU


# -- the worker side, on a real Redis without Celery --------------------------------------


@pytest.fixture
def context(redis_url: str) -> Iterator[WorkerContext]:
    ident = Identity(4001, 5001)
    settings = Settings(redis_url=redis_url, task_secret="s3cret", task_max_age_s=60)
    service = build_service(settings, ident, threads=2)
    key = queue_key(b"s3cret", ident.queue)
    try:
        yield WorkerContext(ident.queue, key, settings, service)
    finally:
        service.close()


def _sealed(context: WorkerContext, job: dict[str, Any]) -> str:
    return seal(b"s3cret", context.queue, {"job": job, "rid": "r1"})


def test_worker_reports_done_missing_and_errors(context: WorkerContext, tmp_path: Path) -> None:
    master = write_eiger(tmp_path, "w", nimages=2, frames_per_file=2, shape=(128, 128))
    run = prefetch_task.run_prefetch
    assert run(context, _sealed(context, prefetch_task.prefetch_job(str(master), 2, [64]))) == {
        "status": "done"
    }
    missing = run(context, _sealed(context, prefetch_task.prefetch_job(str(master), 3, [64])))
    assert missing["status"] == "missing" and "beyond the last frame" in missing["error"]
    bad_job = run(context, _sealed(context, {"fn": str(master), "frame": 1, "sizes": []}))
    assert bad_job == {"status": "error", "error": "prefetch: prefetch job with sizes []"}
    forged = seal(b"other", context.queue, {"job": {}, "rid": "x"})
    assert run(context, forged)["error"] == "istasks envelope: task envelope signature invalid"
    assert run(context, None)["error"] == "istasks envelope: task argument is not an envelope"


def test_worker_accepts_prefetch_envelopes_older_than_view_ones(
    context: WorkerContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --no-wait backlog waits behind every view: task_max_age_s would refuse it."""
    master = write_eiger(tmp_path, "a", nimages=1, frames_per_file=1, shape=(128, 128))
    now = int(time.time())
    job = prefetch_task.prefetch_job(str(master), 1, [64])
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda self: now - 600)
    queued_long_ago = _sealed(context, job)
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda self: now - 7200)
    too_old = _sealed(context, job)
    monkeypatch.undo()
    assert prefetch_task.run_prefetch(context, queued_long_ago) == {"status": "done"}
    assert prefetch_task.run_prefetch(context, too_old)["error"].endswith("task envelope expired")


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("384,1024", (384, 1024)), (" 512 ", (512,)), ("64,64,128", (64, 128))],
)
def test_parse_sizes(text: str, expected: tuple[int, ...]) -> None:
    assert prefetch.parse_sizes(text, 10000) == expected


@pytest.mark.parametrize("text", ["384,abc", "4", "20000", ""])
def test_parse_sizes_refuses(text: str) -> None:
    with pytest.raises(PrefetchError, match="--sizes"):
        prefetch.parse_sizes(text, 10000)


def test_parse_frames() -> None:
    assert prefetch.parse_frames("2-5") == FrameRange(2, 5)
    assert prefetch.parse_frames("7") == FrameRange(7, 7)
    for text in ("0-3", "5-2", "a-b", "1-", "-3"):
        with pytest.raises(PrefetchError, match="--frames"):
            prefetch.parse_frames(text)


def test_frame_range_must_fit_the_dataset(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    master = data_dir / "six_master.h5"
    with pytest.raises(PrefetchError, match="has 6 frame"):
        prefetch.plan(master, FrameRange(5, 9))
    args = ["prefetch", str(master), "--esaf", "0", "--user", dev_user(), "--frames", "5-9"]
    assert cli.main(args) == 1
    assert "isctl: prefetch: --frames 5-9: " in capsys.readouterr().err


def test_identity_rules() -> None:
    settings = Settings()
    with pytest.raises(PrefetchError, match="--user"):
        prefetch.resolve_identity(settings, 0)
    with pytest.raises(IdentityError, match="uid 0"):
        prefetch.resolve_identity(settings, 0, "root")
    with pytest.raises(IdentityError, match="no Unix account"):
        prefetch.resolve_identity(settings, 0, "no-such-user-here")
    with pytest.raises(IdentityError, match="'e987654'"):
        prefetch.resolve_identity(settings, 987654)


def test_cli_needs_one_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prefetch", "--esaf", "1"]) == 2
    assert cli.main(["prefetch", "x", "--watch", "y", "--esaf", "1"]) == 2
    assert "give MASTER_OR_DIR or --watch DIR" in capsys.readouterr().err


def test_progress_bar_on_a_log_stream() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width=10, interval_s=3600)
    tally = Tally(total=4)
    bar.draw(tally, force=True)
    tally.done = 3
    bar.draw(tally)  # throttled: not a terminal
    tally.errors.append("f frame 4: bad")
    bar.finish(tally)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[----------] 0/4 frames, 0 errors"
    assert lines[1] == "[#######---] 3/4 frames, 1 error"
    assert lines[2] == "  error: f frame 4: bad"
    assert lines[3].startswith("prefetch: 3/4 frames done, 1 error in ")
