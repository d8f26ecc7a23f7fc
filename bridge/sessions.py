"""Session verification against the login service's Redis hash (spec 3.1-3.4).

Every request reads ``HMGET <pid> isAuth isAuthSig`` (one round trip), so a logout (the
key deleted) refuses the very next request, and the signature, pid and ESAF list are
checked every time (fixes bugs 21, 22). The RSA verification itself is cached by a digest
of the exact (isAuth, isAuthSig) bytes: repeat requests cost no public-key operation.

A missing key is answered as the original did: "(7)" when this (pid, esaf) was verified
before (the original still had its process: the user logged out or the session expired),
"(2)" for a pid never seen. :class:`SeenSessions` remembers verified pairs in process and,
for bridges on several hosts, as a marker with a TTL in the broker Redis; the marker is
written once per pair and hour and read only when a session is missing, so the request
path keeps its one round trip.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from redis.backoff import NoBackoff
from redis.retry import Retry

from istasks import keys
from istasks.errors import AuthError, IsError
from istasks.redisconn import connect
from istasks.settings import Settings

log = logging.getLogger(__name__)

#: Verified sessions remembered (LRU); one entry is a few hundred bytes.
VERIFIED_CACHE_ENTRIES = 4096
#: Smallest RSA key accepted for session signatures (the login service uses 2048).
MIN_KEY_BITS = 2048
#: Verified (pid, esaf) pairs remembered in process (LRU), for "(7)" after a logout.
SEEN_ENTRIES = 65536
#: A pair's shared marker is rewritten (its TTL renewed) at most this often per bridge.
SEEN_REFRESH_S = 3600.0


class SessionConfigError(RuntimeError):
    """Session key or store not configured or unusable: the bridge refuses to start."""


class SessionStoreUnavailable(IsError, ConnectionError):
    """The session Redis cannot be reached. Reply: one error frame; later requests retry."""

    origin = "isMain.c main"


@dataclass(frozen=True)
class Session:
    """The parts of a verified ``isAuth`` the server uses."""

    pid: str | None
    user: str | None  # isAuth.uid: the Unix account name of the web user
    allowed_esafs: frozenset[int]

    def allows(self, esaf: int) -> bool:
        """ESAF 0 is always allowed (spec 3.2 step 7); others must be listed."""
        return esaf == 0 or esaf in self.allowed_esafs


def load_public_key(path: str | None) -> rsa.RSAPublicKey:
    """Load the PEM RSA public key from an absolute path (never the working directory)."""
    if not path:
        raise SessionConfigError("IS_SESSION_PUBLIC_KEY is not set (PEM file of the login service)")
    key_path = Path(path)
    if not key_path.is_absolute():
        raise SessionConfigError(f"IS_SESSION_PUBLIC_KEY must be an absolute path, not {path!r}")
    try:
        key = serialization.load_pem_public_key(key_path.read_bytes())
    except OSError as exc:
        raise SessionConfigError(f"cannot read session public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SessionConfigError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_KEY_BITS:
        raise SessionConfigError(f"{path} is not an RSA public key of at least {MIN_KEY_BITS} bits")
    return key


def session_redis(url: str | None) -> redis.Redis:
    """Client for the session store: short timeouts, one retry, so outages fail fast."""
    if not url:
        raise SessionConfigError("no session Redis: set IS_SESSION_REDIS_URL or IS_REDIS_URL")
    client: redis.Redis = redis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    return client


def _broker_redis(settings: Settings) -> redis.Redis:
    """The broker Redis (every bridge's "seen" markers), behind Sentinel if configured."""
    assert settings.broker is not None
    return connect(
        settings.broker, settings, socket_timeout=2.0, socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 1), health_check_interval=30,
    )  # fmt: skip


class SeenSessions:
    """The (pid, esaf) pairs whose session was verified: what tells "(7)" from "(2)".

    In process: an LRU of the pairs verified within :data:`~istasks.keys.SEEN_TTL_S`.
    With a ``store`` (the broker Redis, shared by every bridge) each pair also gets a
    marker there with that TTL, so a bridge on another host answers "(7)" too. The
    marker is written when a pair is first verified here and renewed at most every
    ``refresh_s``; it is read only for a missing session. Store errors are logged and
    only weaken the answer to "(2)": they never fail a request. Thread-safe.
    """

    def __init__(
        self,
        store: redis.Redis | None = None,
        *,
        max_entries: int = SEEN_ENTRIES,
        ttl_s: float = keys.SEEN_TTL_S,
        refresh_s: float = SEEN_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._refresh_s = min(refresh_s, ttl_s)
        self._clock = clock
        self._written: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, pid: str, esaf: int) -> None:
        """Note a successful verification (a dict lookup unless the marker is due)."""
        now = self._clock()
        pair = (pid, esaf)
        with self._lock:
            written = self._written.get(pair)
            if written is not None and now - written < self._refresh_s:
                self._written.move_to_end(pair)
                return
            self._written[pair] = now
            self._written.move_to_end(pair)
            while len(self._written) > self._max_entries:
                self._written.popitem(last=False)
        if self._store is not None:
            try:
                self._store.set(keys.seen_session_key(pid, esaf), b"1", ex=int(self._ttl_s))
            except redis.RedisError as exc:
                log.warning("cannot write the verified-session marker: %s", exc)

    def was_verified(self, pid: str, esaf: int) -> bool:
        """True when (pid, esaf) was verified within the TTL, here or by another bridge."""
        with self._lock:
            written = self._written.get((pid, esaf))
        if written is not None and self._clock() - written < self._ttl_s:
            return True
        if self._store is None:
            return False
        try:
            return bool(self._store.exists(keys.seen_session_key(pid, esaf)))
        except redis.RedisError as exc:
            log.warning("cannot read the verified-session marker: %s", exc)
            return False

    def close(self) -> None:
        """Release the store's connections."""
        if self._store is not None:
            self._store.close()


class SessionVerifier:
    """Checks one request's (pid, esaf) against its signed session; thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        public_key: rsa.RSAPublicKey,
        *,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
        seen: SeenSessions | None = None,
    ) -> None:
        self._client = client
        self._key = public_key
        self._cache_entries = cache_entries
        self._verified: OrderedDict[bytes, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.seen = seen or SeenSessions()
        #: RSA verifications done and verifications answered from the cache (metrics).
        self.rsa_checks = 0
        self.cache_hits = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionVerifier:
        """Key and Redis from settings; SessionConfigError when either is missing or bad.

        Verified-session markers go to the broker Redis (``IS_REDIS_URL``/``IS_BROKER_URL``),
        which every bridge shares; the session Redis is the login service's, read only.
        """
        key = load_public_key(settings.session_public_key)
        client = session_redis(settings.sessions)
        marker_store = _broker_redis(settings) if settings.broker else None
        return cls(client, key, seen=SeenSessions(marker_store))

    def verify(self, pid: str, esaf: int) -> Session:
        """The session of ``pid`` if it is signed, matches ``pid`` and allows ``esaf``."""
        isauth, signature = self._fetch(pid, esaf)
        session = self._verified_session(pid, isauth, signature)
        if session.pid != pid:
            raise _refused(pid, 6)
        if not session.allows(esaf):
            raise AuthError(f"Process {pid} is not authorized for esaf {esaf}")
        self.seen.remember(pid, esaf)
        return session

    def close(self) -> None:
        """Release the Redis connections."""
        self._client.close()
        self.seen.close()

    def _fetch(self, pid: str, esaf: int) -> tuple[bytes, bytes]:
        """HMGET the two fields; codes (1)-(3) and (7) of spec 3.2-3.3 for a bad or
        missing hash."""
        try:
            reply: Any = self._client.hmget(pid, ["isAuth", "isAuthSig"])
        except redis.ResponseError:
            raise _refused(pid, 1) from None  # e.g. WRONGTYPE: the key is not a hash
        except redis.RedisError as exc:
            # The details (host, port) are for the log, not for web users.
            log.warning("session store unavailable: %s", exc)
            raise SessionStoreUnavailable("session store unavailable, try again") from None
        if not isinstance(reply, list) or len(reply) != 2:
            raise _refused(pid, 1)
        isauth, signature = reply
        if isauth is None and signature is None and self.seen.was_verified(pid, esaf):
            raise _refused(pid, 7)  # verified before, now gone: logged out or expired
        if not isinstance(isauth, bytes):
            raise _refused(pid, 2)  # no session: a pid never verified for this esaf
        if not isinstance(signature, bytes):
            raise _refused(pid, 3)
        return isauth, signature

    def _verified_session(self, pid: str, isauth: bytes, signature: bytes) -> Session:
        """Parsed isAuth after an RSA check, or from the cache of earlier checks."""
        digest = hashlib.sha256(len(isauth).to_bytes(8, "big") + isauth + signature).digest()
        with self._lock:
            cached = self._verified.get(digest)
            if cached is not None:
                self._verified.move_to_end(digest)
                self.cache_hits += 1
                return cached
            self.rsa_checks += 1
        if not self._signature_ok(isauth, signature):
            raise _refused(pid, 4)
        session = parse_isauth(isauth)
        if session is None:
            raise _refused(pid, 5)
        with self._lock:
            self._verified[digest] = session
            while len(self._verified) > self._cache_entries:
                self._verified.popitem(last=False)
        return session

    def _signature_ok(self, isauth: bytes, signature: bytes) -> bool:
        """RSA PKCS#1 v1.5 with SHA-256 over the exact isAuth bytes (OpenSSL defaults)."""
        try:
            raw = base64.b64decode(signature.strip(), validate=True)
            self._key.verify(raw, isauth, padding.PKCS1v15(), hashes.SHA256())
        except (binascii.Error, InvalidSignature, ValueError):
            return False
        return True


def parse_isauth(isauth: bytes) -> Session | None:
    """The fields of an isAuth JSON text, or None when it is not a JSON object."""
    try:
        value: Any = json.loads(isauth.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    pid, user, listed = value.get("pid"), value.get("uid"), value.get("allowedESAFs")
    esafs = listed if isinstance(listed, list) else []
    return Session(
        pid=pid if isinstance(pid, str) else None,
        user=user if isinstance(user, str) else None,
        allowed_esafs=frozenset(e for e in esafs if isinstance(e, int) and not isinstance(e, bool)),
    )


def _refused(pid: str, code: int) -> AuthError:
    """The original's numbered refusal (spec 3.4)."""
    return AuthError(f"Process {pid} is not authorized ({code})")
