"""Statistics, ring bins and spots of a reduced image (spec 5.6) against float64 references."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from istasks.core.params import ViewParams
from istasks.core.readers.base import Frame
from istasks.core.reduce import Window
from istasks.core.stats import RING_BINS, RingMap, image_stats
from istasks.core.view import reduce_frame

U32_SAT = 0xFFFFFFFF


def reference_rings(
    shape: tuple[int, int], centre: tuple[float, float], bins: int = RING_BINS
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """Ring index floor(bins * (d2 - min) / (max - min)) and its unrounded value."""
    rows, cols = np.indices(shape, dtype=np.float64)
    d2 = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2
    span = d2.max() - d2.min()
    scaled = bins * (d2 - d2.min()) / span if span > 0 else np.zeros(shape)
    return np.clip(np.floor(scaled), 0, bins - 1).astype(np.intp), scaled


def reference_stats(
    pixels: npt.NDArray[Any], saturation: int, centre: tuple[float, float], sensitivity: float
) -> dict[str, Any]:
    """Plain float64 statistics; saturated pixels out of the sums, in the spot count."""
    values = pixels.astype(np.float64)
    valid = pixels != saturation
    rings, _ = reference_rings(pixels.shape, centre)
    spots = 0
    for ring in range(RING_BINS):
        inside = rings == ring
        chosen = values[inside & valid]
        mean = chosen.mean() if chosen.size else 0.0
        rms = math.sqrt((chosen**2).mean()) if chosen.size else 0.0
        spots += int(np.count_nonzero(values[inside] - mean > sensitivity * rms))
    good = values[valid]
    return {
        "n": good.size,
        "mean": good.mean(),
        "rms": math.sqrt((good**2).mean()),
        "stddev": good.std(),
        "min": int(good.min()),
        "max": int(good.max()),
        "spots": spots,
    }


def assert_stats_match(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["n"] == expected["n"]
    assert got["min"] == expected["min"] and got["max"] == expected["max"]
    assert type(got["min"]) is int and type(got["max"]) is int
    assert got["mean"] == pytest.approx(expected["mean"], rel=1e-12)
    assert got["rms"] == pytest.approx(expected["rms"], rel=1e-12)
    assert got["stddev"] == pytest.approx(expected["stddev"], rel=1e-9)
    assert got["spots"] == expected["spots"]


@pytest.mark.parametrize(
    ("shape", "centre"),
    [
        ((64, 64), (31.3, 33.7)),
        ((37, 91), (-20.2, 10.1)),
        ((91, 37), (100.4, 200.9)),
        ((1, 50), (10.5, 0.0)),
        ((50, 1), (0.0, 60.0)),
        ((1, 1), (0.0, 0.0)),
        ((256, 256), (1e12, -1e12)),
    ],
)
def test_ring_map_matches_formula(shape: tuple[int, int], centre: tuple[float, float]) -> None:
    got = np.concatenate(
        [RingMap(shape, centre, RING_BINS).rows(r, r + 1) for r in range(shape[0])]
    )
    expected, scaled = reference_rings(shape, centre)
    differ = got.reshape(shape) != expected
    # Different float rounding may only move pixels lying on a ring boundary.
    assert np.allclose(scaled[differ], np.round(scaled[differ]), atol=1e-9)
    assert got.max() <= RING_BINS - 1


@pytest.mark.parametrize(
    ("dtype", "high"), [(np.uint16, 60000), (np.uint32, 200), (np.uint32, 4_000_000_000)]
)
def test_stats_match_float64_reference(
    rng: np.random.Generator, dtype: type[np.unsignedinteger[Any]], high: int
) -> None:
    pixels = rng.integers(0, high, size=(300, 257), dtype=dtype)
    spikes = rng.integers(0, pixels.size, 40)
    pixels.reshape(-1)[spikes] = high - 1
    saturation = int(np.iinfo(dtype).max)
    centre = (120.25, 140.75)
    _, scaled = reference_rings(pixels.shape, centre)
    on_boundary = np.isclose(scaled, np.round(scaled), atol=1e-9, rtol=0)
    assert not (on_boundary & (scaled > 0.5) & (scaled < RING_BINS - 0.5)).any()
    got = image_stats(pixels, saturation, centre, sensitivity=1.5)
    assert_stats_match(got, reference_stats(pixels, saturation, centre, 1.5))


def test_32_bit_values_above_65536_do_not_overflow() -> None:
    # The original's 32-bit sum of squares wrapped here (bug 13): rms came out tiny.
    pixels = np.full((128, 128), 3_000_000_000, np.uint32)
    pixels[::2] = 1_000_000
    got = image_stats(pixels, U32_SAT, (64.0, 64.0))
    assert got["mean"] == pytest.approx(1_500_500_000.0, rel=1e-12)
    assert got["rms"] == pytest.approx(math.sqrt((9e18 + 1e12) / 2), rel=1e-12)
    assert got["stddev"] == pytest.approx(1_499_500_000.0, rel=1e-9)
    assert got["max"] == 3_000_000_000


def test_saturated_pixels_leave_stats_but_count_as_spots(rng: np.random.Generator) -> None:
    pixels = rng.integers(90, 110, size=(64, 64), dtype=np.uint32)
    pixels[3, 4] = pixels[50, 60] = pixels[10, 10] = U32_SAT
    got = image_stats(pixels, U32_SAT, (32.0, 32.0))
    assert got["n"] == 64 * 64 - 3
    assert got["max"] < 110
    assert got["spots"] == 3
    assert_stats_match(got, reference_stats(pixels, U32_SAT, (32.0, 32.0), 1.5))


def test_all_saturated_image_has_zero_stats() -> None:
    # The original sent min = -1 for an empty image (bug 15).
    pixels = np.full((16, 16), 0xFFFF, np.uint16)
    got = image_stats(pixels, 0xFFFF, (8.0, 8.0))
    assert {k: got[k] for k in ("n", "mean", "rms", "stddev", "min", "max")} == {
        "n": 0,
        "mean": 0.0,
        "rms": 0.0,
        "stddev": 0.0,
        "min": 0,
        "max": 0,
    }
    assert got["spots"] == 256


def test_known_spots_are_counted(rng: np.random.Generator) -> None:
    pixels = (100 + rng.integers(-2, 3, size=(384, 384))).astype(np.uint32)
    flat = rng.choice(pixels.size, 25, replace=False)
    pixels.reshape(-1)[flat] = 5000
    assert image_stats(pixels, U32_SAT, (190.5, 200.5))["spots"] == 25


def test_spots_are_judged_against_their_ring() -> None:
    shape = (128, 128)
    centre = (64.0, 64.0)
    rings = np.concatenate([RingMap(shape, centre, RING_BINS).rows(0, shape[0])]).reshape(shape)
    pixels = np.where(rings < 8, 1000, 10).astype(np.uint32)
    outer = np.argwhere(rings >= 12)[::97][:7]
    pixels[outer[:, 0], outer[:, 1]] = 200  # far below the inner background
    got = image_stats(pixels, U32_SAT, centre)
    assert got["spots"] == 7
    assert got["mean"] > 200  # so a whole-image threshold would find no spot


def test_spot_threshold_uses_rms_not_stddev() -> None:
    pixels = np.full((32, 32), 100, np.uint32)
    pixels[0, 0], pixels[0, 1] = 200, 300
    # One ring: mean 100.29, rms 100.54, stddev 7.0; only 300 exceeds mean + 1.5 rms.
    got = image_stats(pixels, U32_SAT, (16.0, 16.0), bins=1)
    assert got["spots"] == 1
    assert image_stats(pixels, U32_SAT, (16.0, 16.0), sensitivity=0.05, bins=1)["spots"] == 2


def test_non_finite_centre_means_image_centre(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 1000, size=(40, 60), dtype=np.uint32)
    expected = image_stats(pixels, U32_SAT, (30.0, 20.0))
    assert image_stats(pixels, U32_SAT, (math.nan, math.inf)) == expected


def test_window_maps_beam_centre_to_output() -> None:
    window = Window(x0=100, y0=50, width=200, height=300, out_width=50, out_height=100)
    assert window.to_output(150.0, 80.0) == (12.5, 10.0)


def test_reduce_frame_maps_beam_centre_into_output(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 1000, size=(256, 256), dtype=np.uint32)
    meta = {"beam_center_x": 100.0, "beam_center_y": 60.0}
    params = ViewParams(xsize=64, zoom=2.0, segcol=0.5, segrow=0.0)
    reduced = reduce_frame(Frame(pixels.copy(), None, U32_SAT, meta), params)
    # Window x0 = 64, y0 = 0, 128 source pixels -> 64 output: factor 2.
    expected = image_stats(reduced.pixels, U32_SAT, ((100.0 - 64) / 2, 60.0 / 2))
    assert reduced.meta["spots"] == expected["spots"]
    assert {k: reduced.meta[k] for k in expected} == expected


@pytest.mark.parametrize("meta", [{}, {"beam_center_x": "x"}, {"beam_center_x": math.nan}])
def test_missing_beam_centre_uses_image_centre(
    rng: np.random.Generator, meta: dict[str, Any]
) -> None:
    pixels = rng.integers(0, 1000, size=(200, 120), dtype=np.uint32)
    reduced = reduce_frame(Frame(pixels.copy(), None, U32_SAT, meta), ViewParams(xsize=40))
    centre = ((60.0 - 0) / 3, (100.0 - 0) / 5)
    assert reduced.meta["spots"] == image_stats(reduced.pixels, U32_SAT, centre)["spots"]


def test_reduce_frame_stats_match_reference_on_reduced_image(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 70000, size=(400, 380), dtype=np.uint32)
    pixels[7, 9] = U32_SAT
    meta = {"beam_center_x": 190.5, "beam_center_y": 210.5}
    reduced = reduce_frame(Frame(pixels, None, U32_SAT, meta), ViewParams(xsize=100))
    centre = (190.5 / 3.8, 210.5 / 4.0)
    expected = reference_stats(reduced.pixels, U32_SAT, centre, 1.5)
    assert_stats_match(reduced.meta, expected)
    assert reduced.meta["nSaturated"] == 1
