"""Session verification (spec 3.1-3.4, bugs 21 and 22) against a real Redis and real keys."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.sessions import (
    SeenSessions,
    SessionConfigError,
    SessionStoreUnavailable,
    SessionVerifier,
    load_public_key,
    session_redis,
)
from istasks import keys
from istasks.errors import AuthError
from istasks.settings import Settings
from ops.devsession import generate_keypair, isauth_for, sign_isauth, write_session
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:
    from tests.accounts import SessionKeys
    from tests.bridge_harness import BridgeHarness, HarnessFactory, OwnRedis

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

PID = "s3ss10n"


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def verifier(store: redis.Redis, session_keys: SessionKeys) -> Iterator[SessionVerifier]:
    checker = SessionVerifier(store, load_public_key(str(session_keys.public_path)))
    yield checker


def _login(
    store: redis.Redis, keys: SessionKeys, pid: str = PID, esafs: list[int] | None = None
) -> str:
    text, sig = sign_isauth(keys.private_pem, isauth_for(pid, "someone", esafs or [51234]))
    write_session(store, pid, text, sig)
    return text


def _refused(verifier: SessionVerifier, code: str, esaf: int = 0, pid: str = PID) -> None:
    with pytest.raises(AuthError) as caught:
        verifier.verify(pid, esaf)
    assert caught.value.wire_text() == f"isMain.c main: Process {pid} is not authorized {code}"


def test_valid_session(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys)
    session = verifier.verify(PID, 51234)
    assert (session.pid, session.user) == (PID, "someone")
    assert session.allowed_esafs == frozenset({51234})
    assert verifier.verify(PID, 0).allows(0)  # esaf 0 is always allowed


def test_repeat_requests_skip_the_rsa_check(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys)
    for _ in range(5):
        verifier.verify(PID, 51234)
    assert verifier.rsa_checks == 1
    assert verifier.cache_hits == 4


def test_logout_refuses_the_next_request(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys)
    verifier.verify(PID, 0)
    store.delete(PID)
    _refused(verifier, "(7)")  # spec 3.3: the original still had this pair's process


# -- "(7)" after logout or expiry, "(2)" for a pid never seen ------------------------------


class CountingStore:
    """The marker store with its SET/EXISTS calls counted (what the request path costs)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sets = 0
        self.exists_calls = 0

    def set(self, *args: Any, **kwargs: Any) -> Any:
        self.sets += 1
        return self.client.set(*args, **kwargs)

    def exists(self, *names: str) -> int:
        self.exists_calls += 1
        return int(self.client.exists(*names))

    def close(self) -> None:
        pass


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _verifier(
    store: redis.Redis, keys: SessionKeys, seen_store: Any = None, **seen: Any
) -> SessionVerifier:
    key = load_public_key(str(keys.public_path))
    return SessionVerifier(store, key, seen=SeenSessions(seen_store, **seen))


def test_never_seen_pid_is_2(verifier: SessionVerifier) -> None:
    _refused(verifier, "(2)", pid="never-seen")


def test_expired_session_is_7(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    text, sig = sign_isauth(session_keys.private_pem, isauth_for(PID, "someone", [51234]))
    write_session(store, PID, text, sig, ttl_s=1)
    verifier.verify(PID, 51234)
    store.pexpire(PID, 1)  # the login service's TTL runs out
    time.sleep(0.05)
    _refused(verifier, "(7)", esaf=51234)


def test_seen_is_per_pid_and_esaf_as_the_original_processes_were(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys, esafs=[51234, 51235])
    verifier.verify(PID, 51234)
    store.delete(PID)
    _refused(verifier, "(7)", esaf=51234)
    _refused(verifier, "(2)", esaf=51235)  # no process for (pid, 51235) in the original


def test_refused_requests_are_not_remembered(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys, esafs=[1])
    with pytest.raises(AuthError):
        verifier.verify(PID, 51234)  # ESAF not allowed: the original started no process
    store.delete(PID)
    _refused(verifier, "(2)", esaf=51234)


def test_record_without_isauth_stays_2(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys)
    verifier.verify(PID, 0)
    store.hdel(PID, "isAuth")  # the key exists: not a logout
    _refused(verifier, "(2)")


def test_another_bridge_on_the_same_redis_answers_7(
    store: redis.Redis, session_keys: SessionKeys, redis_url: str
) -> None:
    first = _verifier(store, session_keys, redis.Redis.from_url(redis_url))
    second = _verifier(store, session_keys, redis.Redis.from_url(redis_url))
    alone = _verifier(store, session_keys)  # no shared store: its own memory only
    try:
        _login(store, session_keys)
        first.verify(PID, 0)
        store.delete(PID)
        _refused(second, "(7)")
        _refused(alone, "(2)")
        markers = [k.decode() for k in store.scan_iter(match=f"{keys.SEEN}:*")]
        assert markers == [keys.seen_session_key(PID, 0)]
        assert PID not in markers[0]  # a digest: session tokens stay out of key names
        assert keys.SEEN_TTL_S - 5 < store.ttl(markers[0]) <= keys.SEEN_TTL_S
    finally:
        for checker in (first, second, alone):
            checker.close()


def test_markers_cost_no_round_trip_per_request(
    store: redis.Redis, session_keys: SessionKeys
) -> None:
    counting, clock = CountingStore(store), Clock()
    verifier = _verifier(store, session_keys, counting, refresh_s=60.0, clock=clock)
    _login(store, session_keys)
    for _ in range(50):
        verifier.verify(PID, 0)
    assert (counting.sets, counting.exists_calls) == (1, 0)
    clock.now += 61.0  # renewed at most once per refresh period
    verifier.verify(PID, 0)
    verifier.verify(PID, 0)
    assert counting.sets == 2
    _refused(verifier, "(2)", pid="unknown")  # only a missing session reads the marker
    assert counting.exists_calls == 1


def test_memory_forgets_after_the_ttl_and_stays_bounded(
    store: redis.Redis, session_keys: SessionKeys
) -> None:
    clock = Clock()
    verifier = _verifier(store, session_keys, ttl_s=100.0, clock=clock, max_entries=2)
    for pid in ("a", "b", "c"):
        _login(store, session_keys, pid=pid)
        verifier.verify(pid, 0)
        store.delete(pid)
    _refused(verifier, "(2)", pid="a")  # evicted: the memory holds two pairs
    _refused(verifier, "(7)", pid="c")
    clock.now += 101.0
    _refused(verifier, "(2)", pid="c")


def test_marker_store_down_never_fails_a_request(
    store: redis.Redis, session_keys: SessionKeys, own_redis: OwnRedis
) -> None:
    verifier = _verifier(store, session_keys, session_redis(own_redis.url))
    try:
        own_redis.stop()
        _login(store, session_keys)
        assert verifier.verify(PID, 0).pid == PID  # the marker write fails quietly
        store.delete(PID)
        _refused(verifier, "(7)")  # this bridge's memory still knows
        _refused(verifier, "(2)", pid="other")  # the marker read fails: "(2)"
    finally:
        verifier.close()


def test_missing_signature_field(verifier: SessionVerifier, store: redis.Redis) -> None:
    store.hset(PID, "isAuth", json.dumps(isauth_for(PID, "someone", [])))
    _refused(verifier, "(3)")


def test_key_of_wrong_type(verifier: SessionVerifier, store: redis.Redis) -> None:
    store.set(PID, "not a hash")
    _refused(verifier, "(1)")


def test_tampered_isauth(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    text = _login(store, session_keys, esafs=[1])
    store.hset(PID, "isAuth", text.replace("[1]", "[1,51234]"))
    _refused(verifier, "(4)")


def test_signature_from_another_key(
    verifier: SessionVerifier, store: redis.Redis, tmp_path: Path
) -> None:
    other_private, _ = generate_keypair(tmp_path)
    text, sig = sign_isauth(other_private.read_bytes(), isauth_for(PID, "someone", []))
    write_session(store, PID, text, sig)
    _refused(verifier, "(4)")


@pytest.mark.parametrize("sig", ["not base64!!", "", base64.b64encode(b"short").decode()])
def test_garbage_signature(verifier: SessionVerifier, store: redis.Redis, sig: str) -> None:
    write_session(store, PID, json.dumps(isauth_for(PID, "someone", [])), sig)
    _refused(verifier, "(4)")


@pytest.mark.parametrize("isauth", ['{"pid": "s3ss10n", ', "[1, 2]", '"text"', "\udcff"])
def test_signed_but_malformed_isauth_is_5_not_a_crash(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys, isauth: str
) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    raw = isauth.encode("utf-8", "surrogateescape")
    key = serialization.load_pem_private_key(session_keys.private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    sig = base64.b64encode(key.sign(raw, padding.PKCS1v15(), hashes.SHA256()))
    store.hset(PID, mapping={"isAuth": raw, "isAuthSig": sig})
    _refused(verifier, "(5)")


def test_pid_mismatch(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    text, sig = sign_isauth(session_keys.private_pem, isauth_for("someone-else", "u", []))
    write_session(store, PID, text, sig)
    _refused(verifier, "(6)")


def test_esaf_not_allowed(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    _login(store, session_keys, esafs=[51234])
    with pytest.raises(AuthError) as caught:
        verifier.verify(PID, 51235)
    assert (
        caught.value.wire_text() == f"isMain.c main: Process {PID} is not authorized for esaf 51235"
    )


def test_allowed_esafs_are_integers_only(
    verifier: SessionVerifier, store: redis.Redis, session_keys: SessionKeys
) -> None:
    isauth = {"pid": PID, "uid": "u", "allowedESAFs": ["51234", 51234.0, True, 7]}
    text, sig = sign_isauth(session_keys.private_pem, isauth)
    write_session(store, PID, text, sig)
    assert verifier.verify(PID, 7).allowed_esafs == {7}
    with pytest.raises(AuthError):
        verifier.verify(PID, 51234)
    with pytest.raises(AuthError):
        verifier.verify(PID, 1)  # True is not the integer 1 here


# -- configuration --------------------------------------------------------------------


def test_public_key_must_be_configured_absolute_rsa(
    tmp_path: Path, session_keys: SessionKeys
) -> None:
    with pytest.raises(SessionConfigError, match="IS_SESSION_PUBLIC_KEY is not set"):
        load_public_key(None)
    with pytest.raises(SessionConfigError, match="absolute path"):
        load_public_key("session-public.pem")
    with pytest.raises(SessionConfigError, match="cannot read"):
        load_public_key(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SessionConfigError, match="not a PEM public key"):
        load_public_key(str(tmp_path / "junk.pem"))
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(ec_pem)
    with pytest.raises(SessionConfigError, match="not an RSA public key"):
        load_public_key(str(tmp_path / "ec.pem"))
    assert load_public_key(str(session_keys.public_path)).key_size == 2048


def test_from_settings_needs_a_store(session_keys: SessionKeys) -> None:
    with pytest.raises(SessionConfigError, match="no session Redis"):
        SessionVerifier.from_settings(Settings(session_public_key=str(session_keys.public_path)))


def test_private_key_file_is_0600(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path)
    assert private_path.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in public_path.read_bytes()


# -- session store outages ------------------------------------------------------------


def test_store_down_then_back(session_keys: SessionKeys, own_redis: OwnRedis) -> None:
    client = session_redis(own_redis.url)
    verifier = SessionVerifier(client, load_public_key(str(session_keys.public_path)))
    try:
        _login(client, session_keys)
        verifier.verify(PID, 0)
        own_redis.stop()
        with pytest.raises(SessionStoreUnavailable) as caught:
            verifier.verify(PID, 0)
        assert caught.value.wire_text() == "isMain.c main: session store unavailable, try again"
        own_redis.restart()
        _login(client, session_keys)
        assert verifier.verify(PID, 0).pid == PID
    finally:
        verifier.close()


# -- through the wire -----------------------------------------------------------------


def _jpeg(pid: str, esaf: int = 0) -> dict[str, object]:
    return {"type": "jpeg", "pid": pid, "esaf": esaf}


def test_wire_refusals_are_one_frame(bridge: BridgeHarness) -> None:
    assert_error_reply(bridge.request(_jpeg("nobody")), "Process nobody is not authorized (2)")
    bridge.login("p1", esafs=[30123])
    assert_success_reply(bridge.request(_jpeg("p1", 30123)), 4)
    assert_error_reply(
        bridge.request(_jpeg("p1", 51299)),
        "isMain.c main: Process p1 is not authorized for esaf 51299",
    )
    bridge.redis.delete("p1")  # logged out
    assert_error_reply(bridge.request(_jpeg("p1", 30123)), "Process p1 is not authorized (7)")
    bridge.redis.hset("p2", mapping={"isAuth": "{", "isAuthSig": "AAAA"})
    assert_error_reply(bridge.request(_jpeg("p2")), "Process p2 is not authorized (4)")


def test_wire_logout_seen_by_a_bridge_on_another_host(bridges: HarnessFactory) -> None:
    # Two bridges on one Redis, as behind one is_proxy: the session was used on the first.
    first, second = bridges.start(), bridges.start()
    first.login("p5", esafs=[30123])
    assert_success_reply(first.request(_jpeg("p5", 30123)), 4)
    first.redis.delete("p5")
    assert_error_reply(second.request(_jpeg("p5", 30123)), "Process p5 is not authorized (7)")
    assert_error_reply(second.request(_jpeg("p6", 30123)), "Process p6 is not authorized (2)")


def test_wire_esaf_of_wrong_type_reads_as_zero(bridge: BridgeHarness) -> None:
    bridge.login("p3", esafs=[])
    reply = assert_success_reply(bridge.request({"type": "jpeg", "pid": "p3", "esaf": "51234"}), 4)
    assert json.loads(reply[0])["esaf"] == "51234"  # echoed untouched, used as 0


def test_wire_session_store_outage_and_recovery(
    bridges: HarnessFactory, own_redis: OwnRedis
) -> None:
    harness = bridges.start(session_redis_url=own_redis.url)
    harness.redis = redis.Redis.from_url(own_redis.url)
    harness.login("p4")
    assert_success_reply(harness.request(_jpeg("p4")), 4)
    own_redis.stop()
    assert_error_reply(harness.request(_jpeg("p4")), "session store unavailable")
    assert_error_reply(harness.request(_jpeg("p4")), "session store unavailable")
    own_redis.restart()
    harness.login("p4")
    assert_success_reply(harness.request(_jpeg("p4")), 4)
