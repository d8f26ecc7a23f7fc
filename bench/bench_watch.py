"""``isctl prefetch --watch``: what watching a big beamline tree costs per poll.

A tree of 2000 datasets (ESAF/user/sample nesting, a master and three data files each:
8000 files in 2121 directories), last changed a minute ago, as a watcher meets it at
start. The start lists every directory once; a quiet poll must list none (one stat per
directory), and a poll that finds one new nested dataset lists only the directories on
its way. Local disk here; on NFS each stat is a GETATTR, often answered from the
client's attribute cache.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.prefetch_tree import DatasetTree

ESAFS, USERS, SAMPLES = 20, 5, 20
FILES = ("x_master.h5", "x_data_000001.h5", "x_data_000002.h5", "x_data_000003.h5")
TARGET_QUIET_POLL_MS = 100.0
REPEATS = 7


def _write_tree(root: Path) -> None:
    for esaf in range(ESAFS):
        for user in range(USERS):
            for sample in range(SAMPLES):
                directory = root / str(esaf) / f"u{user}" / f"s{sample}"
                directory.mkdir(parents=True)
                for name in FILES:
                    (directory / name).write_bytes(b"")
    past = time.time() - 60
    for directory, _, _ in os.walk(root):
        os.utime(directory, (past, past))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _measure(root: Path) -> list[dict[str, Any]]:
    tree = DatasetTree(root, 6)
    start = time.perf_counter()
    found = len(tree.scan())
    scan_ms = _ms(start)
    scanned = tree.listings
    quiet = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        tree.poll()
        quiet.append(_ms(start))
    relisted = tree.listings - scanned
    new = root / "3" / "u1" / "new" / "run"
    new.mkdir(parents=True)
    (new / "y_master.h5").write_bytes(b"")
    start = time.perf_counter()
    appeared, _ = tree.poll()
    change_ms = _ms(start)
    assert found == ESAFS * USERS * SAMPLES and len(appeared) == 1
    name = f"watch {found} datasets / {len(FILES) * found} files / {scanned} dirs"
    return [
        {"name": f"{name}: start (full listing)", "target": "", "measured": scan_ms, "unit": "ms"},
        {
            "name": f"{name}: quiet poll (median)",
            "target": TARGET_QUIET_POLL_MS,
            "measured": statistics.median(quiet),
            "unit": "ms",
        },
        {
            "name": f"{name}: directories listed by {REPEATS} quiet polls",
            "target": 0,
            "measured": relisted,
            "unit": "dirs",
        },
        {
            "name": f"{name}: poll finding 1 new nested dataset",
            "target": "",
            "measured": change_ms,
            "unit": "ms",
        },
    ]


def run() -> list[dict[str, Any]]:
    """Build the tree in a temporary directory and time a watcher's start and polls."""
    with tempfile.TemporaryDirectory(prefix="bench_watch_") as directory:
        _write_tree(Path(directory))
        rows = _measure(Path(directory))
    for row in rows:
        row["issue"] = 17
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
