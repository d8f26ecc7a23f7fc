"""Per-identity Redis ACL users against a real Redis, and through a real worker."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bridge.dispatch import CeleryDispatcher
from istasks.app import create_app
from istasks.keys import (
    heartbeat_hosts_key,
    heartbeat_key,
    progress_channel,
    reduced_key,
    result_prefix,
)
from istasks.settings import Settings
from queues.acl import USER_PREFIX, AclManager, supervisor_tag, user_name, with_credentials
from queues.naming import Identity
from tests.supervisor_harness import SECRET, probe, probe_app, running_supervisor, shared_tempdir

#: Stand-in rapd.index (bash, as dash cannot redirect fds > 9; as root the worker runs as
#: an account that may not be able to run the venv python): progress lines, a result.
STAND_IN_INDEXER = """#!/bin/bash
while [ $# -gt 0 ]; do
  case "$1" in --json-fd) J=$2; shift;; --progress-fd) P=$2; shift;; esac
  shift
done
printf 'indexing\\nstrategy\\n' >&$P
echo '{"status":"SUCCESS"}' >&$J
"""

A = Identity(5001, 6001)
B = Identity(5002, 6002)
TAG = "t3st"


@pytest.fixture
def acl(redis_url: str) -> Iterator[AclManager]:
    """An ACL manager administering the test Redis (its users removed afterwards)."""
    manager = AclManager(redis_url, redis_url, redis_url, tag=TAG)
    assert manager.probe() == "on"
    try:
        yield manager
    finally:
        manager.revoke_all()
        manager.close()


def _as_worker(acl: AclManager, identity: Identity) -> redis.Redis:
    return redis.Redis.from_url(acl.grant(identity).cache)


def _raw(client: redis.Redis, *args: str) -> object:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _denied(call: Callable[[], object]) -> bool:
    """True when Redis answers NOPERM."""
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_worker_reads_its_own_esaf_cache_but_not_another(acl: AclManager, redis_url: str) -> None:
    a_key, b_key = reduced_key(A.gid, "f", "v"), reduced_key(B.gid, "f", "v")
    redis.Redis.from_url(redis_url).set(a_key, b"secret image")
    worker_b = _as_worker(acl, B)
    assert worker_b.set(b_key, b"mine") is True and worker_b.get(b_key) == b"mine"
    assert _denied(lambda: worker_b.get(a_key))
    assert _denied(lambda: worker_b.set(a_key, b"overwrite"))
    assert _denied(lambda: worker_b.delete(a_key))
    worker_b.close()


def test_worker_cannot_enumerate_or_listen_to_others(acl: AclManager) -> None:
    worker = _as_worker(acl, B)
    assert _denied(lambda: worker.keys("*"))
    assert _denied(worker.scan)
    assert _denied(worker.randomkey)
    assert _denied(lambda: _raw(worker, "PSUBSCRIBE", "celery-task-meta-*"))
    assert _denied(lambda: _raw(worker, "SUBSCRIBE", "celery-task-meta-1"))
    assert _denied(lambda: worker.publish("/0.celery.pidbox", "shutdown"))
    assert _denied(worker.flushall)
    assert _denied(lambda: worker.config_get("*"))
    assert _denied(lambda: _raw(worker, "ACL", "LIST"))
    worker.close()


def test_worker_reaches_exactly_its_own_queues(acl: AclManager) -> None:
    worker = redis.Redis.from_url(acl.grant(Identity(1000, 2000)).broker)
    for own in ("1000:2000", "1000:2000:prefetch", "1000:2000\x06\x163"):
        assert worker.lpush(own, b"x") == 1
    for other in ("1000:20001", "1000:2000x", "10000:2000", "5001:6001"):
        assert _denied(functools.partial(worker.lpush, other, b"x")), other
    assert worker.sadd("_kombu.binding.1000:2000", "m") == 1
    assert _denied(lambda: worker.sadd("_kombu.binding.1000:20001", "m"))
    results = result_prefix(1000, 2000)
    assert worker.publish(f"{results}celery-task-meta-abc", b"done") == 0
    assert worker.set(f"{results}celery-task-meta-abc", b"done", ex=60) is True
    assert worker.publish("/0.celeryev/task.succeeded", b"{}") == 0
    worker.close()


def test_worker_reaches_only_its_own_results_queues_and_progress(
    acl: AclManager, redis_url: str
) -> None:
    """B cannot read A's results (JPEGs of A's frames), forge them, read A's queued
    envelopes or publish on A's progress channel; the same operations on its own work."""
    admin = redis.Redis.from_url(redis_url)
    worker_b = redis.Redis.from_url(acl.grant(B).results)
    a_result = result_prefix(A.uid, A.gid) + "celery-task-meta-t1"
    admin.set(a_result, b"A's jpeg")
    admin.lpush(A.queue, b"A's envelope")
    assert _denied(lambda: worker_b.get(a_result))
    assert _denied(lambda: worker_b.set(a_result, b"forged"))
    assert _denied(lambda: worker_b.publish(a_result, b"forged"))
    assert _denied(lambda: worker_b.get("celery-task-meta-t1"))  # the old shared names
    assert _denied(lambda: worker_b.publish("celery-task-meta-t1", b"forged"))
    assert _denied(lambda: worker_b.lrange(A.queue, 0, -1))
    assert _denied(lambda: worker_b.hgetall("unacked"))  # kombu's ack emulation: unused
    assert _denied(lambda: worker_b.publish(progress_channel(A.uid, A.gid), b"{}"))
    assert _denied(lambda: worker_b.publish("any-client-channel", b"{}"))
    own = result_prefix(B.uid, B.gid) + "celery-task-meta-t2"
    assert worker_b.set(own, b"mine", ex=60) is True and worker_b.get(own) == b"mine"
    assert worker_b.publish(own, b"mine") == 0
    assert worker_b.lpush(B.queue, b"x") == 1 and worker_b.rpop(B.queue) == b"x"
    assert worker_b.publish(progress_channel(B.uid, B.gid), b"{}") == 0
    worker_b.close()
    admin.close()


def test_revoked_user_can_no_longer_connect(acl: AclManager) -> None:
    url = acl.grant(A).cache
    redis.Redis.from_url(url).ping()
    acl.revoke(A)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url).ping()


def test_users_lost_by_a_restarted_redis_are_restored(acl: AclManager, redis_url: str) -> None:
    url = acl.grant(A).cache
    redis.Redis.from_url(redis_url).acl_deluser(user_name(A, TAG))
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url).ping()
    assert acl.restore_missing() == [user_name(A, TAG)]
    assert redis.Redis.from_url(url).ping() is True  # same password as before
    assert acl.restore_missing() == []


def test_new_grant_replaces_the_password(acl: AclManager) -> None:
    old = acl.grant(A).cache
    new = acl.grant(A).cache
    assert old != new
    redis.Redis.from_url(new).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(old).ping()


def test_probe_removes_only_this_supervisors_leftover_users(redis_url: str) -> None:
    """Several hosts share one Redis: a supervisor removes its own users only, and the
    names say whose they are (``is_w_<uid>_<gid>@<host>.<hash>``)."""
    admin = redis.Redis.from_url(redis_url)
    mine, other_host = supervisor_tag("hosta", "/run/is/s.sock"), supervisor_tag("hostb", "/x")
    assert mine.startswith("hosta.") and other_host.startswith("hostb.")
    assert user_name(Identity(7, 7), mine) == f"{USER_PREFIX}7_7@{mine}"
    names = (user_name(Identity(7, 7), mine), user_name(Identity(7, 7), other_host))
    for name in names:
        admin.acl_setuser(name, enabled=False)
    manager = AclManager(redis_url, redis_url, redis_url, tag=mine)
    manager.probe()
    users = {u.decode() if isinstance(u, bytes) else u for u in admin.acl_users()}
    assert names[0] not in users
    assert names[1] in users
    admin.acl_deluser(names[1])
    manager.close()


def test_worker_beats_for_its_own_identity_only(acl: AclManager) -> None:
    """Liveness across hosts: a worker's user may renew its identity's heartbeats (any
    host's name) and nobody else's."""
    worker = redis.Redis.from_url(acl.grant(Identity(1000, 2000)).broker)
    assert worker.set(heartbeat_key(1000, 2000, "hosta"), b"{}", px=1500) is True
    assert worker.sadd(heartbeat_hosts_key(1000, 2000), "hosta") == 1
    for uid, gid in ((1000, 20001), (1000, 200), (5001, 6001)):
        assert _denied(functools.partial(worker.set, heartbeat_key(uid, gid, "hosta"), b"{}"))
        assert _denied(functools.partial(worker.sadd, heartbeat_hosts_key(uid, gid), "h"))
    worker.close()


def test_without_admin_rights_acls_are_off_and_urls_unchanged(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    _raw(
        admin, "ACL", "SETUSER", "is_limited", "reset", "on", ">pw", "~*", "&*", "+@all", "-@admin"
    )
    try:
        limited = with_credentials(redis_url, "is_limited", "pw")
        manager = AclManager(limited, limited, limited, tag=TAG)
        assert manager.probe().startswith("off: cannot administer ACL users")
        assert manager.grant(A).cache == limited
        manager.close()
    finally:
        admin.acl_deluser("is_limited")


def test_real_worker_gets_noperm_on_another_esafs_cache(redis_url: str) -> None:
    """Through the supervisor: the worker's own Redis URL carries its ACL user."""
    admin = redis.Redis.from_url(redis_url)
    a_key = reduced_key(A.gid, "f", "v")
    admin.set(a_key, b"secret image of A")
    admin.acl_log_reset()
    app = probe_app(redis_url)
    with running_supervisor(redis_url) as sup:
        sup.client.ensure(B)
        assert sup.client.status()["acl"] == "on"
        stolen = probe(app, B, "probe.redis", "GET", a_key)
        assert stolen["error"].startswith("NoPermissionError"), stolen
        own = reduced_key(B.gid, "f", "v")
        assert probe(app, B, "probe.redis", "SET", own, "mine") == {"ok": "True"}
        assert probe(app, B, "probe.redis", "GET", own) == {"ok": "b'mine'"}
        # A's results and queued messages are as closed to it as A's cache
        a_result = result_prefix(A.uid, A.gid) + "celery-task-meta-x"
        for command in (("GET", a_result), ("LLEN", A.queue), ("PUBLISH", a_result, "f")):
            assert probe(app, B, "probe.redis", *command)["error"].startswith("NoPermission")
        # the only refusals were those: the worker's own Celery traffic never was
        refused = [entry["object"] for entry in admin.acl_log()]
        assert refused[::-1] == [a_key, a_result, A.queue, a_result], refused


def test_real_worker_round_trips_need_no_other_rights(redis_url: str) -> None:
    """istasks.worker with its ACL user serves jpeg and index requests from the bridge's
    dispatcher (results under its own prefix, progress relayed from its own channel)
    without a single refusal in ACL LOG."""
    workdir = shared_tempdir()
    indexer = Path(workdir) / "rapd.index"
    indexer.write_text(STAND_IN_INDEXER)
    indexer.chmod(0o755)
    admin = redis.Redis.from_url(redis_url)
    admin.acl_log_reset()
    listener = admin.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe("progress-b")
    listener.get_message(timeout=1.0)  # the confirmation (not returned)
    env = {"IS_INDEXER_COMMAND": str(indexer)}
    settings = Settings(redis_url=redis_url, task_secret=SECRET)
    try:
        with running_supervisor(redis_url, entry="istasks.worker:serve", env=env) as sup:
            dispatcher = CeleryDispatcher(create_app(settings), settings, sup.client)
            try:
                jpeg = dispatcher.submit(B, "jpeg", {"type": "jpeg", "xsize": 16}, "r1")
                assert len(jpeg.result(60)) == 4  # the blank image: a full reply
                job = {"type": "index", "fn1": "/none/x.h5", "progressPublisher": "progress-b"}
                index = dispatcher.submit(B, "index", job, "r2").result(60)
                assert index[0] == b"" and json.loads(index[2]) == {"status": "SUCCESS"}, index
            finally:
                dispatcher.close()
            assert sup.client.status()["acl"] == "on"
            assert admin.acl_log() == []
        assert admin.keys("*celery-task-meta-*") == []  # read and deleted by the bridge
        relayed = [json.loads(m["data"]) for m in iter(lambda: listener.get_message(1.0), None)]
        assert relayed == [
            {"progress": "indexing", "done": False, "tag": "Tag_Not_Found"},
            {"progress": "strategy", "done": False, "tag": "Tag_Not_Found"},
            {"done": True, "tag": "Tag_Not_Found"},
        ], sup.log()
    finally:
        listener.close()
        admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
