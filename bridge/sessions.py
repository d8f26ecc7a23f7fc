"""Session verification against the login service's Redis hash (spec 3.1-3.4).

Every request reads ``HMGET <pid> isAuth isAuthSig`` (one round trip), so a logout (the
key deleted) refuses the very next request, and the signature, pid and ESAF list are
checked every time (fixes bugs 21, 22). The RSA verification itself is cached by a digest
of the exact (isAuth, isAuthSig) bytes: repeat requests cost no public-key operation.
A deleted key gives "(2)" as the original's missing-session path did; "(7)" is not used
because the existence check and the full check are now the same step.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from redis.backoff import NoBackoff
from redis.retry import Retry

from istasks.errors import AuthError, IsError
from istasks.settings import Settings

log = logging.getLogger(__name__)

#: Verified sessions remembered (LRU); one entry is a few hundred bytes.
VERIFIED_CACHE_ENTRIES = 4096
#: Smallest RSA key accepted for session signatures (the login service uses 2048).
MIN_KEY_BITS = 2048


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


class SessionVerifier:
    """Checks one request's (pid, esaf) against its signed session; thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        public_key: rsa.RSAPublicKey,
        *,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
    ) -> None:
        self._client = client
        self._key = public_key
        self._cache_entries = cache_entries
        self._verified: OrderedDict[bytes, Session] = OrderedDict()
        self._lock = threading.Lock()
        #: RSA verifications done and verifications answered from the cache (metrics).
        self.rsa_checks = 0
        self.cache_hits = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionVerifier:
        """Key and Redis from settings; SessionConfigError when either is missing or bad."""
        key = load_public_key(settings.session_public_key)
        return cls(session_redis(settings.sessions), key)

    def verify(self, pid: str, esaf: int) -> Session:
        """The session of ``pid`` if it is signed, matches ``pid`` and allows ``esaf``."""
        isauth, signature = self._fetch(pid)
        session = self._verified_session(pid, isauth, signature)
        if session.pid != pid:
            raise _refused(pid, 6)
        if not session.allows(esaf):
            raise AuthError(f"Process {pid} is not authorized for esaf {esaf}")
        return session

    def close(self) -> None:
        """Release the Redis connections."""
        self._client.close()

    def _fetch(self, pid: str) -> tuple[bytes, bytes]:
        """HMGET the two fields; codes (1)-(3) of spec 3.2 for a bad or missing hash."""
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
        if not isinstance(isauth, bytes):
            raise _refused(pid, 2)  # no session: unknown pid, expired or logged out
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
