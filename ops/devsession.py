"""Development sessions: an RSA key pair and signed session hashes like the login service's.

The LS-CAT login service writes ``<pid>`` -> {isAuth, isAuthSig} into the session Redis
(spec 3.1). Without it (development, tests, ``isctl session add``) this module plays its
part with a local key pair; the bridge is then given the public half as
IS_SESSION_PUBLIC_KEY. Never used by the bridge itself.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PRIVATE_KEY_NAME = "session-private.pem"
PUBLIC_KEY_NAME = "session-public.pem"


def generate_keypair(directory: str | Path) -> tuple[Path, Path]:
    """Write a new RSA-2048 key pair into ``directory``; (private 0600, public) paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    # Create with 0600 from the start: never a moment where the key is world-readable.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    os.chmod(private_path, 0o600)  # O_CREAT's mode does not apply to an existing file
    public_path.write_bytes(public_pem)
    return private_path, public_path


def ensure_keypair(directory: str | Path) -> tuple[Path, Path]:
    """The key pair in ``directory``, generated on first use."""
    folder = Path(directory)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if private_path.is_file() and public_path.is_file():
        return private_path, public_path
    return generate_keypair(folder)


def matching_private_key(public_path: Path, private_path: Path) -> Path | None:
    """``private_path`` when it holds the private half of the PEM key at ``public_path``
    (so sessions signed with it verify); None when either is missing or they differ."""
    try:
        public = serialization.load_pem_public_key(public_path.read_bytes())
        private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(public, rsa.RSAPublicKey) or not isinstance(private, rsa.RSAPrivateKey):
        return None
    same = private.public_key().public_numbers() == public.public_numbers()
    return private_path if same else None


def isauth_for(pid: str, user: str, allowed_esafs: Iterable[int]) -> dict[str, Any]:
    """An isAuth object with the fields the server reads (spec 3.1)."""
    return {"pid": pid, "uid": user, "allowedESAFs": sorted(set(allowed_esafs))}


def sign_isauth(private_key_pem: bytes, isauth: dict[str, Any]) -> tuple[str, str]:
    """(isAuth JSON text, base64 RSA PKCS#1 v1.5 SHA-256 signature over its UTF-8 bytes)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("session signing key must be an RSA private key")
    text = json.dumps(isauth, separators=(",", ":"), sort_keys=True)
    signature = key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
    return text, base64.b64encode(signature).decode("ascii")


def write_session(
    client: redis.Redis,
    pid: str,
    isauth_text: str,
    sig: str,
    *,
    ttl_s: int | None = None,
) -> None:
    """Store the session hash as the login service does (optionally expiring)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(pid)
        pipe.hset(pid, mapping={"isAuth": isauth_text, "isAuthSig": sig})
        if ttl_s is not None:
            pipe.expire(pid, ttl_s)
        pipe.execute()


def delete_session(client: redis.Redis, pid: str) -> None:
    """Log a session out (the login service deletes the key)."""
    client.delete(pid)
