"""Which frames of an Eiger dataset being written are complete (``isctl prefetch --watch``).

The detector writes the master and then one data file after another, each frame by
frame, while users already look at the first ones. A frame is worth prefetching once
its data file is complete: a worker that opened a file mid-write could cache a view of
a frame not written yet. A data file is complete when it held still (size and mtime)
for a poll and, opened read-only as the invoking admin, its stack has every chunk
written and, when DECTRIS' ``image_nr_low``/``image_nr_high`` are there, as many frames
as they promise. Frames are placed by those attributes, else by the lengths of the files
before (which must then be complete too).

Only metadata is read here, never pixels; the worker reads those as the user.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from istasks.core.readers.eiger_frames import open_hdf5
from istasks.core.readers.eiger_meta import H5_ERRORS
from istasks.errors import DataUnavailable

DATA_GROUP = "/entry/data"
_LINK_NAME = re.compile(r"data_\d{6}")
Signature = tuple[int, int]  # (size, mtime_ns)


@dataclass(frozen=True)
class Stack:
    """A complete data file's frames: count, and the attributes' range if present."""

    count: int
    low: int | None = None
    high: int | None = None


def data_files(master: Path) -> list[Path]:
    """The master's external data files in link order (empty: frames inside the master or
    not an Eiger master). Relative targets are beside the master, as DECTRIS writes them."""
    try:
        with open_hdf5(master) as file:
            group = file.get(DATA_GROUP)
            if not isinstance(group, h5py.Group):
                return []
            names = sorted(n for n in group if _LINK_NAME.fullmatch(n))
            links = [group.get(n, getlink=True) for n in names]
    except (*H5_ERRORS, DataUnavailable):
        return []
    paths = []
    for link in links:
        if isinstance(link, h5py.ExternalLink):
            target = Path(link.filename)
            paths.append(target if target.is_absolute() else master.parent / target)
    return paths


def complete_stack(path: Path) -> Stack | None:
    """The data file's frames when it is completely written, else None."""
    try:
        with open_hdf5(path) as file:
            data = file.get(f"{DATA_GROUP}/data")
            if not isinstance(data, h5py.Dataset) or data.ndim != 3:
                return None
            return _stack_if_written(data)
    except (*H5_ERRORS, DataUnavailable):  # mid-write files fail in many ways
        return None


def _stack_if_written(data: h5py.Dataset) -> Stack | None:
    count = int(data.shape[0])
    if count < 1:
        return None
    if data.chunks is not None:
        per_axis = zip(data.shape, data.chunks, strict=True)
        expected = math.prod(math.ceil(size / chunk) for size, chunk in per_axis)
        if data.id.get_num_chunks() < expected:
            return None  # frames not written yet read as fill values: never prefetch them
    low, high = data.attrs.get("image_nr_low"), data.attrs.get("image_nr_high")
    if low is None or high is None:
        return Stack(count)
    low, high = int(low), int(high)
    if high - low + 1 != count:
        return None  # the attributes promise more frames than the stack holds yet
    return Stack(count, low, high)


@dataclass
class DataFiles:
    """The data files of one dataset being written, and the frames they completed."""

    paths: list[Path]
    signatures: dict[Path, Signature] = field(default_factory=dict)
    stacks: dict[Path, Stack] = field(default_factory=dict)

    def look(self) -> bool:
        """Check the files not complete yet; True when one completed."""
        completed = False
        for path in self.paths:
            if path in self.stacks:
                continue
            signature = _signature(path)
            if signature is None or signature != self.signatures.get(path):
                self.signatures[path] = signature or (-1, -1)
                continue  # new or still growing: look again at the next poll
            stack = complete_stack(path)
            if stack is not None:
                self.stacks[path] = stack
                completed = True
        return completed

    def ready(self) -> set[int]:
        """Frame numbers held by complete data files."""
        frames: set[int] = set()
        start: int | None = 1  # where the next file's frames begin, while known
        for path in self.paths:
            stack = self.stacks.get(path)
            if stack is not None and stack.low is not None and stack.high is not None:
                frames.update(range(stack.low, stack.high + 1))
                start = stack.high + 1
            elif stack is not None and start is not None:
                frames.update(range(start, start + stack.count))
                start += stack.count
            else:
                start = None
        return frames

    @property
    def complete(self) -> bool:
        """Every data file is complete."""
        return len(self.stacks) == len(self.paths)


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
