"""Image core speed on an Eiger2 16M frame: reduce + stats, contrast + encode, end to end.

A synthetic uint32 frame of 4362 x 4148 pixels (rows x columns) with the detector's module
gaps masked (and set to 0xFFFFFFFF in the data, as Eiger files do), a Poisson background
falling off from the beam centre, a few thousand Bragg-like spots and a handful of
saturated pixels, reduced to 1024 px as the original reduces (centred overlapping boxes,
spec 5.5). The same frame is reduced repeatedly, so the view's ring bins are kept after
the first call, as for every frame of a dataset; one row measures a first view. Run:
``.venv/bin/python -m bench pipeline``.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core.contrast import contrast_levels, to_8bit
from istasks.core.jpeg import encode_jpeg
from istasks.core.params import ContrastParams, LabelParams, ViewParams
from istasks.core.readers.base import Frame, PixelMask
from istasks.core.view import Reduced, reduce_frame, render_jpeg

ROWS, COLUMNS = 4362, 4148
MODULE_ROWS, MODULE_COLUMNS, GAP_ROWS, GAP_COLUMNS = 512, 1028, 38, 12
SATURATED = 0xFFFFFFFF
REPEATS = 15
VIEW = ViewParams(xsize=1024)
CONTRAST = ContrastParams(wval=0, contrast=-1)
LABEL = LabelParams(text="x_1", height=16)


def eiger2_16m_frame(*, saturated_pixels: int = 12, seed: int = 16) -> Frame:
    """A synthetic Eiger2 16M frame (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bad = np.zeros((ROWS, COLUMNS), bool)
    for row in range(MODULE_ROWS, ROWS, MODULE_ROWS + GAP_ROWS):
        bad[row : row + GAP_ROWS] = True
    for column in range(MODULE_COLUMNS, COLUMNS, MODULE_COLUMNS + GAP_COLUMNS):
        bad[:, column : column + GAP_COLUMNS] = True
    centre_x, centre_y = 2110.3, 2240.7
    y, x = np.ogrid[:ROWS, :COLUMNS]
    radius = np.hypot(x - centre_x, y - centre_y).astype(np.float32)
    pixels = rng.poisson(2.0 + 40.0 * np.exp(-radius / 600.0)).astype(np.uint32)
    del radius
    spots = rng.integers(0, pixels.size - 2 * COLUMNS - 2, 3000)
    for d_row in range(3):
        pixels.reshape(-1)[spots + d_row * COLUMNS + 1] += rng.integers(
            50, 20000, spots.size, dtype=np.uint32
        )
    pixels.reshape(-1)[rng.integers(0, pixels.size, saturated_pixels)] = SATURATED
    pixels[bad] = SATURATED
    meta = {"beam_center_x": centre_x, "beam_center_y": centre_y, "frame": 1}
    meta |= {"first_frame": 1, "last_frame": 100, "image_depth": 4}
    return Frame(pixels, PixelMask(bad), SATURATED, meta)


def median_ms(action: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of ``action`` in milliseconds (after one warm-up call)."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_extra_mb(action: Callable[[], object]) -> float:
    """Peak memory allocated by ``action`` beyond what existed before (numpy is traced)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        action()
        return (tracemalloc.get_traced_memory()[1] - before) / 2**20
    finally:
        tracemalloc.stop()


def first_view(frame: Frame) -> Reduced:
    """reduce_frame as for the first view of a frame (nothing is kept per geometry)."""
    return reduce_frame(frame, VIEW)


def contrast_and_encode(reduced: Reduced) -> bytes:
    """The per-request part without the banner, as the service runs it: contrast to a
    grey view with its red pixels, JPEG encode."""
    return render_jpeg(reduced, CONTRAST, LabelParams(), quality=90).jpeg.data


def contrast_and_encode_rgb(reduced: Reduced) -> bytes:
    """The same through an RGB image (the path before the YCbCr planes), for comparison."""
    levels = contrast_levels(CONTRAST, reduced.meta)
    view = to_8bit(reduced.pixels, reduced.saturation, levels)
    return encode_jpeg(view, quality=90).data


def row(name: str, target: float | str, measured: float, unit: str) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": round(measured, 2), "unit": unit}


def run() -> list[dict[str, Any]]:
    """Benchmark rows: name, target, measured, unit."""
    frame = eiger2_16m_frame()
    clean = eiger2_16m_frame(saturated_pixels=0)
    reduced = reduce_frame(frame, VIEW)
    blob = reduced.to_bytes()

    def end_to_end() -> bytes:
        return render_jpeg(reduce_frame(frame, VIEW), CONTRAST, LABEL).jpeg.data

    pixels: npt.NDArray[Any] = frame.pixels
    return [
        row(
            "reduce+stats 16M->1024 (12 saturated px)",
            40,
            median_ms(lambda: reduce_frame(frame, VIEW)),
            "ms",
        ),
        row(
            "reduce+stats 16M->1024 (no saturated px)",
            40,
            median_ms(lambda: reduce_frame(clean, VIEW)),
            "ms",
        ),
        row(
            "reduce+stats 16M->1024, first view of its geometry (ring bins computed)",
            "",
            median_ms(lambda: first_view(frame)),
            "ms",
        ),
        row("contrast+encode 1024 q90", 10, median_ms(lambda: contrast_and_encode(reduced)), "ms"),
        row(
            "contrast+encode 1024 q90 via an RGB image (before)",
            "",
            median_ms(lambda: contrast_and_encode_rgb(reduced)),
            "ms",
        ),
        row(
            "render_jpeg 1024 + 16px label q90",
            10,
            median_ms(lambda: render_jpeg(reduced, CONTRAST, LABEL)),
            "ms",
        ),
        row("end-to-end core 16M->1024 JPEG", 50, median_ms(end_to_end), "ms"),
        row("JPEG size 1024 q90", "", len(end_to_end()) / 1024, "KiB"),
        row("Reduced.to_bytes 1024 u32", "", median_ms(reduced.to_bytes), "ms"),
        row("Reduced.from_bytes 1024 u32", "", median_ms(lambda: Reduced.from_bytes(blob)), "ms"),
        row("peak extra memory end-to-end", "", peak_extra_mb(end_to_end), "MiB"),
        row("(frame itself)", "", pixels.nbytes / 2**20, "MiB"),
    ]


if __name__ == "__main__":
    for result in run():
        print(result)
