"""Which Unix identity a verified request runs as (spec 3.5, Appendix A).

Accounts are looked up through NSS (``pwd``), so LDAP accounts work as they did for the
original. Policy "user" (original): uid of the web user's account, gid of the ESAF
account ``e<esaf>`` when esaf > 40000, else the user's own primary gid. Policy "esaf"
(2025 fork): uid and gid of ``e<esaf>``; esaf must be > 0 (the fork ran such requests as
root, we refuse them). Unknown accounts, uid/gid 0 and ids outside the configured ranges
give an IdentityError reply instead of the original's silent hang (bug 10).
"""

from __future__ import annotations

import pwd
import threading
import time
from dataclasses import dataclass

from istasks.errors import IdentityError
from istasks.settings import Settings
from queues.naming import Identity

POLICIES = ("user", "esaf")
#: ESAF numbers above this have their own account ``e<esaf>`` (isStartProcess).
ESAF_ACCOUNT_MIN = 40000
#: How long a resolved identity is reused; bounds NSS/LDAP lookups to one per minute.
IDENTITY_CACHE_TTL_S = 60.0


def esaf_account(esaf: int) -> str:
    """Name of the Unix account that owns ESAF ``esaf``'s data."""
    return f"e{esaf}"


@dataclass(frozen=True)
class IdRange:
    """Inclusive range of acceptable uids or gids."""

    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high


class IdentityResolver:
    """Maps (session, esaf) to a :class:`~queues.naming.Identity`; thread-safe, cached."""

    def __init__(
        self,
        policy: str,
        *,
        uids: IdRange,
        gids: IdRange,
        cache_ttl_s: float = IDENTITY_CACHE_TTL_S,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"IS_IDENTITY_POLICY must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self._uids, self._gids = uids, gids
        self._ttl_s = cache_ttl_s
        self._cache: dict[tuple[str | None, int], tuple[float, Identity]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> IdentityResolver:
        """Policy and id ranges from settings."""
        return cls(
            settings.identity_policy,
            uids=IdRange(settings.uid_min, settings.uid_max),
            gids=IdRange(settings.gid_min, settings.gid_max),
        )

    def resolve(self, user: str | None, esaf: int) -> Identity:
        """The identity for a request of Unix account ``user`` (the session's
        ``isAuth.uid``; None when the session names none) on ``esaf``, or IdentityError."""
        key = (user, esaf)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        identity = self._lookup(user, esaf)
        with self._lock:
            if len(self._cache) > 10_000:  # bound memory; entries are cheap to redo
                self._cache.clear()
            self._cache[key] = (now, identity)
        return identity

    def _lookup(self, user: str | None, esaf: int) -> Identity:
        if self.policy == "esaf":
            if esaf <= 0:
                raise IdentityError("esaf identity policy needs an ESAF number > 0")
            account = _account(esaf_account(esaf))
            return self._checked(account.pw_uid, account.pw_gid)
        if user is None:
            raise IdentityError("session has no user name (isAuth.uid)")
        person = _account(user)
        gid = _account(esaf_account(esaf)).pw_gid if esaf > ESAF_ACCOUNT_MIN else person.pw_gid
        return self._checked(person.pw_uid, gid)

    def _checked(self, uid: int, gid: int) -> Identity:
        if uid == 0 or gid == 0:
            raise IdentityError("refusing to run as uid 0 or gid 0")
        if uid not in self._uids:
            raise IdentityError(f"uid {uid} outside {self._uids.low}..{self._uids.high}")
        if gid not in self._gids:
            raise IdentityError(f"gid {gid} outside {self._gids.low}..{self._gids.high}")
        return Identity(uid, gid)


def _account(name: str) -> pwd.struct_passwd:
    """NSS lookup of one account; IdentityError when it does not exist."""
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise IdentityError(f"no Unix account {name!r}") from None
