"""``isctl prefetch --watch DIR``: prefetch each new dataset while the detector writes it.

The tree under DIR is polled down to ``IS_PREFETCH_WATCH_DEPTH`` directories (beamline
storage is often NFS or GPFS, where inotify misses writes made on other hosts): listed
once at start, then only the directories that changed (ops.prefetch_tree). Datasets
already there at start are left alone. A new dataset file is planned once its size and
mtime held still for one poll and the admin can open it; an Eiger master's frames are
then sent as their data files are completed (ops.prefetch_eiger), other files' at once.
A frame the worker reports missing (not written yet) ends that dataset's turn: the rest
is retried on later polls until every frame is done or failed, or nothing has
progressed for ``give_up_s``. State is kept only for the datasets in progress and the
names of finished ones that still exist, so memory follows the tree, not the watcher's
age.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from istasks.errors import IsError, WorkerUnavailable
from istasks.prefetch_task import DONE, MISSING, TIMEOUT, PrefetchError
from istasks.settings import Settings
from ops.prefetch import (
    FrameTask,
    Options,
    Outcome,
    Sender,
    Window,
    frame_count,
    frame_numbers,
    run_tasks,
)
from ops.prefetch_eiger import DataFiles, data_files
from ops.prefetch_progress import ProgressBar, Tally
from ops.prefetch_tree import DatasetTree
from queues.naming import Identity

DEFAULT_INTERVAL_S = 2.0
#: Directories below DIR that are watched (the settings' default, IS_PREFETCH_WATCH_DEPTH).
DEFAULT_DEPTH = Settings.prefetch_watch_depth
#: A dataset with no new frame for this long is reported and dropped.
DEFAULT_GIVE_UP_S = 600.0


@dataclass
class Watched:
    """A dataset being prefetched as it is written."""

    path: str
    progress_s: float  # time.monotonic() of the last step forward
    signature: tuple[int, int] | None = None  # (size, mtime_ns) at the previous poll
    frames: range | None = None  # known once the file could be opened
    data: DataFiles | None = None  # an Eiger master's data files; None: all frames ready
    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)

    def remaining(self) -> list[int]:
        """Frames neither done nor failed, in order."""
        frames = self.frames or range(0)
        return [n for n in frames if n not in self.done and n not in self.failed]

    def pending(self) -> list[int]:
        """Remaining frames whose data is complete: the ones to send now."""
        if self.data is None:
            return self.remaining()
        ready = self.data.ready()
        return [n for n in self.remaining() if n in ready]


class Watcher:
    """Polls one directory tree and prefetches what appears in it through ``sender``."""

    def __init__(
        self,
        sender: Sender,
        directory: Path,
        options: Options,
        *,
        depth: int = DEFAULT_DEPTH,
        give_up_s: float = DEFAULT_GIVE_UP_S,
        progress: ProgressBar | None = None,
    ) -> None:
        self._sender, self._options = sender, options
        self.tree = DatasetTree(directory, depth)
        self._give_up_s, self._progress = give_up_s, progress
        self._active: dict[str, Watched] = {}
        self._finished: set[str] = set()
        self.tally = Tally()
        self.started = threading.Event()  # set once the files already there are listed

    def run(self, interval_s: float, stop: threading.Event | None = None) -> Tally:
        """Poll every ``interval_s`` until ``stop`` is set (or Ctrl-C); the tally."""
        stop = stop or threading.Event()
        self._finished = self.tree.scan()  # what is already there is not new
        self.started.set()
        while not stop.wait(interval_s):
            self.poll()
        return self.tally

    def poll(self) -> None:
        """One look at what changed in the tree, then one turn for every dataset in
        progress."""
        appeared, vanished = self.tree.poll()
        now = time.monotonic()
        for path in sorted(appeared - self._finished - self._active.keys()):
            self._active[path] = Watched(path, now)
        for path in sorted(vanished & self._active.keys()):
            self._finish(self._active[path], "", error=f"{path}: removed before it was done")
        self._finished -= vanished  # forget names that are gone: bounded by the tree
        for state in list(self._active.values()):
            try:
                self._advance(state, now)
            except WorkerUnavailable as exc:
                self._say(f"prefetch: {exc.wire_text()}; retrying at the next poll")
                return

    @property
    def tracked(self) -> int:
        """File names held: datasets in progress and finished ones still present."""
        return len(self._active) + len(self._finished)

    def _advance(self, state: Watched, now: float) -> None:
        if state.frames is None and not self._open(state, now):
            if state.path in self._active:  # not dropped as unfit for --frames
                self._maybe_give_up(state, now, "not readable")
            return
        if state.data is not None and state.data.look():  # a data file was completed
            state.progress_s = now
        before = len(state.done) + len(state.failed)
        tasks = (FrameTask(state.path, n) for n in state.pending())
        flight = Window(self._sender, self._options)
        run_tasks(flight, tasks, lambda outcome: self._record(state, outcome))
        now = time.monotonic()  # a turn may have taken minutes
        if len(state.done) + len(state.failed) > before:
            state.progress_s = now
        if not state.remaining():
            self._finish(state, f"prefetched {state.path}: {len(state.done)} frame(s)")
        else:
            self._maybe_give_up(state, now, f"{len(state.done)}/{len(state.frames or ())} done")

    def _open(self, state: Watched, now: float) -> bool:
        """Plan the dataset once it held still for a poll; False while not ready."""
        try:
            st = os.stat(state.path)
        except OSError:
            return False
        signature = (st.st_size, st.st_mtime_ns)
        if signature != state.signature:
            state.signature, state.progress_s = signature, now
            return False
        try:
            count = frame_count(Path(state.path))
            state.frames = frame_numbers(Path(state.path), count, self._options.frames)
        except PrefetchError as exc:  # --frames does not fit: it never will
            self._finish(state, "", error=exc.wire_text())
            return False
        except IsError:  # not complete yet (or never readable: see give_up_s)
            return False
        if state.path.endswith("_master.h5"):
            paths = data_files(Path(state.path))
            state.data = DataFiles(paths) if paths else None
        self.tally.total += len(state.frames)
        self._draw()
        return True

    def _record(self, state: Watched, outcome: Outcome) -> bool:
        """Note one result; False (stop sending) when the data ran out or no answer."""
        frame = outcome.task.frame
        if outcome.status == DONE:
            state.done.add(frame)
            self.tally.done += 1
        elif outcome.status == TIMEOUT:  # the frame stays pending
            self._say(f"prefetch: {outcome.describe()}")
        elif outcome.status != MISSING:
            state.failed.add(frame)
            self.tally.errors.append(outcome.describe())
        self._draw()
        return outcome.status not in (MISSING, TIMEOUT)

    def _maybe_give_up(self, state: Watched, now: float, where: str) -> None:
        if now - state.progress_s >= self._give_up_s:
            idle_s = now - state.progress_s
            self._finish(state, "", error=f"{state.path}: gave up after {idle_s:.0f} s ({where})")

    def _finish(self, state: Watched, text: str, *, error: str = "") -> None:
        self._active.pop(state.path, None)
        self._finished.add(state.path)
        if error:
            self.tally.errors.append(error)
        self._say(text or f"prefetch: {error}")

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.message(text)
            self._draw()

    def _draw(self) -> None:
        if self._progress is not None:
            self._progress.draw(self.tally)


def command(
    settings: Settings,
    identity: Identity,
    options: Options,
    directory: Path,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    give_up_s: float = DEFAULT_GIVE_UP_S,
    depth: int | None = None,
    stop: threading.Event | None = None,
    err: TextIO | None = None,
) -> int:
    """``isctl prefetch --watch DIR``: runs until Ctrl-C (or ``stop``); exit status 0 when
    nothing failed."""
    if not directory.is_dir():
        raise PrefetchError(f"--watch {directory}: not a directory")
    if interval_s <= 0:
        raise PrefetchError(f"--interval {interval_s:g}: must be > 0")
    progress = ProgressBar(err or sys.stderr)
    depth = settings.prefetch_watch_depth if depth is None else depth
    if depth < 0:
        raise PrefetchError(f"--depth {depth}: must be >= 0")
    sender = Sender(settings, identity)
    watcher = Watcher(
        sender, directory, options, depth=depth, give_up_s=give_up_s, progress=progress
    )
    progress.message(
        f"prefetch: watching {directory} ({depth} levels deep) for {identity.prefetch_queue}"
        " (Ctrl-C stops)"
    )
    try:
        watcher.run(interval_s, stop)
    except KeyboardInterrupt:
        pass
    finally:
        sender.close()
    tree = watcher.tree
    progress.message(f"prefetch: {tree.directories} directories watched, {tree.listings} listed")
    progress.finish(watcher.tally)
    return 1 if watcher.tally.errors else 0
