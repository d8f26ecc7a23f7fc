"""The formats of issue 18 at 16M pixels: read+decode, and end to end to a 1024 px JPEG.

One file of each new kind, written at run time by the real tools: SMV (fabio's ADSC
writer, uint16), MAR345 (pck), Bruker v100, EDF (float32), R-AXIS (written here in
fabio's layout: fabio has no R-AXIS writer) at 4096 x 4096, and an NXmx
master by nexgen with an int32 virtual dataset over a bslz4 data file at the Eiger2 16M
size (4362 x 4148, -1 in the gaps). "read" is open + read_frame + close, as a worker's
cache miss does; "end to end" adds the reduction to 1024 px, statistics, contrast and
JPEG (what ``isctl render`` runs). Run: ``.venv/bin/python -m bench formats``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_pipeline import median_ms
from istasks.core.params import ContrastParams, LabelParams, ViewParams
from istasks.core.readers import open_reader
from istasks.core.view import reduce_frame, render_jpeg
from ops.testdata.fabio_files import (
    pattern,
    write_bruker100,
    write_edf,
    write_mar345,
    write_raxis,
    write_smv,
)
from ops.testdata.nxmx import write_nxmx

SIDE = 4096
EIGER2_16M = (4362, 4148)
REPEATS = 7
#: Spec 7: a whole image request within 500 ms; the read is one step of it.
READ_TARGET_MS, E2E_TARGET_MS = 250.0, 500.0
VIEW = ViewParams(xsize=1024)
CONTRAST = ContrastParams(wval=0, contrast=-1)
LABEL = LabelParams(text="bench", height=16)


def _read(path: Path, frame: int = 1) -> Any:
    reader = open_reader(str(path))
    try:
        return reader.read_frame(frame)
    finally:
        reader.close()


def _end_to_end(path: Path) -> bytes:
    reduced = reduce_frame(_read(path), VIEW)
    return render_jpeg(reduced, CONTRAST, LABEL).jpeg.data


def _files(tmp: Path) -> dict[str, Path]:
    counts = pattern((SIDE, SIDE), top=2**20)
    return {
        "SMV/ADSC 4096x4096 uint16": write_smv(tmp / "x.img", np.minimum(counts, 50000)),
        "MAR345 4096x4096 pck": write_mar345(tmp / "x.mar4096", counts),
        "Bruker v100 4096x4096": write_bruker100(tmp / "x.sfrm", counts),
        "R-AXIS 4096x4096 (hand-written)": write_raxis(tmp / "x.osc", np.minimum(counts, 30000)),
        "EDF 4096x4096 float32": write_edf(tmp / "x.edf", [counts.astype(np.float32)]),
        "NXmx VDS 4362x4148 int32 bslz4 (nexgen)": write_nxmx(
            tmp, "nx", frames=2, shape=EIGER2_16M, layout="both"
        ),
    }


def run() -> list[dict[str, Any]]:
    """Median read and end-to-end times per format."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in _files(Path(tmp)).items():
            read_ms = median_ms(lambda path=path: _read(path), REPEATS)
            e2e_ms = median_ms(lambda path=path: _end_to_end(path), REPEATS)
            rows.append(
                {
                    "name": f"read {label}",
                    "target": READ_TARGET_MS,
                    "measured": read_ms,
                    "unit": "ms",
                }
            )
            rows.append(
                {
                    "name": f"end to end {label}",
                    "target": E2E_TARGET_MS,
                    "measured": e2e_ms,
                    "unit": "ms",
                }
            )
    return rows
