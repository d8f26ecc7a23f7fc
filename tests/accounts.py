"""Test accounts and signed sessions.

As root, real users (``istu_<hex>``) and ESAF accounts (``e<esaf>``, esaf > 40000, each
with its own group) are created with useradd and removed afterwards. Otherwise the
current user stands in (esaf <= 40000 then maps to the user's primary gid) and tests
that need other accounts are skipped. Fixtures: ``accounts`` (factory, one per test
session) and ``session_keys`` (an RSA key pair written once per test session).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.devsession import generate_keypair

#: Exit codes of useradd/userdel/groupdel meaning "the account files are locked".
_LOCKED_CODES = {1, 10}


@dataclass(frozen=True)
class Account:
    """A Unix account as NSS reports it."""

    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> Account:
        entry = pwd.getpwnam(name)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class SessionKeys:
    """A session signing key pair on disk."""

    private_pem: bytes
    public_path: Path


class Accounts:
    """Hands out accounts; removes the ones it created in :meth:`cleanup`."""

    def __init__(self) -> None:
        self.can_create = os.geteuid() == 0 and shutil.which("useradd") is not None
        self._created: list[str] = []
        self._shared: Account | None = None

    def shared_user(self) -> Account:
        """One user reused by every test of the session (saves a useradd per test)."""
        if self._shared is None:
            self._shared = self.user()
        return self._shared

    def user(self) -> Account:
        """A non-root user: a fresh account as root, else the current user."""
        if not self.can_create:
            return Account.named(pwd.getpwuid(os.getuid()).pw_name)
        name = f"istu_{secrets.token_hex(4)}"
        return self._useradd(name)

    def esaf(self, *, gid: int | None = None) -> tuple[int, Account]:
        """(esaf, account ``e<esaf>``) with its own group, or ``gid`` as primary group.

        Skips the test when accounts cannot be created (not root).
        """
        if not self.can_create:
            pytest.skip("creating ESAF accounts needs root")
        for _ in range(50):
            esaf = 900_000 + secrets.randbelow(99_999)
            try:
                pwd.getpwnam(f"e{esaf}")
            except KeyError:
                return esaf, self._useradd(f"e{esaf}", gid=gid)
        raise RuntimeError("no free ESAF account name found")

    def cleanup(self) -> None:
        """Delete every account (and its user group) created here."""
        for name in reversed(self._created):
            _run_retrying(["userdel", name], allow_missing=True)
            _run_retrying(["groupdel", name], allow_missing=True)
        self._created.clear()

    def _useradd(self, name: str, *, gid: int | None = None) -> Account:
        group = ["-g", str(gid)] if gid is not None else ["-U"]
        _run_retrying(["useradd", "-M", "-s", "/usr/sbin/nologin", *group, name])
        self._created.append(name)
        return Account.named(name)


def _run_retrying(argv: list[str], *, allow_missing: bool = False) -> None:
    """Run an account tool; other test runs may hold the lock on /etc/passwd briefly."""
    for _ in range(50):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if allow_missing and done.returncode in {6}:  # no such user/group
            return
        if done.returncode not in _LOCKED_CODES:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """Account factory for the whole test session; created accounts are removed at the end."""
    factory = Accounts()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> SessionKeys:
    """An RSA-2048 session key pair (generated once: it takes tens of milliseconds)."""
    private_path, public_path = generate_keypair(tmp_path_factory.mktemp("session-keys"))
    return SessionKeys(private_path.read_bytes(), public_path)
