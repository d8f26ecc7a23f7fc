"""Reading one Eiger2 X 16M frame (4362 x 4148 uint32, bitshuffle+LZ4), fast path vs h5py.

Target (field notes 5.2): read + decompress one frame in under 60 ms. The fast path is
``EigerReader.read_frame`` (``read_direct_chunk`` + bslz4 blocks decoded in threads); the
reference is a plain h5py slab read through hdf5plugin's filter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bench.bench_pipeline import median_ms
from istasks.core import bslz4
from istasks.core.readers.eiger import EigerReader
from ops.testdata.eiger import write_eiger2_16m

TARGET_MS = 60.0
REPEATS = 15
FRAMES = 2


def _measure(master: Path) -> list[dict[str, Any]]:
    """Rows for the reader's fast path, the bare decoder, and plain h5py."""
    data_file = next(master.parent.glob("*_data_000001.h5"))
    with EigerReader(str(master)) as reader, h5py.File(data_file, "r") as file:
        stack = file["/entry/data/data"]
        fast = reader.read_frame(1).pixels
        if not np.array_equal(fast, stack[0]):
            raise AssertionError("fast path and h5py disagree")
        chunk = bytes(stack.id.read_direct_chunk((0, 0, 0))[1])
        shape = stack.shape[1:]
        rows = [
            (
                "Eiger2 16M read+decompress one frame (fast path)",
                median_ms(lambda: reader.read_frame(1), REPEATS),
                TARGET_MS,
            ),
            (
                f"Eiger2 16M bslz4 decode only, {bslz4.DEFAULT_THREADS} threads",
                median_ms(lambda: bslz4.decompress(chunk, shape, stack.dtype), REPEATS),
                "",
            ),
            (
                "Eiger2 16M bslz4 decode only, 1 thread",
                median_ms(lambda: bslz4.decompress(chunk, shape, stack.dtype, threads=1), REPEATS),
                "",
            ),
            (
                "Eiger2 16M read, plain h5py + hdf5plugin (reference)",
                median_ms(lambda: stack[0], REPEATS),
                "",
            ),
        ]
        compressed_mb = len(chunk) / 1e6
    result = [{"name": n, "target": t, "measured": m, "unit": "ms"} for n, m, t in rows]
    result.append(
        {
            "name": "Eiger2 16M compressed frame size",
            "target": "",
            "measured": compressed_mb,
            "unit": "MB",
        }
    )
    return result


def run() -> list[dict[str, Any]]:
    """Write a 16M dataset into a temporary directory and time reading frame 1."""
    with tempfile.TemporaryDirectory(prefix="bench_read_") as directory:
        master = write_eiger2_16m(Path(directory), nimages=FRAMES)
        return _measure(master)


if __name__ == "__main__":
    for row in run():
        print(row)
