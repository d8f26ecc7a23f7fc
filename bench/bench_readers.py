"""Format detection and single-image reads (Rayonix, Pilatus CBF, generic TIFF).

Budget: a whole image request should stay under 500 ms (spec 7); reading the raw frame
is one step of it, so each read here has a target well below that.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from bench.bench_pipeline import median_ms
from istasks.core.readers import detect_format, open_reader
from ops.testdata.cbf import write_cbf
from ops.testdata.marccd import write_marccd

REAL_MARCCD = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
REAL_MARCCD = REAL_MARCCD / "marccd165_Ge_blanc_0000.mccd"
REPEATS = 15


def _read(path: Path) -> Callable[[], object]:
    def action() -> object:
        reader = open_reader(str(path))
        try:
            return reader.read_frame(1)
        finally:
            reader.close()

    return action


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "rayonix MX-300 4096x4096 (generated)": write_marccd(tmp / "mx300.mccd", size=4096),
        "cbf PILATUS 6M 2527x2463 (generated)": write_cbf(tmp / "p6m.cbf"),
    }
    monitor = np.random.default_rng(0).integers(0, 1000, (4362, 4148), dtype=np.uint32)
    tifffile.imwrite(tmp / "monitor.tif", monitor)
    files["tiff 4362x4148 uint32"] = tmp / "monitor.tif"
    if REAL_MARCCD.is_file():
        files["rayonix MarCCD 165 2048x2048 (real)"] = REAL_MARCCD
    return files


def run() -> list[dict[str, Any]]:
    """Median times of detect_format and of open + read_frame + close per format."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(Path(tmp))
        mx300 = files["rayonix MX-300 4096x4096 (generated)"]
        rows.append(
            {
                "name": "detect_format (MarCCD)",
                "target": 1.0,
                "measured": median_ms(lambda: detect_format(str(mx300)), REPEATS),
                "unit": "ms",
            }
        )
        for label, path in files.items():
            rows.append(
                {
                    "name": f"open+read {label}",
                    "target": 150.0,
                    "measured": median_ms(_read(path), REPEATS),
                    "unit": "ms",
                }
            )
    return rows
