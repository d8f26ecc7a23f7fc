"""Signed, time-limited task envelopes (itsdangerous).

Whoever can write to the broker must not be able to make one identity's worker serve
another's request. So every task message carries a token signed with a key derived from
a master secret *and the queue name*; the bridge holds the master secret, each worker is
given only its own queue's key and refuses any task whose signature, age or queue does
not match.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from itsdangerous import BadData, BadSignature, SignatureExpired, URLSafeTimedSerializer

from istasks.errors import EnvelopeError

_SALT = "is-task-envelope-v1"
_DERIVE_LABEL = b"is-queue-key-v1:"


def queue_key(master_secret: bytes, queue: str) -> bytes:
    """Key for one queue: HMAC-SHA256(master, label + queue). Hex so it fits in env/files."""
    digest = hmac.new(master_secret, _DERIVE_LABEL + queue.encode(), hashlib.sha256)
    return digest.hexdigest().encode()


def _serializer(key: bytes) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(key, salt=_SALT)


def seal(master_secret: bytes, queue: str, payload: dict[str, Any]) -> str:
    """Sign ``payload`` for ``queue`` (the queue name is inside the signed data)."""
    return str(_serializer(queue_key(master_secret, queue)).dumps({"q": queue, "p": payload}))


def open_envelope(key: bytes, queue: str, token: str, max_age_s: float) -> dict[str, Any]:
    """Verify a token with this worker's queue key; return the payload or EnvelopeError."""
    try:
        data = _serializer(key).loads(token, max_age=math.ceil(max_age_s))
    except SignatureExpired as exc:
        raise EnvelopeError("task envelope expired") from exc
    except BadSignature as exc:
        raise EnvelopeError("task envelope signature invalid") from exc
    except BadData as exc:  # signed, but the payload does not decode (e.g. nested too deep)
        raise EnvelopeError("task envelope payload unreadable") from exc
    if not isinstance(data, dict) or data.get("q") != queue or not isinstance(data.get("p"), dict):
        raise EnvelopeError("task envelope is for another queue")
    payload: dict[str, Any] = data["p"]
    return payload
