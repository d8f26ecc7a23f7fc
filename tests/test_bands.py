"""Row bands (istasks.core.bands): an image cut over several threads gives exactly what
one pass gives, and the spec's numbers (the other core tests run with one band)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istasks.core import bands
from istasks.core.contrast import Levels, grey_into
from istasks.core.params import ViewParams
from istasks.core.stats import forget_ring_layouts, image_stats
from istasks.core.view import reduce_frame
from tests.test_reduce import assert_matches_spec, make_frame, random_image, views


@contextlib.contextmanager
def banded(threads: int = 3) -> Iterator[None]:
    """Every image of at least ``threads`` rows cut into ``threads`` bands."""
    saved = bands.MIN_BAND_PIXELS
    bands.MIN_BAND_PIXELS = 1
    bands.set_threads(threads)
    try:
        yield
    finally:
        bands.MIN_BAND_PIXELS = saved
        bands.set_threads(1)


@pytest.mark.parametrize(("rows", "width", "threads"), [(1024, 1024, 2), (7, 3, 3), (1, 9, 4)])
def test_bands_cover_the_rows_once(rows: int, width: int, threads: int) -> None:
    with banded(threads):
        ranges = bands.bands(rows, width)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len(ranges) == min(threads, rows)


def test_small_images_stay_one_band() -> None:
    bands.set_threads(4)
    try:
        assert bands.bands(64, 64) == [(0, 64)]
        assert len(bands.bands(1024, 1024)) == 4
    finally:
        bands.set_threads(1)


def test_an_error_in_a_band_reaches_the_caller() -> None:
    def work(start: int, stop: int) -> int:
        if start > 0:
            raise ValueError(f"band {start}:{stop}")
        return stop

    with banded(2), pytest.raises(ValueError, match="band"):
        bands.run(work, bands.bands(10, 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_banded_reduction_matches_spec_and_one_band(
    view: tuple[tuple[int, int], ViewParams, int, bool],
) -> None:
    shape, params, seed, wide = view
    pixels, bad = random_image(np.random.default_rng(seed), shape, np.uint32 if wide else np.uint16)
    alone = reduce_frame(make_frame(pixels, bad), params)
    with banded():
        assert_matches_spec(pixels, bad, params)
        forget_ring_layouts()
        cut = reduce_frame(make_frame(pixels, bad), params)
    forget_ring_layouts()
    np.testing.assert_array_equal(cut.pixels, alone.pixels)
    assert cut.meta == alone.meta


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("sentinel", [None, "max"])
def test_banded_stats_are_the_one_band_stats(
    rng: np.random.Generator, dtype: type[np.unsignedinteger[Any]], sentinel: str | None
) -> None:
    pixels = rng.integers(0, np.iinfo(dtype).max, (301, 257), dtype=dtype)
    pixels[rng.random(pixels.shape) < 0.01] = np.iinfo(dtype).max
    code = None if sentinel is None else int(np.iinfo(dtype).max)
    for centre in ((128.3, 150.9), (-40.0, 500.5), (256.0, 0.0)):
        forget_ring_layouts()
        alone = image_stats(pixels, centre, sentinel=code)
        with banded(4):
            forget_ring_layouts()
            assert image_stats(pixels, centre, sentinel=code) == alone
    forget_ring_layouts()


@given(st.integers(0, 2**32), st.integers(1, 2**20), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_banded_grey_levels_are_the_one_band_levels(white: int, span: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 2**32, (67, 45), dtype=np.uint32)
    levels = Levels(white, white + span)
    alone = np.empty(pixels.shape, np.uint8)
    grey_into(pixels, levels, alone)
    cut = np.empty(pixels.shape, np.uint8)
    with banded(3):
        grey_into(pixels, levels, cut)
    np.testing.assert_array_equal(cut, alone)


def test_the_same_thread_count_keeps_the_pool_and_a_replaced_pool_still_answers() -> None:
    with banded(2):
        assert bands.run(lambda a, b: b - a, bands.bands(10, 1)) == [5, 5]
        pool = bands._BANDS.pool
        bands.set_threads(2)  # another service of the process asks for the same
        assert bands._BANDS.pool is pool
        assert pool is not None
        pool.shutdown()  # as if set_threads replaced it under a running request
        assert bands.run(lambda a, b: b - a, bands.bands(10, 1)) == [5, 5]
