"""Cold open of an Eiger2 X 16M master: ``EigerReader(path).read_frame(1)`` then close.

"First master" decodes the gzip'd 4362 x 4148 uint32 pixel_mask (the cache is emptied
before each repeat); "new master, same mask" is another run of the same detector (a copy
of the master, so the same stored mask), whose mask comes from the in-process cache after
reading and digesting the compressed chunks. Target: a cold view within 120 ms, of which
the frame read is ~30-60 ms.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from istasks.core.readers import eiger_mask
from istasks.core.readers.eiger import EigerReader
from istasks.core.readers.eiger_meta import PIXEL_MASK_PATH
from ops.testdata.eiger import write_eiger2_16m

TARGET_SAME_MASK_MS = 120.0
REPEATS = 7


def _median_ms(action: Callable[[], object], prepare: Callable[[], object] = lambda: None) -> float:
    """Median wall time of ``action`` (``prepare`` runs untimed before each call)."""
    times = []
    for _ in range(REPEATS):
        prepare()
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _cold_view(master: Path) -> None:
    with EigerReader(str(master)) as reader:
        reader.read_frame(1)


def _h5py_mask(master: Path) -> None:
    """The former decode: h5py's read of the whole mask, then the low-8-bit test."""
    with h5py.File(master, "r") as file:
        np.asarray((file[PIXEL_MASK_PATH][()] & 0xFF) != 0)


def _measure(master: Path) -> list[dict[str, Any]]:
    second = master.with_name("run2_master.h5")
    shutil.copyfile(master, second)
    _cold_view(master)  # page cache and imports warm, like a server that has run a while
    rows = [
        (
            "Eiger2 16M cold view, new master with a known mask",
            _median_ms(lambda: _cold_view(second), lambda: _cold_view(master)),
            TARGET_SAME_MASK_MS,
        ),
        (
            "Eiger2 16M cold view, first master (mask decoded)",
            _median_ms(lambda: _cold_view(master), eiger_mask.clear_cache),
            "",
        ),
        (
            "Eiger2 16M pixel_mask via plain h5py read (reference)",
            _median_ms(lambda: _h5py_mask(master)),
            "",
        ),
    ]
    return [{"name": n, "target": t, "measured": m, "unit": "ms"} for n, m, t in rows]


def run() -> list[dict[str, Any]]:
    """Write a one-frame 16M dataset into a temporary directory and time cold views."""
    with tempfile.TemporaryDirectory(prefix="bench_mask_") as directory:
        return _measure(write_eiger2_16m(Path(directory), nimages=1))


if __name__ == "__main__":
    for row in run():
        print(row)
