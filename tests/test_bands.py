"""Row bands (istasks.core.bands): an image cut over several threads gives exactly what
one pass gives, and the spec's numbers (the other core tests run with one band)."""

from __future__ import annotations

import contextlib
import io
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from istasks.core import bands
from istasks.core.contrast import Levels, grey_into, marked_view, saturated_indices
from istasks.core.jpeg import (
    DRI,
    MAX_RESTART_MCUS,
    SOS,
    encode_jpeg,
    encode_view,
    join_bands,
    mcu_bands,
)
from istasks.core.params import ViewParams
from istasks.core.stats import image_stats
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
    assert len(ranges) == min(threads * bands.BANDS_PER_THREAD, rows)


def test_small_images_stay_one_band() -> None:
    bands.set_threads(4)
    try:
        assert bands.bands(64, 64) == [(0, 64)]
        assert len(bands.bands(1024, 1024)) == 1024 * 1024 // bands.MIN_BAND_PIXELS
    finally:
        bands.set_threads(1)


def test_one_thread_is_one_band_and_makes_no_pool() -> None:
    with banded(1):
        assert bands.bands(1024, 1024) == [(0, 1024)]
        # Several ranges anyway (a very wide JPEG's restart intervals): all done here.
        assert (
            bands.run(lambda a, b: threading.current_thread().name, [(0, 1), (1, 2)])
            == [threading.current_thread().name] * 2
        )
        assert bands._BANDS.pool is None


def test_threads_share_out_the_bands_and_results_keep_band_order() -> None:
    """Each thread takes the next band left: a slow band does not hold the others back
    (the first band is slow; the other thread does all the rest meanwhile)."""
    done_by: dict[int, str] = {}

    def work(start: int, stop: int) -> int:
        if start == 0:
            time.sleep(0.2)
        done_by[start] = threading.current_thread().name
        return start

    bands.set_threads(2)
    try:
        ranges = [(k, k + 1) for k in range(8)]
        assert bands.run(work, ranges) == list(range(8))
    finally:
        bands.set_threads(1)
    assert all(done_by[k] != done_by[0] for k in range(1, 8))  # the other thread did them


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
        cut = reduce_frame(make_frame(pixels, bad), params)
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
        alone = image_stats(pixels, centre, sentinel=code)
        with banded(4):
            assert image_stats(pixels, centre, sentinel=code) == alone


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
    halves = [(0, 5), (5, 10)]
    with banded(2):
        assert bands.run(lambda a, b: b - a, halves) == [5, 5]
        pool = bands._BANDS.pool
        bands.set_threads(2)  # another service of the process asks for the same
        assert bands._BANDS.pool is pool
        assert pool is not None
        pool.shutdown()  # as if set_threads replaced it under a running request
        assert bands.run(lambda a, b: b - a, halves) == [5, 5]


def _pixels(jpeg: bytes) -> npt.NDArray[np.uint8]:
    """Decoded with Pillow's libjpeg, not the encoder's own library."""
    return np.asarray(Image.open(io.BytesIO(jpeg)))


def _has_restarts(jpeg: bytes) -> bool:
    return bytes((0xFF, DRI)) in jpeg[: jpeg.index(bytes((0xFF, SOS)))]


def _grey_jpeg(rows: npt.NDArray[np.uint8], quality: int) -> bytes:
    """``rows`` in one piece, straight through simplejpeg."""
    data: bytes = simplejpeg.encode_jpeg(
        rows[:, :, np.newaxis], quality=quality, colorspace="GRAY", colorsubsampling="Gray"
    )
    return data


def _diffraction_like(rng: np.random.Generator, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Dark background, bright specks, a gradient: blocks of every kind of content."""
    grey = (rng.random(shape) ** 6 * 255).astype(np.uint8)
    grey += np.linspace(0, 40, shape[1], dtype=np.uint8)[np.newaxis, :]
    return grey


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(("height", "width"), [(1024, 1024), (1037, 1090), (27, 5), (9, 1), (1, 9)])
def test_a_grey_jpeg_in_bands_decodes_to_the_whole_encodes_pixels(
    rng: np.random.Generator, height: int, width: int, threads: int
) -> None:
    grey = _diffraction_like(rng, (height, width))
    whole = _grey_jpeg(grey, 90)
    with banded(threads):
        cuts = mcu_bands(height, width, 8)
        cut = encode_jpeg(grey, quality=90).data
    np.testing.assert_array_equal(_pixels(cut), _pixels(whole))
    assert _has_restarts(cut) == (len(cuts) > 1) and not _has_restarts(whole)
    assert (len(cuts) > 1) == (height > 8)  # bands of whole MCU rows, from two of them on


@pytest.mark.parametrize(
    ("height", "width", "joined"),
    # 33 rows: the last band would be one row, whose planes TurboJPEG reads as 4:2:2, so
    # the bands' headers differ and the view is encoded whole (the safety net).
    [(1024, 1024, True), (1041, 999, True), (34, 17, True), (33, 17, False)],
)
def test_a_view_with_red_pixels_in_bands_decodes_to_the_whole_encodes_pixels(
    rng: np.random.Generator, height: int, width: int, joined: bool
) -> None:
    pixels = rng.integers(0, 300, size=(height, width)).astype(np.uint32)
    red = rng.choice(pixels.size, size=max(1, pixels.size // 50), replace=False)
    pixels.reshape(-1)[red] = 0xFFFFFFFF
    pixels[-1, -1] = pixels[16, 0] = pixels[15, 1] = 0xFFFFFFFF  # at the band edges too
    view = marked_view(pixels, Levels(0, 300), saturated_indices(pixels, 0xFFFFFFFF))
    whole = encode_view(view, quality=90).data
    with banded(2):
        cut = encode_view(view, quality=90).data
    assert _has_restarts(cut) == joined and not _has_restarts(whole)
    np.testing.assert_array_equal(_pixels(cut), _pixels(whole))


def test_a_wide_image_gets_bands_within_the_restart_interval(rng: np.random.Generator) -> None:
    height, width = 200, 65500
    with banded(2):
        cuts = mcu_bands(height, width, 8)
        cut = encode_jpeg(_diffraction_like(rng, (height, width)), quality=75).data
    assert len(cuts) > 2  # more bands than threads: 8188 MCUs per row of MCUs
    assert mcu_bands(height, width, 8) == [(0, height)]  # one thread: one scan, no restarts
    assert all((stop - start) // 8 * -(-width // 8) <= MAX_RESTART_MCUS for start, stop in cuts)
    assert Image.open(io.BytesIO(cut)).size == (width, height)


def test_bands_of_different_encodings_are_not_joined(rng: np.random.Generator) -> None:
    grey = _diffraction_like(rng, (32, 32))
    assert join_bands([_grey_jpeg(grey[:16], 90), _grey_jpeg(grey[16:], 90)], 32, 8)
    with pytest.raises(ValueError, match="headers"):
        join_bands([_grey_jpeg(grey[:16], 90), _grey_jpeg(grey[16:], 50)], 32, 8)
    with pytest.raises(ValueError, match="JPEG"):
        join_bands([b"GIF89a", _grey_jpeg(grey[16:], 90)], 32, 8)
