"""End to end: is.js-style REQ client -> is-proxy -> bridge -> Celery worker -> back.

The stack is started exactly as ``isctl up`` starts it (ops.stack): its own
redis-server, the supervisor (as root it forks workers under the session's identity),
the bridge and an is-proxy. Nothing is replaced by a stand-in except the external
indexer program, which the test writes as a script.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from istasks import keys
from istasks.settings import Settings
from ops.client import request
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from tests.wire_assert import assert_error_reply, assert_success_reply

pytestmark = pytest.mark.slow

INDEXER = """#!/bin/bash
# Stand-in for rapd.index: progress on --progress-fd, JSON on --json-fd, noise on stderr.
while [ $# -gt 0 ]; do
  case "$1" in --json-fd) J=$2; shift;; --progress-fd) P=$2; shift;; *) LAST=$1;; esac
  shift
done
echo "indexing $LAST" >&$P
echo "step 2 \\"quoted\\"" >&$P
echo '{"spacegroup":"P212121","cell":[40.1,50.2,60.3,90,90,90]}' >&$J
echo "a warning" >&2
"""


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """World-readable data (as root the workers run as an unprivileged account)."""
    path = Path(tempfile.mkdtemp(prefix="is-e2e-"))
    path.chmod(0o755)
    write_eiger(path, "x", nimages=4, frames_per_file=2, shape=(1062, 1028), seed=7)
    indexer = path / "fake-index.sh"
    indexer.write_text(INDEXER)
    for item in path.iterdir():
        item.chmod(0o755 if item == indexer else 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        indexer_command=str(data_dir / "fake-index.sh"),
        worker_idle_s=300,
        view_timeout_s=20,
    )
    with Stack.start(tmp_path_factory.mktemp("run"), settings, via_proxy=True) as running:
        yield running


@pytest.fixture(scope="module")
def pid(stack: Stack) -> str:
    return stack.add_session([0], user=dev_user())


def _admin(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


def _job(pid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "jpeg", "pid": pid, "esaf": 0, **fields}


def _computed(stack: Stack) -> int:
    client = _admin(stack)
    try:
        return sum(int(client.get(k) or 0) for k in client.scan_iter(f"{keys.STATS}:*:computed"))
    finally:
        client.close()


def test_jpeg_view(stack: Stack, pid: str, data_dir: Path) -> None:
    job = _job(pid, fn=str(data_dir / "x_master.h5"), frame=3, xsize=512,
               label="x", labelHeight=16, tag="v1", zoom=1)  # fmt: skip
    frames = request(stack.endpoint, job, timeout_s=30)
    echo, meta, jpeg = assert_success_reply(frames, 4)[:3]
    echoed = json.loads(echo)
    assert list(echoed) == sorted(echoed) and b" " not in echo
    assert echoed["tag"] == "v1" and isinstance(echoed["wval_used"], int)
    assert echoed["bval_used"] > echoed["wval_used"]
    meta_obj = json.loads(meta)
    assert meta_obj["frame"] == 3 and meta_obj["last_frame"] == 4 and "spots" in meta_obj
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (512, 512 + 16)


def test_second_request_hits_the_cache(stack: Stack, pid: str, data_dir: Path) -> None:
    job = _job(pid, fn=str(data_dir / "x_master.h5"), frame=2, xsize=384)
    before = _computed(stack)
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    after_first = _computed(stack)
    assert after_first == before + 1
    second = request(stack.endpoint, {**job, "wval": 5, "contrast": 50}, timeout_s=30)
    assert json.loads(assert_success_reply(second, 4)[0])["bval_used"] == 50
    assert _computed(stack) == after_first  # same reduced image: no new computation


def test_rewritten_file_is_never_served_stale(stack: Stack, pid: str, data_dir: Path) -> None:
    sub = data_dir / "stale"
    sub.mkdir(mode=0o755, exist_ok=True)
    master = write_eiger(sub, "s", nimages=1, frames_per_file=1, shape=(256, 256), seed=1)
    _world_readable(sub)
    job = _job(pid, fn=str(master), xsize=128)
    first = json.loads(assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)[1])
    # Rewrite the dataset under the same names (written aside, then renamed in, as a
    # file writer or rsync does: the worker may still hold the old files open).
    aside = data_dir / "stale-new"
    aside.mkdir(mode=0o755, exist_ok=True)
    write_eiger(aside, "s", nimages=1, frames_per_file=1, shape=(256, 256), seed=2)
    _world_readable(aside)
    for item in aside.iterdir():
        os.replace(item, sub / item.name)
    second = json.loads(assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)[1])
    assert (first["mean"], first["max"]) != (second["mean"], second["max"])


def test_spots(stack: Stack, pid: str, data_dir: Path) -> None:
    job = {"type": "SPOTS", "pid": pid, "esaf": 0, "fn": str(data_dir / "x_master.h5")}
    echo, meta = assert_success_reply(request(stack.endpoint, job, timeout_s=30), 3)[:2]
    assert json.loads(echo)["xsize"] == 384 and json.loads(echo)["zoom"] == 1.0
    assert json.loads(meta)["spots"] > 0


def test_missing_file_gives_blank_with_reason(stack: Stack, pid: str, data_dir: Path) -> None:
    job = _job(pid, fn=str(data_dir / "nope_master.h5"), xsize=100)
    echo, meta, jpeg = assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)[:3]
    assert meta == b"" and "wval_used" not in json.loads(echo)
    assert "No such file" in json.loads(echo)["error"]
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert image.size == (100, 100) and image.getpixel((50, 50))[0] >= 0xE8


def test_spots_missing_data_is_one_error_frame(stack: Stack, pid: str, data_dir: Path) -> None:
    job = {"type": "spots", "pid": pid, "esaf": 0, "fn": str(data_dir / "none.h5")}
    assert_error_reply(request(stack.endpoint, job, timeout_s=30), "Missing data for job")


def test_index_with_progress(stack: Stack, pid: str, data_dir: Path) -> None:
    client = _admin(stack)
    pubsub = client.pubsub()
    pubsub.subscribe("idx-progress")
    job = {"type": "index", "pid": pid, "esaf": 0, "fn1": str(data_dir / "x_master.h5"),
           "tag": "t-9", "progressPublisher": "idx-progress"}  # fmt: skip
    echo, result = assert_success_reply(request(stack.endpoint, job, timeout_s=60), 3)[:2]
    assert json.loads(echo)["tag"] == "t-9"
    parsed = json.loads(result)
    assert parsed.get("spacegroup") == "P212121", parsed
    assert "a warning" in parsed["stderr"]
    messages = _drain(pubsub)
    pubsub.close()
    client.close()
    assert messages[-1] == {"done": True, "tag": "t-9"}
    assert any("indexing" in m.get("progress", "") for m in messages)


@pytest.mark.parametrize(
    ("fields", "with_pid", "text"),
    [
        ({"type": "jpeg"}, False, "request does not contain pid"),
        ({"type": "jpeg", "pid": "no-such-session"}, False, "is not authorized (2)"),
        ({"type": "rsync_transfer"}, True, "Obsolete job type 'rsync_transfer'"),
        ({"type": "dance"}, True, "Unknown job type 'dance'"),
        ({}, True, "No type parameter in job"),
    ],
)
def test_errors_are_one_frame(
    stack: Stack, pid: str, fields: dict[str, Any], with_pid: bool, text: str
) -> None:
    job = {"esaf": 0, **fields, **({"pid": pid} if with_pid else {})}
    assert_error_reply(request(stack.endpoint, job, timeout_s=30), text)


def test_esaf_not_allowed(stack: Stack, pid: str) -> None:
    assert_error_reply(
        request(stack.endpoint, _job(pid, esaf=51234, fn="/x"), timeout_s=30),
        f"Process {pid} is not authorized for esaf 51234",
    )


def test_logged_out_session_refused_next_request(stack: Stack, data_dir: Path) -> None:
    other = stack.add_session([0], user=dev_user())
    job = _job(other, fn=str(data_dir / "x_master.h5"), xsize=64)
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    client = _admin(stack)
    client.delete(other)
    client.close()
    # "(7)": verified before and now gone (spec 3.3), as the original answered.
    assert_error_reply(request(stack.endpoint, job, timeout_s=30), "is not authorized (7)")


def test_forged_envelope_refused_by_worker(stack: Stack, pid: str, data_dir: Path) -> None:
    """A task written straight into the broker without a valid envelope is refused."""
    import dataclasses
    import pwd

    from istasks.app import create_app
    from queues.envelope import seal
    from queues.naming import parse_queue_name, queue_name

    # Make sure the identity's worker runs, then talk to the broker directly.
    assert_success_reply(request(stack.endpoint, _job(pid, fn="", xsize=8), timeout_s=30), 4)
    account = pwd.getpwnam(dev_user())
    queue = queue_name(account.pw_uid, account.pw_gid)
    identity, _ = parse_queue_name(queue)  # read results where this worker stores them
    app = create_app(dataclasses.replace(stack.settings, redis_url=stack.redis_url), identity)
    forged = seal(b"not-the-master-secret", queue, {"job": {"type": "jpeg"}, "rid": "f"})
    for token in (forged, "garbage"):
        result = app.send_task("is.jpeg", args=[token], queue=queue).get(timeout=20)
        assert "envelope" in result["error"]
    app.close()


def _drain(pubsub: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            messages.append(json.loads(message["data"]))
            if messages[-1].get("done"):
                break
    return messages


def _world_readable(directory: Path) -> None:
    for item in directory.iterdir():
        item.chmod(item.stat().st_mode | stat.S_IROTH | stat.S_IRGRP)
    os.sync()
