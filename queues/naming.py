"""Queue names: the one definition of how a UID:GID identity names its Celery queues.

Interactive work goes to ``"<uid>:<gid>"``; admin prefetch to ``"<uid>:<gid>:prefetch"``
so that a worker can serve views first. Both directions are here and round-trip; any
other text is rejected, so a queue name can never smuggle in a different identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFETCH_SUFFIX = "prefetch"
_QUEUE_RE = re.compile(r"(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})(?::(prefetch))?")
_MAX_ID = 2**32 - 2  # (uid_t)-1 is "no change" for setuid, never a real id


@dataclass(frozen=True, order=True)
class Identity:
    """A Unix identity work runs as: the user's uid and the ESAF's gid."""

    uid: int
    gid: int

    def __post_init__(self) -> None:
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, not {value!r}")
            if not 0 <= value <= _MAX_ID:
                raise ValueError(f"{name} {value} out of range")

    @property
    def queue(self) -> str:
        """Interactive queue name ``uid:gid``."""
        return queue_name(self.uid, self.gid)

    @property
    def prefetch_queue(self) -> str:
        """Low-priority queue for admin prefetch."""
        return prefetch_queue_name(self.uid, self.gid)

    @property
    def is_root(self) -> bool:
        """True when either id is 0: such work is always refused."""
        return self.uid == 0 or self.gid == 0


def queue_name(uid: int, gid: int) -> str:
    """``uid:gid``, validated."""
    ident = Identity(uid, gid)
    return f"{ident.uid}:{ident.gid}"


def prefetch_queue_name(uid: int, gid: int) -> str:
    """``uid:gid:prefetch``, validated."""
    return f"{queue_name(uid, gid)}:{PREFETCH_SUFFIX}"


def parse_queue_name(name: str) -> tuple[Identity, bool]:
    """Inverse of the two builders: ``(identity, is_prefetch)``; ValueError otherwise."""
    match = _QUEUE_RE.fullmatch(name)
    if match is None:
        raise ValueError(f"not a queue name: {name!r}")
    return Identity(int(match[1]), int(match[2])), match[3] is not None
