"""Proof under stress, security matrix: every way in that must be refused, refused clearly.

Against the service as ``isctl up`` runs it (ops.stack), each row is one attack with
the exact refusal it must get: forged or tampered session signatures, a pid mismatch,
an ESAF not in the session, a logged-out session, uid/gid 0, a file the identity cannot
read, another ESAF's cache keys with a worker's own Redis credentials, tasks written
straight into the broker without a valid envelope, and a genuine envelope replayed after
it expired. Rows that need other Unix accounts (or the workers' setuid) run only as root.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import pwd
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celery import Celery
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from istasks import keys
from istasks.app import create_app
from istasks.jobs import dumps, spots_job
from istasks.settings import Settings
from ops.client import request
from ops.devsession import ensure_keypair, generate_keypair, isauth_for, sign_isauth
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger
from queues.acl import USER_PREFIX
from queues.envelope import seal
from queues.naming import Identity
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:
    from tests.accounts import Account, Accounts

pytest_plugins = ("tests.accounts",)
pytestmark = pytest.mark.slow

ROOT = os.geteuid() == 0
root_only = [
    pytest.mark.root,
    pytest.mark.skipif(not ROOT, reason="needs root (other accounts, setuid workers)"),
]
#: Envelopes live this long here (the default is 120 s), so a replay can be shown expired.
MAX_AGE_S = 3.0
REFUSED = "isMain.c main: Process {pid} is not authorized ({code})"
ROOT_IDENTITY = "isMain.c main: refusing to run as uid 0 or gid 0"
FORGED = "istasks envelope: task envelope signature invalid"
NOT_AN_ENVELOPE = "istasks envelope: task argument is not an envelope"
EXPIRED = "istasks envelope: task envelope expired"
TASK_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class EsafData:
    """An ESAF account, a user of that ESAF, its session and a file only it may read."""

    esaf: int
    owner: Account
    user: Account
    pid: str
    master: Path


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """World-traversable (as root the workers run as other accounts)."""
    path = Path(tempfile.mkdtemp(prefix="is-sec-"))
    path.chmod(0o755)
    write_eiger(path, "open", nimages=1, frames_per_file=1, shape=(128, 130), seed=3)
    for item in path.iterdir():
        item.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(worker_idle_s=300, view_timeout_s=20, task_max_age_s=MAX_AGE_S)
    with Stack.start(tmp_path_factory.mktemp("sec-run"), settings) as running:
        yield running


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[redis.Redis]:
    """The stack's own Redis (broker, results, cache and sessions)."""
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def pid(stack: Stack) -> str:
    return stack.add_session([0], user=dev_user())


def _job(pid: str, fn: Path | str, **fields: Any) -> dict[str, Any]:
    return {"type": "jpeg", "pid": pid, "esaf": 0, "fn": str(fn), "xsize": 64, **fields}


def _store(admin: redis.Redis, pid: str, fields: dict[str, str]) -> None:
    """Write a session hash as the login service would (or as an attacker could)."""
    admin.delete(pid)
    for name, value in fields.items():
        admin.hset(pid, name, value)


def _signed(stack: Stack, pid: str, isauth: dict[str, Any]) -> tuple[str, str]:
    private, _ = ensure_keypair(stack.run_dir)
    return sign_isauth(private.read_bytes(), isauth)


# -- sessions: through the bridge ------------------------------------------------------


def _forged(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    other_key, _ = generate_keypair(tmp)  # a key the bridge does not trust
    text, sig = sign_isauth(other_key.read_bytes(), isauth_for(pid, dev_user(), [0]))
    return {"isAuth": text, "isAuthSig": sig}


def _tampered_isauth(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, sig = _signed(stack, pid, isauth_for(pid, dev_user(), [0]))
    return {"isAuth": text.replace("[0]", "[0,51234]"), "isAuthSig": sig}


def _tampered_signature(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, sig = _signed(stack, pid, isauth_for(pid, dev_user(), [0]))
    raw = bytearray(base64.b64decode(sig))
    raw[len(raw) // 2] ^= 0x01
    return {"isAuth": text, "isAuthSig": base64.b64encode(bytes(raw)).decode()}


def _garbage_signature(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, _ = _signed(stack, pid, isauth_for(pid, dev_user(), [0]))
    return {"isAuth": text, "isAuthSig": "not base64 at all!"}


def _signed_not_json(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    """Validly signed text that is not JSON (crashed the original's main, bug 22)."""
    private, _ = ensure_keypair(stack.run_dir)
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(b"{not json", padding.PKCS1v15(), hashes.SHA256())
    return {"isAuth": "{not json", "isAuthSig": base64.b64encode(signature).decode()}


def _other_pid(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, sig = _signed(stack, "someone-else", isauth_for("someone-else", dev_user(), [0]))
    return {"isAuth": text, "isAuthSig": sig}


def _no_signature(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, _ = _signed(stack, pid, isauth_for(pid, dev_user(), [0]))
    return {"isAuth": text}


def _root_user(stack: Stack, pid: str, tmp: Path) -> dict[str, str]:
    text, sig = _signed(stack, pid, isauth_for(pid, "root", [0]))
    return {"isAuth": text, "isAuthSig": sig}


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_forged, REFUSED.format(pid="{pid}", code=4)),
        (_tampered_isauth, REFUSED.format(pid="{pid}", code=4)),
        (_tampered_signature, REFUSED.format(pid="{pid}", code=4)),
        (_garbage_signature, REFUSED.format(pid="{pid}", code=4)),
        (_signed_not_json, REFUSED.format(pid="{pid}", code=5)),
        (_other_pid, REFUSED.format(pid="{pid}", code=6)),
        (_no_signature, REFUSED.format(pid="{pid}", code=3)),
        (_root_user, ROOT_IDENTITY),
    ],
    ids=[
        "forged-signature",
        "tampered-isAuth",
        "tampered-signature",
        "signature-not-base64",
        "signed-isAuth-not-json",
        "pid-mismatch",
        "no-signature",
        "uid-0-session",
    ],
)
def test_bad_session_is_refused(
    stack: Stack, admin: redis.Redis, tmp_path: Path, make: Any, expected: str
) -> None:
    pid = f"sec-{uuid.uuid4().hex[:10]}"
    _store(admin, pid, make(stack, pid, tmp_path))
    reply = request(stack.endpoint, _job(pid, "/etc/passwd"), timeout_s=30)
    assert_error_reply(reply, expected.format(pid=pid))
    assert reply[0].decode() == expected.format(pid=pid)


def test_session_of_wrong_redis_type_is_refused(stack: Stack, admin: redis.Redis) -> None:
    admin.set("sec-string", "not a hash")
    reply = request(stack.endpoint, _job("sec-string", "/x"), timeout_s=30)
    assert reply == [REFUSED.format(pid="sec-string", code=1).encode()]


def test_esaf_not_in_the_session_is_refused(stack: Stack, pid: str, data_dir: Path) -> None:
    job = _job(pid, data_dir / "open_master.h5", esaf=51234)
    reply = request(stack.endpoint, job, timeout_s=30)
    assert reply == [f"isMain.c main: Process {pid} is not authorized for esaf 51234".encode()]


def test_logged_out_session_is_refused_at_the_next_request(
    stack: Stack, admin: redis.Redis, data_dir: Path
) -> None:
    pid = stack.add_session([0], user=dev_user())
    job = _job(pid, data_dir / "open_master.h5")
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    admin.delete(pid)  # what the login service does at logout
    assert request(stack.endpoint, job, timeout_s=30) == [REFUSED.format(pid=pid, code=7).encode()]


# -- the broker: tasks without a valid envelope ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Broker:
    """Direct access to the broker, as anyone holding its address could have."""

    admin: redis.Redis
    app: Celery  # reads results where the identity's worker stores them
    identity: Identity  # the dev user's, with its worker running
    master_secret: bytes  # only to make genuine envelopes

    def send(self, *args: Any, **kwargs: Any) -> Any:
        """Send ``is.jpeg`` to the identity's queue; the task's result."""
        result = self.app.send_task("is.jpeg", args=args, kwargs=kwargs, queue=self.identity.queue)
        return result.get(timeout=TASK_TIMEOUT_S)

    def rendered(self) -> tuple[int, set[bytes]]:
        """The identity's computation counter and cached images."""
        gid = self.identity.gid
        computed = int(self.admin.get(keys.stats_key(gid, "computed")) or 0)
        return computed, set(self.admin.scan_iter(f"{keys.REDUCED}:{gid}:*"))


@pytest.fixture(scope="module")
def broker(stack: Stack, admin: redis.Redis, pid: str, data_dir: Path) -> Iterator[Broker]:
    job = _job(pid, data_dir / "open_master.h5")
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)  # the worker runs
    account = pwd.getpwnam(dev_user())
    identity = Identity(account.pw_uid, account.pw_gid)
    app = create_app(dataclasses.replace(stack.settings, redis_url=stack.redis_url), identity)
    secret = (stack.run_dir / "task-secret").read_bytes().strip()
    yield Broker(admin, app, identity, secret)
    app.close()


@pytest.fixture
def fresh_image(data_dir: Path) -> Iterator[Path]:
    """An image nobody has viewed: if a task rendered it, its cache key would appear."""
    sub = Path(tempfile.mkdtemp(prefix="fresh-", dir=data_dir))
    sub.chmod(0o755)
    master = write_eiger(sub, "f", nimages=1, frames_per_file=1, shape=(96, 98), seed=9)
    for item in sub.iterdir():
        item.chmod(0o644)
    yield master
    shutil.rmtree(sub, ignore_errors=True)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("forged", FORGED),
        ("garbage", FORGED),
        ("other-queue", FORGED),
        ("not-a-string", NOT_AN_ENVELOPE),
        ("as-keyword", NOT_AN_ENVELOPE),
        ("two-arguments", NOT_AN_ENVELOPE),
    ],
)
def test_task_without_a_valid_envelope_is_refused(
    broker: Broker, fresh_image: Path, shape: str, expected: str
) -> None:
    """Sent by name straight to the identity's queue, as anyone with broker access could:
    signed with another secret, not signed, sealed for another identity's queue, or not
    one string argument. The worker answers with the refusal and renders nothing."""
    payload = {"job": _job("x", fresh_image), "rid": "attacker"}
    queue = broker.identity.queue
    genuine = seal(broker.master_secret, queue, payload)
    shapes: dict[str, tuple[list[Any], dict[str, Any]]] = {
        "forged": ([seal(b"not-the-master-secret", queue, payload)], {}),
        "garbage": (["garbage"], {}),
        "other-queue": ([seal(broker.master_secret, Identity(4242, 4242).queue, payload)], {}),
        "not-a-string": ([payload], {}),
        "as-keyword": ([], {"token": genuine}),
        "two-arguments": ([genuine, "x"], {}),
    }
    before = broker.rendered()
    args, kwargs = shapes[shape]
    assert broker.send(*args, **kwargs) == {"error": expected}
    assert broker.rendered() == before


def _kombu_message(task_id: str, queue: str, body: bytes, content_type: str) -> str:
    """A task message as kombu's Redis transport stores it, written by hand."""
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8" if content_type == "application/json" else "binary",
        "content-type": content_type,
        "headers": {
            "lang": "py", "task": "is.jpeg", "id": task_id, "root_id": task_id,
            "parent_id": None, "group": None, "retries": 0, "timelimit": [None, None],
            "eta": None, "expires": None, "argsrepr": "", "kwargsrepr": "{}", "origin": "x",
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })  # fmt: skip


def _task_body(args: list[Any]) -> bytes:
    return json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None}]).encode()


def test_hand_made_broker_message_is_refused(broker: Broker, fresh_image: Path) -> None:
    """LPUSH of a kombu message written by hand, with a made-up envelope."""
    before = broker.rendered()
    task_id, queue = str(uuid.uuid4()), broker.identity.queue
    token = "eyJxIjoiNjU1MzQ6NjU1MzQifQ.ZZZZZZ.forged-signature"
    body = _task_body([token])
    broker.admin.lpush(queue, _kombu_message(task_id, queue, body, "application/json"))
    assert broker.app.AsyncResult(task_id).get(timeout=TASK_TIMEOUT_S) == {"error": FORGED}
    assert broker.rendered() == before


class _Canary:
    """Unpickling this would create a file: proof that pickle content ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_pickled_broker_message_runs_nothing(
    stack: Stack, broker: Broker, pid: str, data_dir: Path
) -> None:
    """A pickle body (code execution if accepted) is refused by content type; the worker
    stays up and serves the next request."""
    canary = Path(tempfile.mkdtemp(prefix="is-canary-")) / "pwned"
    canary.parent.chmod(0o777)
    body = pickle.dumps(((_Canary(canary),), {}, {}))
    pickled_id, queue = str(uuid.uuid4()), broker.identity.queue
    pickled = _kombu_message(pickled_id, queue, body, "application/x-python-serialize")
    broker.admin.lpush(queue, pickled)
    assert broker.send("garbage") == {"error": FORGED}  # taken after the pickled one
    assert not canary.exists()
    assert broker.app.AsyncResult(pickled_id).state == "PENDING"  # never ran, no result
    job = _job(pid, data_dir / "open_master.h5")
    assert_success_reply(request(stack.endpoint, job, timeout_s=30), 4)
    shutil.rmtree(canary.parent, ignore_errors=True)


def test_replayed_expired_envelope_is_refused(broker: Broker, fresh_image: Path) -> None:
    """A genuine envelope (sealed with the stack's master secret, as the bridge seals) is
    served once, and refused when replayed after task_max_age_s."""
    payload = {"job": _job("x", fresh_image, xsize=32), "rid": "replay"}
    token = seal(broker.master_secret, broker.identity.queue, payload)
    sealed_at = time.time()
    first = broker.send(token)
    assert len(first["frames"]) == 3, first
    after_first = broker.rendered()
    # itsdangerous stamps whole seconds and refuses ages strictly above the maximum.
    time.sleep(max(0.0, int(sealed_at) + MAX_AGE_S + 1.2 - time.time()))
    assert broker.send(token) == {"error": EXPIRED}
    assert broker.rendered() == after_first


# -- Unix identities and per-ESAF isolation (root) -------------------------------------


@pytest.fixture(scope="module")
def esafs(stack: Stack, accounts: Accounts) -> Iterator[tuple[EsafData, EsafData]]:
    """ESAFs A and B: accounts, a user of each, a session each, and A's private image."""
    if not ROOT:
        pytest.skip("needs root (other accounts, setuid workers)")
    made = []
    for seed in (21, 22):
        esaf, owner = accounts.esaf()
        user = accounts.user()
        pid = stack.add_session([esaf], user=user.name)
        where = Path(tempfile.mkdtemp(prefix=f"is-e{esaf}-"))
        where.chmod(0o755)  # anyone may look inside; the files say who may read
        master = write_eiger(where, "private", nimages=1, frames_per_file=1,
                             shape=(128, 130), seed=seed)  # fmt: skip
        for item in where.iterdir():
            os.chown(item, owner.uid, owner.gid)
            item.chmod(0o640)
        made.append(EsafData(esaf, owner, user, pid, master))
    yield made[0], made[1]
    for data in made:
        shutil.rmtree(data.master.parent, ignore_errors=True)


def _worker_user(admin: redis.Redis, identity: Identity) -> str:
    """The Redis ACL user the supervisor made for the identity's worker, as the server
    sees the worker's own connections (CLIENT LIST)."""
    prefix = f"{USER_PREFIX}{identity.uid}_{identity.gid}@"  # is_w_<uid>_<gid>@<host>.<hash>
    users = {entry["user"] for entry in admin.client_list() if entry["user"].startswith(prefix)}
    assert len(users) == 1, f"worker connections of {identity.queue}: {users}"
    return users.pop()


@pytest.fixture(scope="module")
def b_as_worker(
    stack: Stack, admin: redis.Redis, esafs: tuple[EsafData, EsafData]
) -> Iterator[tuple[redis.Redis, bytes, Identity]]:
    """A Redis connection with exactly worker B's rights, a cached image key of ESAF A
    and A's gid. The worker's password only exists in its memory (it travels over a
    socketpair, not through /proc/<pid>/environ), so the test gives B's ACL user a
    second password of its own for the duration."""
    a, b = esafs
    for data in (a, b):  # both workers run; A's image is in the cache
        job = {"type": "jpeg", "pid": data.pid, "esaf": data.esaf, "fn": str(data.master)}
        assert_success_reply(request(stack.endpoint, {**job, "xsize": 80}, timeout_s=30), 4)
    a_keys = list(admin.scan_iter(f"{keys.REDUCED}:{a.owner.gid}:*"))
    assert a_keys, "A's image is not in the cache"
    user = _worker_user(admin, Identity(b.user.uid, b.owner.gid))
    password = uuid.uuid4().hex
    admin.execute_command("ACL", "SETUSER", user, f">{password}")  # type: ignore[no-untyped-call]
    client = redis.Redis.from_url(stack.redis_url, username=user, password=password)
    try:
        assert client.get(f"{keys.REDUCED}:{b.owner.gid}:nothing") is None  # its own: allowed
        yield client, a_keys[0], Identity(a.user.uid, a.owner.gid)
    finally:
        client.close()
        admin.execute_command("ACL", "SETUSER", user, f"<{password}")  # type: ignore[no-untyped-call]


class TestIdentities:
    """Rows that need other Unix accounts and setuid workers."""

    pytestmark = root_only

    @pytest.mark.parametrize("kind", ["jpeg", "spots"])
    def test_file_of_another_esaf_is_unreadable(
        self, stack: Stack, esafs: tuple[EsafData, EsafData], kind: str
    ) -> None:
        """B's user asks for A's 0640 file under B's ESAF: the kernel refuses the open."""
        a, b = esafs
        mine = {"type": kind, "pid": a.pid, "esaf": a.esaf, "fn": str(a.master), "xsize": 64}
        theirs = {**mine, "pid": b.pid, "esaf": b.esaf}
        assert_success_reply(request(stack.endpoint, mine, timeout_s=30))  # A's user may
        reply = request(stack.endpoint, theirs, timeout_s=30)
        if kind == "jpeg":
            echo, meta, _ = assert_success_reply(reply, 4)  # the documented blank fallback
            assert meta == b""
            assert json.loads(echo)["error"] == f"cannot read {a.master}: Permission denied"
        else:
            assert reply == [
                f"isSpots.c isSpots: Missing data for job {dumps(spots_job(theirs))}".encode()
            ]

    def test_cached_image_is_not_shown_to_a_user_who_cannot_read_the_file(
        self, stack: Stack, accounts: Accounts, data_dir: Path
    ) -> None:
        """Two users of one ESAF share its cache (keys are per gid); a file one of them
        owns and the other may not read must not reach the other through that cache."""
        esaf, _ = accounts.esaf()
        reader, other = accounts.user(), accounts.user()
        where = Path(tempfile.mkdtemp(prefix="is-own-", dir=data_dir))
        where.chmod(0o755)
        master = write_eiger(where, "own", nimages=1, frames_per_file=1, shape=(96, 98), seed=5)
        for item in where.iterdir():
            os.chown(item, reader.uid, reader.gid)  # the reader's own group, not the ESAF's
            item.chmod(0o600)
        job = {"type": "jpeg", "esaf": esaf, "fn": str(master), "xsize": 64}
        mine = request(
            stack.endpoint, {**job, "pid": stack.add_session([esaf], reader.name)}, timeout_s=30
        )
        assert json.loads(assert_success_reply(mine, 4)[1])["fn"] == str(master)
        pid = stack.add_session([esaf], user=other.name)
        echo, meta, _ = assert_success_reply(
            request(stack.endpoint, {**job, "pid": pid}, timeout_s=30), 4
        )
        assert meta == b"", "another user's cached image was shown"
        assert "Permission denied" in json.loads(echo)["error"]

    def test_user_of_b_cannot_claim_esaf_a(
        self, stack: Stack, esafs: tuple[EsafData, EsafData]
    ) -> None:
        a, b = esafs
        job = {"type": "jpeg", "pid": b.pid, "esaf": a.esaf, "fn": str(a.master), "xsize": 64}
        assert request(stack.endpoint, job, timeout_s=30) == [
            f"isMain.c main: Process {b.pid} is not authorized for esaf {a.esaf}".encode()
        ]

    def test_esaf_account_with_gid_0_is_refused(self, stack: Stack, accounts: Accounts) -> None:
        esaf, _ = accounts.esaf(gid=0)
        pid = stack.add_session([esaf], user=accounts.user().name)
        job = {"type": "jpeg", "pid": pid, "esaf": esaf, "fn": "/etc/shadow", "xsize": 64}
        assert request(stack.endpoint, job, timeout_s=30) == [ROOT_IDENTITY.encode()]

    @pytest.mark.parametrize(
        "command",
        ["GET A's image", "SCAN A's images", "KEYS", "SET A's lock", "DEL A's image",
         "GET A's counter", "DUMP A's image", "GET A's result", "LPUSH to A's queue"],
    )  # fmt: skip
    def test_worker_of_b_cannot_touch_a_cache(
        self, b_as_worker: tuple[redis.Redis, bytes, Identity], command: str
    ) -> None:
        """With worker B's Redis rights: NOPERM on A's cache, results and queue."""
        client, a_key, a = b_as_worker
        gid_a = a.gid
        calls = {
            "GET A's image": ("GET", a_key),
            "SCAN A's images": ("SCAN", "0", "MATCH", f"{keys.REDUCED}:{gid_a}:*"),
            "KEYS": ("KEYS", "*"),
            "SET A's lock": ("SET", keys.lock_key(gid_a, "x"), "1"),
            "DEL A's image": ("DEL", a_key),
            "GET A's counter": ("GET", keys.stats_key(gid_a, "computed")),
            "DUMP A's image": ("DUMP", a_key),
            "GET A's result": ("GET", f"{keys.result_prefix(a.uid, a.gid)}celery-task-meta-x"),
            "LPUSH to A's queue": ("LPUSH", a.queue, "{}"),
        }
        with pytest.raises(redis.exceptions.NoPermissionError, match="permissions"):
            client.execute_command(*calls[command])  # type: ignore[no-untyped-call]
