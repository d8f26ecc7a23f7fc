"""Statistics, ring bins and spots (spec 5.6) against the plain-loop transcription.

n, mean, rms, stddev, min, max and spots must equal :func:`tests.spec_view.spec_stats`
exactly (==). The one documented difference, exact sums of squares, is tested on its own.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istasks.core import _kernels as kernels
from istasks.core.params import ViewParams
from istasks.core.readers.base import Frame, PixelMask
from istasks.core.reduce import Window
from istasks.core.stats import (
    RING_BINS,
    BinSums,
    image_stats,
    ring_bins,
    ring_layout,
    spot_floor,
    spots_per_bin,
)
from istasks.core.view import reduce_frame
from tests.spec_view import spec_bin, spec_reduce, spec_stats

U16_SAT = 0xFFFF
U32_SAT = 0xFFFFFFFF
STATS = ("n", "mean", "rms", "stddev", "min", "max", "spots")


def frame_of(pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_] | None, **meta: Any) -> Frame:
    code = U16_SAT if pixels.dtype.itemsize == 2 else U32_SAT
    return Frame(pixels.copy(), PixelMask(bad.copy()) if bad is not None else None, code, meta)


def spotty_image(
    rng: np.random.Generator, shape: tuple[int, int], dtype: type[np.unsignedinteger[Any]]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Poisson background, bright spots, a few saturated pixels, masked gaps, dead corners."""
    pixels = rng.poisson(20.0, size=shape).astype(dtype)
    spots = rng.random(shape) < 0.02
    pixels[spots] = rng.integers(200, 30000, size=int(spots.sum()), dtype=dtype)
    pixels[rng.random(shape) < 0.002] = np.iinfo(dtype).max
    pixels[: shape[0] // 5, : shape[1] // 5] = 0  # a dead corner: a ring of mostly zeros
    bad = np.zeros(shape, bool)
    bad[:, shape[1] // 2] = True
    return pixels, bad


def stats_of(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in STATS if k in meta}


VIEWS = [
    ((97, 89), ViewParams(xsize=12), (40.3, 51.7)),
    ((97, 89), ViewParams(xsize=12), (-30.0, 200.5)),  # beam outside the detector
    ((64, 64), ViewParams(xsize=16), (32.0, 32.0)),  # centre on a pixel, integer ratio
    ((64, 64), ViewParams(xsize=8), (64.0, 0.0)),  # on the outer corner
    ((120, 100), ViewParams(xsize=10, zoom=2.0, segcol=1.2, segrow=0.5), (70.5, 80.25)),
    ((120, 100), ViewParams(xsize=9, zoom=1.7, segcol=-0.3, segrow=0.8), (50.0, 60.0)),
    ((40, 45), ViewParams(xsize=40, zoom=2.0, segcol=0.5, segrow=0.5), (22.2, 20.1)),  # nearest
    ((30, 70), ViewParams(xsize=20, keep_aspect=True), (35.5, 15.5)),
    ((300, 257), ViewParams(xsize=64), (120.25, 140.75)),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(("shape", "params", "beam"), VIEWS)
def test_stats_match_spec(
    rng: np.random.Generator,
    dtype: type[np.unsignedinteger[Any]],
    shape: tuple[int, int],
    params: ViewParams,
    beam: tuple[float, float],
) -> None:
    pixels, bad = spotty_image(rng, shape, dtype)
    meta = {"beam_center_x": beam[0], "beam_center_y": beam[1]}
    reduced = reduce_frame(frame_of(pixels, bad, **meta), params)
    view = spec_reduce(
        pixels, bad, xsize=params.xsize, zoom=params.zoom, segcol=params.segcol,
        segrow=params.segrow, keep_aspect=params.keep_aspect,
    )  # fmt: skip
    expected = spec_stats(view, beam)
    assert stats_of(reduced.meta) == expected
    rings = reduced.rings or []
    assert [(r["n"], r["mean"], r["rms"], r["spots"]) for r in rings] == view.rings
    # No value above 65535 enters the sums: the original's wrapped squares agree too.
    assert spec_stats(view, beam, wrap_squares=True) == expected
    assert type(reduced.meta["min"]) is int and type(reduced.meta["max"]) is int


@pytest.mark.parametrize(
    ("shape", "centre"),
    [
        ((64, 64), (31.3, 33.7)),
        ((16, 16), (8.0, 8.0)),  # many pixels exactly on bin boundaries
        ((37, 91), (-20.2, 10.1)),
        ((91, 37), (100.4, 200.9)),
        ((8, 50), (10.5, 0.0)),
        ((50, 8), (8.0, 60.0)),  # x on the outer edge: outside the view
        ((8, 8), (0.0, 0.0)),
        ((64, 64), (1e12, -1e12)),
        ((8, 8), (math.inf, 3.0)),
        ((8, 8), (math.nan, 3.0)),
    ],
)
def test_ring_bins_match_spec(shape: tuple[int, int], centre: tuple[float, float]) -> None:
    bx, by = centre
    height, width = shape
    corners = [(x - bx) * (x - bx) + (y - by) * (y - by) for x, y in ((0, 0), (width, 0), (0, height), (width, height))]  # fmt: skip  # noqa: E501
    top = max(corners)
    low = 0.0 if (0 <= bx < width and 0 <= by < height) else min(corners)
    expected = [
        [spec_bin(c, r, bx, by, low=low, top=top) for c in range(width)] for r in range(height)
    ]
    assert ring_bins(shape, centre).tolist() == expected


def test_rings_use_the_outer_corners() -> None:
    # Centre at the view's centre: the corners at (W, H) give max = 2 * 32^2 = 2048, so
    # the pixel at d2 = 1024 (distance 32 along a row) is exactly at bin 8.
    bins = ring_bins((64, 64), (32.0, 32.0))
    assert bins[32, 0] == 8 and bins[32, 63] == 7 and bins[0, 0] == 15


def test_32_bit_sums_of_squares_are_exact() -> None:
    # The original's squares wrapped to 32 bits (bug 13); ours are exact integers, also
    # beyond 64 bits (16384 pixels of 3e9 squared sum to ~1.5e23).
    pixels = np.full((128, 128), 3_000_000_000, np.uint32)
    pixels[::2] = 1_000_000
    got = image_stats(pixels, (64.0, 64.0), sentinel=U32_SAT)
    n = 128 * 128
    total = n // 2 * (3_000_000_000 + 1_000_000)
    squares = n // 2 * (3_000_000_000**2 + 1_000_000**2)
    mean = float(total) / n
    assert got["mean"] == mean
    assert got["rms"] == math.sqrt(float(squares) / n)
    assert got["stddev"] == math.sqrt(float(squares) / n - mean * mean)
    assert got["max"] == 3_000_000_000 - (1 << 32)  # through a C int, as the original


def test_exact_squares_are_the_one_difference_from_the_original(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 200_000, size=(64, 64), dtype=np.uint32)
    beam = (30.0, 30.0)
    reduced = reduce_frame(frame_of(pixels, None, beam_center_x=30.0, beam_center_y=30.0),
                           ViewParams(xsize=16))  # fmt: skip
    view = spec_reduce(pixels, None, xsize=16)
    assert stats_of(reduced.meta) == spec_stats(view, beam)
    wrapped = spec_stats(view, beam, wrap_squares=True)
    assert wrapped["mean"] == reduced.meta["mean"] and wrapped["rms"] != reduced.meta["rms"]


def test_sentinel_is_out_of_the_stats_but_counts_as_a_spot(rng: np.random.Generator) -> None:
    pixels = rng.integers(90, 110, size=(64, 64), dtype=np.uint32)
    pixels[3, 4] = pixels[50, 60] = pixels[10, 10] = U32_SAT
    got = image_stats(pixels, (32.0, 32.0), sentinel=U32_SAT)
    assert got["n"] == 64 * 64 - 3 and got["max"] < 110
    assert got["spots"] == 3


def test_16_bit_sentinel_reads_back_as_65535_for_spots() -> None:
    pixels = np.full((16, 16), 100, np.uint16)
    pixels[2, 2] = U16_SAT
    assert image_stats(pixels, (8.0, 8.0), sentinel=U16_SAT)["spots"] == 1
    assert image_stats(pixels, (8.0, 8.0), sentinel=None)["n"] == 256


def test_empty_view_is_as_the_original_sends_it() -> None:
    pixels = np.full((16, 16), U16_SAT, np.uint16)
    got = image_stats(pixels, (8.0, 8.0), sentinel=U16_SAT)
    assert got == {
        "n": 0, "mean": 0.0, "rms": 0.0, "stddev": 0.0, "min": -1, "max": 0, "spots": 256,
    }  # fmt: skip


def test_negative_variance_leaves_stddev_out() -> None:
    # 100 pixels, one of them v + 1: sum2 / n - mean^2 rounds to -2048 in doubles. The
    # original's sqrt gave NaN, which it did not write (spec 5.6).
    pixels = np.full((10, 10), 2602078781, np.uint32)
    pixels[0, 0] += 1
    reduced = reduce_frame(frame_of(pixels, None), ViewParams(xsize=10))  # nearest, 1:1
    assert reduced.meta["n"] == 100 and "stddev" not in reduced.meta
    assert "stddev" not in spec_stats(spec_reduce(pixels, None, xsize=10), (5.0, 5.0))


def test_spot_threshold_is_strict_and_uses_rms() -> None:
    pixels = np.full((32, 32), 100, np.uint32)
    pixels[0, 0], pixels[0, 1] = 200, 300
    # One ring: mean 100.29, rms 100.54, stddev 7.0; only 300 exceeds mean + 1.5 rms.
    assert image_stats(pixels, (16.0, 16.0), sentinel=U32_SAT, bins=1)["spots"] == 1
    got = image_stats(pixels, (16.0, 16.0), sentinel=U32_SAT, sensitivity=0.05, bins=1)
    assert got["spots"] == 2


@pytest.mark.parametrize(
    ("mean", "rms", "sensitivity"),
    [(100.0, 10.0, 1.5), (0.0, 0.0, 1.5), (0.3, 0.1, 1.5), (99.5, 1.0 / 3.0, 1.5), (7.0, 2.0, 0.0)],
)
def test_spot_floor_is_the_first_value_over_the_limit(
    mean: float, rms: float, sensitivity: float
) -> None:
    floor = spot_floor(mean, rms, sensitivity)
    assert floor is not None
    assert float(floor) - mean > sensitivity * rms
    assert floor == 0 or not float(floor - 1) - mean > sensitivity * rms


def test_spot_floor_of_an_unreachable_limit() -> None:
    assert spot_floor(5.0, math.inf, 1.5) is None
    assert spot_floor(5.0, math.nan, 1.5) is None


def test_window_maps_beam_centre_to_output() -> None:
    window = Window(x0=100, y0=50, width=200, height=300, out_width=50, out_height=100)
    assert window.to_output(150.0, 80.0) == (12.5, 10.0)
    empty = Window(x0=0, y0=0, width=0, height=0, out_width=8, out_height=8)
    assert empty.to_output(3.0, 0.0)[0] == math.inf and math.isnan(empty.to_output(3.0, 0.0)[1])


@pytest.mark.parametrize("meta", [{}, {"beam_center_x": "x"}, {"beam_center_x": math.nan}])
def test_missing_beam_centre_uses_image_centre(
    rng: np.random.Generator, meta: dict[str, Any]
) -> None:
    # The original's worker exited here (bug 4).
    pixels, bad = spotty_image(rng, (200, 120), np.uint32)
    reduced = reduce_frame(frame_of(pixels, bad, **meta), ViewParams(xsize=40))
    expected = spec_stats(spec_reduce(pixels, bad, xsize=40), (60.0, 100.0))
    assert stats_of(reduced.meta) == expected


def test_stats_with_a_zero_wide_window_put_every_pixel_in_bin_0() -> None:
    pixels = np.arange(1, 601, dtype=np.uint32).reshape(20, 30)
    reduced = reduce_frame(frame_of(pixels, None), ViewParams(xsize=8, zoom=50.0))
    assert (reduced.pixels == 1).all()  # all samples at the origin
    assert reduced.meta["n"] == 64 and reduced.meta["spots"] == 0


def test_ring_layouts_are_reused_and_read_only(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 100, size=(32, 32), dtype=np.uint16)
    first = image_stats(pixels, (10.5, 20.5), sentinel=None)
    assert image_stats(pixels, (10.5, 20.5), sentinel=None) == first
    bins = ring_bins((32, 32), (10.5, 20.5))
    assert bins.max() == RING_BINS - 1


def test_ring_radii_bound_the_pixels_of_each_ring() -> None:
    """Each ring's radii (detector pixels) hold the distances of the view pixels in it,
    mapped back to the detector; the rings meet edge to edge, innermost first."""
    pixels = np.ones((400, 300), np.uint32)
    beam = (100.5, 180.25)
    reduced = reduce_frame(frame_of(pixels, None, beam_center_x=beam[0], beam_center_y=beam[1]),
                           ViewParams(xsize=100))  # fmt: skip
    rings = reduced.rings or []
    assert len(rings) == RING_BINS and rings[0]["inner_px"] == 0.0
    assert all(a["outer_px"] == b["inner_px"] for a, b in itertools.pairwise(rings))
    scale = 300 / 100  # detector pixels per view pixel across
    bins = ring_bins((100, 100), (beam[0] / scale, beam[1] / (400 / 100)))
    rows, cols = np.indices((100, 100))
    radius = np.hypot(cols - beam[0] / scale, rows - beam[1] / 4.0) * scale
    for b, ring in enumerate(rings):
        inside = radius[bins == b]
        assert ring["n"] == inside.size
        if inside.size:
            assert (
                ring["inner_px"] - 0.01 <= inside.min() and inside.max() <= ring["outer_px"] + 0.01
            )


def bin_image_sums(
    pixels: npt.NDArray[Any], bins: npt.NDArray[np.uint8], count: int, sentinel: int | None
) -> BinSums:
    """Per-bin sums from a bin image, in Python integers: what the run kernels replace."""
    kept = pixels.reshape(-1).astype(object)
    ring = bins.reshape(-1)
    if sentinel is not None:
        ring, kept = ring[pixels.reshape(-1) != sentinel], kept[pixels.reshape(-1) != sentinel]
    n = [int((ring == b).sum()) for b in range(count)]
    total = [int(kept[ring == b].sum()) for b in range(count)]
    squares = [int((kept[ring == b] ** 2).sum()) for b in range(count)]
    low = int(kept.min()) if kept.size else None
    high = int(kept.max()) if kept.size else None
    return BinSums(n, total, squares, low, high)


def centres(width: int, height: int) -> st.SearchStrategy[float]:
    """Beam coordinates: anywhere, on pixel and bin edges, far away, not finite."""
    edge = max(width, height)
    return st.one_of(
        st.floats(-2.0 * edge, 3.0 * edge, allow_nan=False),
        st.integers(-edge, 2 * edge).map(float),
        st.integers(-2 * edge, 4 * edge).map(lambda k: k / 2.0),
        st.sampled_from([1e12, -1e12, math.inf, -math.inf, math.nan, 0.0]),
    )


@st.composite
def ring_views(draw: st.DrawFn) -> tuple[npt.NDArray[Any], tuple[float, float], int, int | None]:
    height, width = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    dtype = draw(st.sampled_from([np.uint16, np.uint32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = draw(st.sampled_from([50, 0xFFFF, int(np.iinfo(dtype).max)]))
    pixels = rng.integers(0, top, (height, width), dtype=dtype, endpoint=True)
    sentinel = draw(st.sampled_from([None, int(np.iinfo(dtype).max), int(pixels.flat[0])]))
    centre = (draw(centres(width, height)), draw(centres(width, height)))
    return pixels, centre, draw(st.sampled_from([1, 2, 16, 255])), sentinel


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring_views())
def test_run_kernels_match_the_bin_image(
    view: tuple[npt.NDArray[Any], tuple[float, float], int, int | None],
) -> None:
    """The sums and spot counts over runs (no bin image) are those of every pixel in
    the bin :func:`ring_bins` gives it: any centre, bins on pixel boundaries, values
    whose squares carry past 64 bits, a sentinel inside or outside a run."""
    pixels, centre, count, sentinel = view
    bins = ring_bins(pixels.shape, centre, count)
    layout = ring_layout(pixels.shape, centre, count)
    assert BinSums.of(pixels, layout, count, sentinel) == bin_image_sums(
        pixels, bins, count, sentinel
    )
    choices: list[int | None] = [None, 0, 1, 40, 0xFFFF, 1 << 40]
    floors = [choices[b % len(choices)] for b in range(count)]
    expected = [int((pixels[bins == b] >= f).sum()) if f is not None else 0
                for b, f in enumerate(floors)]  # fmt: skip
    assert spots_per_bin(pixels, layout, floors) == expected


def test_run_kernels_refuse_pixels_outside_their_layout() -> None:
    """A band of rows is checked against the layout before any pixel is read."""
    layout = ring_layout((10, 12), (3.0, 4.0), RING_BINS)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.ring_sums(np.zeros((5, 11), np.uint32), layout, 0, RING_BINS, -1)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.count_above(np.zeros((5, 12), np.uint16), layout, 6, np.zeros(256, np.int64))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.ring_bins(layout, -1, np.zeros((2, 12), np.uint8))
