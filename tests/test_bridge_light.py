"""The bridge stays light: importing it never loads numpy or h5py (conventions 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BRIDGE_MODULES = [
    "bridge.wire",
    "bridge.sessions",
    "queues.identity",
    "bridge.server",
    "bridge.proxy",
    "ops.client",
    "ops.devsession",
    "bridge.main",
    "bridge.metrics",
    "bridge.outcome",
    "istasks.logs",
    "istasks.replies",
]
HEAVY = ["numpy", "h5py", "hdf5plugin", "fabio", "PIL"]


def _loaded_heavy(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return [m for m in done.stdout.strip().split(",") if m]


def test_bridge_imports_no_numpy_or_h5py() -> None:
    assert _loaded_heavy(BRIDGE_MODULES) == []


def test_dispatch_path_imports_no_numpy_or_h5py() -> None:
    """What is-bridge loads at start-up besides its own modules (tasks helper's files)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bridge" / "dispatch.py").exists():
        pytest.skip("bridge/dispatch.py not written yet")
    assert _loaded_heavy(["bridge.dispatch", "istasks.app"]) == []
