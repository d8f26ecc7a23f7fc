"""JPEG encoders compared on a 1024 px view at quality 90: Pillow(-SIMD) vs simplejpeg.

Single-thread median ms and encodes/s with 1 and 2 threads: Pillow's encode to memory
holds the GIL, simplejpeg's does not, which is what a worker's task threads need.

Run: ``.venv/bin/python -m bench jpeg``.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from istasks.core.jpeg import encode_jpeg

Image8 = npt.NDArray[np.uint8]
SIDE = 1024
QUALITY = 90
THREAD_RUN_S = 2.0


def test_images() -> dict[str, Image8]:
    """Diffraction-like grey view (mostly dim, exponential) and its RGB form with red spots."""
    rng = np.random.default_rng(1)
    grey = np.clip(rng.exponential(20, (SIDE, SIDE)), 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    rgb[::37, ::41] = (255, 0, 0)
    return {"RGB": rgb, "GRAY": grey}


def pillow_encode(image: Image8) -> bytes:
    """The previous encoder: Pillow saving to memory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def service_encode(image: Image8) -> bytes:
    """The service's encoder (simplejpeg)."""
    return encode_jpeg(image, quality=QUALITY).data


def median_ms(encode: Callable[[Image8], bytes], image: Image8, n: int = 60) -> float:
    """Median single-thread encode time."""
    encode(image)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        encode(image)
        times.append(time.perf_counter() - started)
    return sorted(times)[n // 2] * 1000


def rate(encode: Callable[[Image8], bytes], image: Image8, threads: int) -> float:
    """Encodes per second with ``threads`` threads encoding for :data:`THREAD_RUN_S`."""
    counts = [0] * threads
    stop_at = time.perf_counter() + THREAD_RUN_S

    def loop(slot: int) -> None:
        while time.perf_counter() < stop_at:
            encode(image)
            counts[slot] += 1

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / THREAD_RUN_S


def run() -> list[dict[str, Any]]:
    """Rows for ``make bench``."""
    rows: list[dict[str, Any]] = []
    encoders = {"pillow": pillow_encode, "simplejpeg (service)": service_encode}
    for kind, image in test_images().items():
        for name, encode in encoders.items():
            label = f"jpeg {kind} {SIDE} q{QUALITY} {name}"
            rows.append({"name": f"{label}: median, 1 thread", "target": "",
                         "measured": median_ms(encode, image), "unit": "ms"})  # fmt: skip
            for threads in (1, 2):
                rows.append({"name": f"{label}: {threads} thread(s) encoding", "target": "",
                             "measured": rate(encode, image, threads), "unit": "encodes/s",
                             "better": "higher"})  # fmt: skip
    return rows
