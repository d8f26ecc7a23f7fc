"""Row bands: one image's compiled passes (:mod:`istasks.core._kernels`) on a few threads.

A zoom tile's reduction, statistics and grey levels are each a pass over a 1024 x 1024
image in a kernel that releases the GIL; cut into bands of rows they run on several
cores at once, which halves a tile's compute on two cores (issue 13: a tile has 15 ms end
to end). Small images (thumbnails, the 64 px views) stay on the calling thread, where a
hand-over would cost more than it saves.

The pool is made on first use, so a process that only imports the core (the worker's
fork server) stays single-threaded; :func:`set_threads` sizes it (the worker does, from
``IS_CORE_THREADS``). Results come back in band order.

An image gets a few bands per thread (:data:`BANDS_PER_THREAD`), and the calling thread
and the pool's threads each take the next band not yet taken until none is left. With
one band per thread the caller, done with its own, waited for the other: a profile of
the worker under the tile benchmark showed a third of a tile's time in that wait, the
other band starting late or running slower because the bridge, the proxy and Redis
share the two cores. Measured in the worker (its own compute time of each tile, five
pairs of alternating 12 s tile runs): 0.6 ms less a tile on average, in four pairs of
five; in one process alone, where no other program wants the cores, no difference.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Below this many pixels an image is one band.
MIN_BAND_PIXELS = 1 << 17
#: Bands per thread, for the threads to share out as each finishes one.
BANDS_PER_THREAD = 4


class _Bands:
    """The thread count and the (lazily made) pool behind the module functions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads = 1
        self.pool: ThreadPoolExecutor | None = None

    def set_threads(self, threads: int) -> None:
        with self.lock:
            if max(1, threads) == self.threads:
                return  # every service of a process asks for the same: keep the pool
            self.threads = max(1, threads)
            old, self.pool = self.pool, None
        if old is not None:
            old.shutdown(wait=False)

    def get_pool(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                workers = max(self.threads - 1, 1)
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="is-band")
            return self.pool


_BANDS = _Bands()


def set_threads(threads: int) -> None:
    """Use up to ``threads`` bands per image from now on (1: no pool at all)."""
    _BANDS.set_threads(threads)


def count(rows: int, width: int) -> int:
    """How many bands an image of ``rows`` rows of ``width`` pixels gets: a few per
    thread, none under :data:`MIN_BAND_PIXELS`, or one for a small image or one thread."""
    threads = _BANDS.threads
    most = 1 if threads == 1 else threads * BANDS_PER_THREAD
    return min(most, max(1, rows * width // MIN_BAND_PIXELS), max(rows, 1))


def bands(rows: int, width: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges covering ``rows`` rows of ``width`` pixels, as many
    as :func:`count` says."""
    parts = count(rows, width)
    return list(itertools.pairwise(rows * k // parts for k in range(parts + 1)))


def over_rows(work: Callable[[int, int], T], shape: tuple[int, int]) -> list[T]:
    """``work(start, stop)`` over the row bands of a ``shape`` (rows, columns) image."""
    return run(work, bands(*shape))


def run(work: Callable[[int, int], T], ranges: list[tuple[int, int]]) -> list[T]:
    """``work(start, stop)`` for every range, shared out between this thread and the
    pool's as each takes the next range left; the first exception propagates, once
    every band taken has ended."""
    if len(ranges) == 1:
        return [work(*ranges[0])]
    results: list[T | None] = [None] * len(ranges)
    claims = itertools.count()  # next() on it is atomic under the GIL

    def take_until_done() -> None:
        while (index := next(claims)) < len(ranges):
            results[index] = work(*ranges[index])

    helpers: list[concurrent.futures.Future[None]] = []
    wanted = min(_BANDS.threads, len(ranges)) - 1
    if wanted > 0:  # one thread (a very wide JPEG can still have several bands): no pool
        pool = _BANDS.get_pool()
        for _ in range(wanted):
            try:
                helpers.append(pool.submit(take_until_done))
            except RuntimeError:  # the pool was replaced meanwhile (set_threads)
                break
    try:
        take_until_done()
    finally:
        concurrent.futures.wait(helpers)
    for helper in helpers:
        helper.result()  # a helper's exception
    return results  # type: ignore[return-value]  # every index was filled
