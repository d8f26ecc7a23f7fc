"""The dataset files of a directory tree, polled at bounded depth (``isctl prefetch --watch``).

Beamlines write each dataset into its own nested directory (ESAF/user/sample/...), on
NFS or GPFS where inotify misses what other hosts write, so the tree is polled. The
whole tree is listed once at start; after that each poll stats every known directory
(one ``stat`` each, whatever the number of files) and lists again only the ones whose
mtime changed, which is what creating, removing or renaming an entry does. A listing
taken within :data:`RACY_S` of its directory's mtime is taken again at the next poll:
coarse timestamps (1 s on some servers) cannot tell two changes in one tick apart.

Symlinks never lead out of the tree: a symlinked directory is not entered (inside the
tree it would only show a dataset twice), and a symlinked dataset file counts only
when it resolves to a regular file inside the tree.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

#: What a directory holds that is worth prefetching: Eiger masters, MarCCD, CBF.
DATASET_PATTERNS = ("*_master.h5", "*.mccd", "*.cbf")
#: A listing this close to its directory's mtime is not trusted to have seen every change.
RACY_S = 2.0


def is_dataset_name(name: str) -> bool:
    """True for the file names :data:`DATASET_PATTERNS` selects."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in DATASET_PATTERNS)


@dataclass
class _Listing:
    """What one directory held when it was last listed."""

    depth: int
    mtime_ns: int
    listed_ns: int  # wall clock, comparable with the (server's) mtime
    subdirs: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)

    @property
    def racy(self) -> bool:
        """Listed so soon after a change that a second change may share its mtime."""
        return self.listed_ns - self.mtime_ns < RACY_S * 1e9


class DatasetTree:
    """The dataset files under ``root`` down to ``max_depth`` directories below it."""

    def __init__(self, root: Path, max_depth: int) -> None:
        if max_depth < 0:
            raise ValueError(f"watch depth {max_depth} must be >= 0")
        self.root = os.path.abspath(root)
        self._real_root = os.path.realpath(root)
        self.max_depth = max_depth
        self._dirs: dict[str, _Listing] = {}
        self.listings = 0  # directories listed so far (the cost of watching)

    @property
    def datasets(self) -> set[str]:
        """Absolute paths of every dataset file known now."""
        return {os.path.join(d, n) for d, listing in self._dirs.items() for n in listing.datasets}

    @property
    def directories(self) -> int:
        """Directories watched."""
        return len(self._dirs)

    def scan(self) -> set[str]:
        """List the whole tree (the start); every dataset file in it."""
        self._dirs.clear()
        self._visit(self.root, 0, set())
        return self.datasets

    def poll(self) -> tuple[set[str], set[str]]:
        """Look again at what changed: (dataset files that appeared, ones that went)."""
        appeared: set[str] = set()
        vanished: set[str] = set()
        for directory in sorted(self._dirs):  # parents before their children
            listing = self._dirs.get(directory)
            if listing is None:  # dropped with a parent earlier in this poll
                continue
            mtime_ns = self._mtime_ns(directory)
            if mtime_ns is None:
                vanished |= self._drop(directory)
            elif mtime_ns != listing.mtime_ns or listing.racy:
                self._relist(directory, listing, appeared, vanished)
        return appeared - vanished, vanished - appeared

    def _relist(
        self, directory: str, old: _Listing, appeared: set[str], vanished: set[str]
    ) -> None:
        new = self._list(directory, old.depth)
        if new is None:
            vanished |= self._drop(directory)
            return
        self._dirs[directory] = new
        appeared |= {os.path.join(directory, n) for n in new.datasets - old.datasets}
        vanished |= {os.path.join(directory, n) for n in old.datasets - new.datasets}
        for name in sorted(old.subdirs - new.subdirs):
            vanished |= self._drop(os.path.join(directory, name))
        for name in sorted(new.subdirs - old.subdirs):
            appeared |= self._visit(os.path.join(directory, name), old.depth + 1, set())

    def _visit(self, directory: str, depth: int, found: set[str]) -> set[str]:
        """List ``directory`` and everything below it within the depth; add to ``found``."""
        listing = self._list(directory, depth)
        if listing is None:
            return found
        self._dirs[directory] = listing
        found |= {os.path.join(directory, n) for n in listing.datasets}
        for name in sorted(listing.subdirs):
            self._visit(os.path.join(directory, name), depth + 1, found)
        return found

    def _drop(self, directory: str) -> set[str]:
        """Forget ``directory`` and its subtree; the dataset files they held."""
        gone: set[str] = set()
        prefix = directory + os.sep
        for path in [d for d in self._dirs if d == directory or d.startswith(prefix)]:
            gone |= {os.path.join(path, n) for n in self._dirs.pop(path).datasets}
        return gone

    def _list(self, directory: str, depth: int) -> _Listing | None:
        """One directory's subdirectories (within the depth) and dataset files."""
        mtime_ns = self._mtime_ns(directory)
        if mtime_ns is None:
            return None
        listing = _Listing(depth, mtime_ns, time.time_ns())
        self.listings += 1
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    self._classify(entry, listing)
        except OSError:  # removed or unreadable meanwhile: seen again at the next poll
            listing.subdirs.clear()
            listing.datasets.clear()
        return listing

    def _classify(self, entry: os.DirEntry[str], listing: _Listing) -> None:
        try:
            if entry.is_symlink():
                if is_dataset_name(entry.name) and self._inside(entry.path):
                    listing.datasets.add(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                if listing.depth < self.max_depth:
                    listing.subdirs.add(entry.name)
            elif entry.is_file(follow_symlinks=False) and is_dataset_name(entry.name):
                listing.datasets.add(entry.name)
        except OSError:  # vanished between the listing and the look
            pass

    def _inside(self, link: str) -> bool:
        """A symlinked dataset file counts when it is a regular file inside the tree."""
        target = os.path.realpath(link)
        if os.path.commonpath([target, self._real_root]) != self._real_root:
            return False
        try:
            return stat.S_ISREG(os.stat(target).st_mode)
        except OSError:
            return False

    def _mtime_ns(self, directory: str) -> int | None:
        """The directory's mtime; None when it is gone or no longer a directory (the root
        may be a symlink: the admin named it; anything below may not)."""
        try:
            st = os.stat(directory, follow_symlinks=directory == self.root)
        except OSError:
            return None
        return st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else None
