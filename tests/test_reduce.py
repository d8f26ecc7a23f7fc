"""Reduction (spec 5.5) against a plain-loop transcription of the spec, plus edge cases.

Every output pixel, the saturated count and which pixels enter the statistics must equal
the transcription (:mod:`tests.spec_view`) exactly. The edge fold (our opt-in fix) is
tested on its own at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istasks.core.params import ViewParams
from istasks.core.readers.base import Frame, PixelMask
from istasks.core.reduce import (
    fold_edges,
    plan_boxes,
    plan_window,
    reduce_window,
    zero_masked,
)
from istasks.core.view import reduce_frame
from istasks.errors import DataUnavailable, InvalidView
from tests.spec_view import SpecView, spec_reduce

U16_SAT = 0xFFFF
U32_SAT = 0xFFFFFFFF


def make_frame(
    pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_] | None = None, **meta: Any
) -> Frame:
    saturation = U16_SAT if pixels.dtype.itemsize == 2 else U32_SAT
    mask = PixelMask(bad.copy()) if bad is not None else None
    return Frame(pixels.copy(), mask, saturation, dict(meta))


def random_image(
    rng: np.random.Generator, shape: tuple[int, int], dtype: type[np.unsignedinteger[Any]]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Random counts, ~3% saturated pixels (some masked), ~10% masked, one module gap."""
    high = 60000 if dtype is np.uint16 else 3_000_000_000
    pixels = rng.integers(0, high, size=shape, dtype=dtype)
    saturated = rng.random(shape) < 0.03
    pixels[saturated] = np.iinfo(dtype).max
    bad = rng.random(shape) < 0.1
    bad[:, shape[1] // 3] = True
    return pixels, bad


def spec_of(pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_], params: ViewParams) -> SpecView:
    return spec_reduce(
        pixels,
        bad,
        xsize=params.xsize,
        zoom=params.zoom,
        segcol=params.segcol,
        segrow=params.segrow,
        keep_aspect=params.keep_aspect,
    )


def assert_matches_spec(
    pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_], params: ViewParams
) -> None:
    reduced = reduce_frame(make_frame(pixels, bad), params)
    expected = spec_of(pixels, bad, params)
    assert reduced.pixels.dtype == pixels.dtype
    np.testing.assert_array_equal(reduced.pixels, expected.pixels)
    assert reduced.meta["nSaturated"] == expected.saturated
    in_stats = np.ones(reduced.pixels.shape, bool)
    if reduced.sentinel is not None:
        in_stats = reduced.pixels != reduced.sentinel
    np.testing.assert_array_equal(in_stats, expected.in_stats)


GEOMETRIES = [
    # box mode, non-integer ratios
    ((37, 53), ViewParams(xsize=8)),
    ((53, 37), ViewParams(xsize=11)),
    ((83, 97), ViewParams(xsize=9)),
    ((64, 64), ViewParams(xsize=8)),  # integer ratio: boxes tile exactly
    ((61, 59), ViewParams(xsize=13, zoom=1.5, segcol=0.7, segrow=0.3)),
    # zoom windows off the edges: negative and > 1 segments
    ((61, 59), ViewParams(xsize=8, zoom=2.0, segcol=1.0, segrow=0.5)),
    ((61, 59), ViewParams(xsize=9, zoom=3.7, segcol=2.9, segrow=-0.4)),
    ((90, 95), ViewParams(xsize=8, zoom=2.0, segcol=-0.5, segrow=1.6)),
    ((90, 95), ViewParams(xsize=10, zoom=1.3, segcol=-0.25, segrow=-0.3)),
    ((90, 95), ViewParams(xsize=8, zoom=4.0, segcol=3.5, segrow=0.0)),
    # nearest mode: upsampling, and win / dst in [1, 2) on one axis only
    ((23, 31), ViewParams(xsize=64)),
    ((40, 45), ViewParams(xsize=40, zoom=4.0, segcol=3.5, segrow=0.0)),
    ((20, 20), ViewParams(xsize=32, zoom=2.0, segcol=1.0, segrow=1.0)),  # column W wraps
    ((30, 30), ViewParams(xsize=24, zoom=2.0, segcol=-0.6, segrow=-1.2)),
    ((23, 97), ViewParams(xsize=50)),
    ((97, 23), ViewParams(xsize=30, keep_aspect=True)),
    ((31, 77), ViewParams(xsize=19, zoom=1.3, segcol=0.2, keep_aspect=True)),
    # a zoom beyond the image: a zero-wide window, every pixel samples the origin
    ((20, 30), ViewParams(xsize=8, zoom=50.0, segcol=0.3)),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(("shape", "params"), GEOMETRIES)
def test_matches_spec(
    rng: np.random.Generator,
    dtype: type[np.unsignedinteger[Any]],
    shape: tuple[int, int],
    params: ViewParams,
) -> None:
    pixels, bad = random_image(rng, shape, dtype)
    assert_matches_spec(pixels, bad, params)


@st.composite
def views(draw: st.DrawFn) -> tuple[tuple[int, int], ViewParams, int, bool]:
    """An image shape, a view of it (zoom windows anywhere, also off the image), a seed
    and the depth (True: 32-bit)."""
    shape = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    zoom = draw(st.integers(10, 50)) / 10
    segcol, segrow = (0.0, 0.0) if zoom == 1.0 else draw(st.tuples(*[st.floats(-2.0, 4.0)] * 2))
    params = ViewParams(
        xsize=draw(st.integers(8, 40)),
        zoom=zoom,
        segcol=segcol,
        segrow=segrow,
        keep_aspect=draw(st.booleans()),
    )
    return shape, params, draw(st.integers(0, 2**32 - 1)), draw(st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_matches_spec_random_geometry(view: tuple[tuple[int, int], ViewParams, int, bool]) -> None:
    shape, params, seed, wide = view
    dtype = np.uint32 if wide else np.uint16
    pixels, bad = random_image(np.random.default_rng(seed), shape, dtype)
    assert_matches_spec(pixels, bad, params)


def test_larger_frame_matches_spec(rng: np.random.Generator) -> None:
    pixels, bad = random_image(rng, (331, 297), np.uint32)
    assert_matches_spec(pixels, bad, ViewParams(xsize=71))


def test_boxes_are_centred_and_overlap() -> None:
    # 1028 -> 512 (the golden small frame): step 2.0078, a = 2, lo = hi = 1.
    boxes = plan_boxes(0, 1028, 512, 1028, check_samples=True)
    assert (boxes.out_lo, boxes.out_hi) == (0, 512)
    assert (boxes.starts[:3].tolist(), boxes.ends[:3].tolist()) == ([0, 1, 3], [1, 4, 6])
    widths = boxes.ends - boxes.starts
    assert np.count_nonzero(widths == 3) > 500  # mostly a + 1 wide
    assert (boxes.ends[:-1] >= boxes.starts[1:]).all()  # no gaps in the interior
    assert int(boxes.ends[-1]) == 1027  # the far edge misses the last column


def test_4150_to_512_misses_the_last_four_columns() -> None:
    boxes = plan_boxes(0, 4150, 512, 4150, check_samples=False)
    assert int(boxes.ends[-1]) == 4146
    assert int(plan_boxes(0, 4150, 512, 4150, check_samples=False, fold=True).ends[-1]) == 4150


@pytest.mark.parametrize(("shape", "xsize"), [((23, 29), 8), ((29, 23), 11), ((41, 17), 8)])
def test_single_bright_pixels_survive_in_the_interior(shape: tuple[int, int], xsize: int) -> None:
    params = ViewParams(xsize=xsize)
    window = plan_window(shape, params, max_xsize=10000)
    assert not window.nearest
    rows = plan_boxes(0, shape[0], xsize, shape[0], check_samples=True)
    cols = plan_boxes(0, shape[1], xsize, shape[1], check_samples=True)
    for row in range(int(rows.ends[-1])):
        for col in range(int(cols.ends[-1])):
            pixels = np.zeros(shape, np.uint32)
            pixels[row, col] = 1000
            reduced = reduce_frame(make_frame(pixels), params)
            assert int(reduced.pixels.max()) == 1000, (row, col)
            assert 1 <= np.count_nonzero(reduced.pixels) <= 4  # overlapping boxes


def test_16_bit_box_saturation_is_the_sentinel_and_nearest_is_not() -> None:
    pixels = np.full((64, 64), 10, np.uint16)
    pixels[5, 5] = U16_SAT
    boxed = reduce_frame(make_frame(pixels), ViewParams(xsize=8))
    assert boxed.sentinel == U16_SAT and boxed.pixels[1, 1] == U16_SAT  # box rows 4..11
    assert boxed.meta["n"] == 63 and boxed.meta["max"] == 10  # out of the statistics
    small = np.full((4, 4), 10, np.uint16)
    small[1, 1] = U16_SAT
    nearest = reduce_frame(make_frame(small), ViewParams(xsize=8))
    assert nearest.sentinel is None
    assert nearest.meta["n"] == 64 and nearest.meta["max"] == U16_SAT  # in, as 65535
    assert nearest.meta["nSaturated"] == 4  # each output pixel counts its read


def test_32_bit_saturation_is_the_sentinel_in_both_modes() -> None:
    small = np.full((4, 4), 10, np.uint32)
    small[1, 1] = U32_SAT
    nearest = reduce_frame(make_frame(small), ViewParams(xsize=8))
    assert nearest.sentinel == U32_SAT
    assert nearest.meta["n"] == 60 and nearest.meta["max"] == 10


def test_overlapping_boxes_count_a_saturated_pixel_twice() -> None:
    # 1028 -> 512: column 3 is in boxes 1 ([1, 4)) and 2 ([3, 6)); row 0 in box 0 only.
    pixels = np.zeros((1028, 1028), np.uint16)
    pixels[0, 3] = U16_SAT
    reduced = reduce_frame(make_frame(pixels), ViewParams(xsize=512))
    assert reduced.pixels[0, 1] == reduced.pixels[0, 2] == U16_SAT
    assert reduced.meta["nSaturated"] == 2


def test_many_saturated_boxes_are_counted_by_one_weighted_scan() -> None:
    pixels = np.full((100, 100), U32_SAT, np.uint32)
    bad = np.zeros((100, 100), bool)
    bad[:, 7] = True
    params = ViewParams(xsize=35)
    reduced = reduce_frame(make_frame(pixels, bad), params)
    assert np.count_nonzero(reduced.pixels == U32_SAT) > 1000  # over the one-by-one limit
    assert_matches_spec(pixels, bad, params)


def test_16_bit_nearest_column_w_reads_the_next_row() -> None:
    # Window [10, 20) of a 20-wide frame at 32 px: the last sample l = 19.6875 rounds to
    # column 20, i.e. flat index r * 20 + 20 = the first pixel of row r + 1 (spec 5.5).
    pixels = np.arange(400, dtype=np.uint16).reshape(20, 20) + 1
    params = ViewParams(xsize=32, zoom=2.0, segcol=1.0, segrow=0.0)
    reduced = reduce_frame(make_frame(pixels), params)
    rows = np.trunc(np.arange(32) * 10 / 32 + 0.5).astype(int)
    np.testing.assert_array_equal(reduced.pixels[:, 31], pixels[rows + 1, 0])
    wide = reduce_frame(make_frame(pixels.astype(np.uint32)), params)
    assert not wide.pixels[:, 31].any()  # 32-bit: a read outside the image is 0 (fix)


def test_16_bit_nearest_read_past_the_last_row_is_zero() -> None:
    # Window rows [10, 20) at 32 px: samples k >= 19.5 round to row 20 (past the buffer).
    pixels = np.full((20, 20), 7, np.uint16)
    reduced = reduce_frame(make_frame(pixels), ViewParams(xsize=32, zoom=2.0, segrow=1.0))
    assert not reduced.pixels[31].any() and (reduced.pixels[30, :31] == 7).all()


def test_16_bit_samples_outside_the_image_are_zero_and_in_the_stats() -> None:
    pixels = np.full((64, 64), 9, np.uint16)
    params = ViewParams(xsize=8, zoom=2.0, segcol=1.5, segrow=0.0)  # samples 48, 52, .. 76
    reduced = reduce_frame(make_frame(pixels), params)
    assert not reduced.pixels[:, 4:].any() and (reduced.pixels[:, :4] == 9).all()
    assert reduced.meta["n"] == 64 and reduced.meta["min"] == 0


def test_32_bit_sample_past_the_edge_gets_its_in_image_box() -> None:
    pixels = np.full((64, 64), 9, np.uint32)
    params = ViewParams(xsize=8, zoom=2.0, segcol=1.5, segrow=0.0)  # samples 48, 52, .. 76
    reduced = reduce_frame(make_frame(pixels), params)
    # Sample 64 (column 4) has box columns 62..65: its in-image part 62, 63 is not empty.
    assert (reduced.pixels[:, :5] == 9).all() and not reduced.pixels[:, 5:].any()


def test_window_entirely_outside_is_blank(rng: np.random.Generator) -> None:
    pixels, _ = random_image(rng, (50, 50), np.uint32)
    params = ViewParams(xsize=16, zoom=2.0, segcol=5.0, segrow=0.0)
    reduced = reduce_frame(make_frame(pixels), params)
    assert reduced.pixels.shape == (16, 16)
    assert not reduced.pixels.any()
    assert reduced.meta["n"] == 256 and reduced.meta["max"] == 0


def test_huge_segment_offsets_do_not_overflow(rng: np.random.Generator) -> None:
    pixels, _ = random_image(rng, (50, 50), np.uint16)
    for segment in (1e300, 1.7e308):
        params = ViewParams(xsize=16, zoom=2.0, segcol=segment, segrow=-segment)
        assert not reduce_frame(make_frame(pixels), params).pixels.any()


def test_saturated_count_is_limited_to_the_boxes() -> None:
    pixels = np.zeros((64, 64), np.uint32)
    pixels[10, 10] = pixels[50, 50] = U32_SAT
    params = ViewParams(xsize=8, zoom=2.0, segcol=1.0, segrow=1.0)  # window 32..63
    assert reduce_frame(make_frame(pixels), params).meta["nSaturated"] == 1


def test_masked_saturated_pixels_are_neither_shown_nor_counted() -> None:
    pixels = np.full((64, 64), 10, np.uint32)
    pixels[20, 20] = U32_SAT
    bad = np.zeros((64, 64), bool)
    bad[20, 20] = True
    reduced = reduce_frame(make_frame(pixels, bad), ViewParams(xsize=8))
    assert reduced.meta["nSaturated"] == 0 and int(reduced.pixels.max()) == 10


def test_fully_masked_box_is_zero() -> None:
    pixels = np.full((64, 64), 10, np.uint16)
    bad = np.zeros((64, 64), bool)
    bad[:4, :4] = True  # box (0, 0): rows/columns -4..3 at 64 -> 8, the image part masked
    reduced = reduce_frame(make_frame(pixels, bad), ViewParams(xsize=8))
    assert reduced.pixels[0, 0] == 0 and reduced.pixels[1, 1] == 10


def test_no_saturated_pixels_counts_zero(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 1000, size=(64, 64), dtype=np.uint32)
    assert reduce_frame(make_frame(pixels), ViewParams(xsize=8)).meta["nSaturated"] == 0


def test_lower_saturation_code_clamps_higher_counts() -> None:
    pixels = np.full((16, 16), 3, np.uint32)
    pixels[0, 0] = 2000
    pixels[8, 8] = 1000
    frame = Frame(pixels, None, 1000, {})
    reduced = reduce_frame(frame, ViewParams(xsize=8))
    assert int(reduced.pixels.max()) == 1000
    assert reduced.meta["nSaturated"] == 2


def test_mask_zeroes_frame_in_place() -> None:
    pixels = np.full((16, 16), 9, np.uint16)
    bad = np.zeros((16, 16), bool)
    bad[3, :] = True
    frame = make_frame(pixels, bad)
    reduce_frame(frame, ViewParams(xsize=8))
    assert not frame.pixels[3].any() and (frame.pixels[4] == 9).all()


def test_read_only_pixels_are_not_modified() -> None:
    pixels = np.full((16, 16), 9, np.uint16)
    pixels.setflags(write=False)
    bad = np.zeros((16, 16), bool)
    bad[3, :] = True
    frame = Frame(pixels, PixelMask(bad), U16_SAT, {})
    reduced = reduce_frame(frame, ViewParams(xsize=16))
    assert not reduced.pixels[3].any() and (pixels == 9).all()


def test_output_size_square_and_keep_aspect() -> None:
    pixels = np.ones((4362, 4148), np.uint16)
    assert reduce_frame(make_frame(pixels), ViewParams(xsize=64)).pixels.shape == (64, 64)
    tall = reduce_frame(make_frame(pixels), ViewParams(xsize=64, keep_aspect=True))
    assert tall.pixels.shape == (round(64 * 4362 / 4148), 64)


def test_xsize_over_limit_is_invalid_view() -> None:
    with pytest.raises(InvalidView, match="over the limit"):
        reduce_frame(make_frame(np.ones((8, 8), np.uint16)), ViewParams(xsize=10001))
    with pytest.raises(InvalidView):
        reduce_frame(make_frame(np.ones((8, 8), np.uint16)), ViewParams(xsize=65), max_xsize=64)


def test_keep_aspect_height_over_limit_is_invalid_view() -> None:
    with pytest.raises(InvalidView, match="height"):
        reduce_frame(
            make_frame(np.ones((400, 10), np.uint16)),
            ViewParams(xsize=100, keep_aspect=True),
            max_xsize=1000,
        )


@pytest.mark.parametrize(
    "pixels",
    [
        np.ones((8, 8), np.float32),
        np.ones((8, 8), np.int32),
        np.ones((2, 8, 8), np.uint16),
        np.ones((0, 8), np.uint16),
    ],
)
def test_unusable_pixels_are_data_unavailable(pixels: npt.NDArray[Any]) -> None:
    with pytest.raises(DataUnavailable):
        reduce_frame(Frame(pixels, None, U16_SAT, {}), ViewParams(xsize=8))


def test_byte_swapped_pixels_are_accepted(rng: np.random.Generator) -> None:
    pixels, bad = random_image(rng, (40, 30), np.uint16)
    reduced = reduce_frame(make_frame(pixels.astype(">u2"), bad), ViewParams(xsize=8))
    assert reduced.pixels.dtype == np.uint16
    np.testing.assert_array_equal(reduced.pixels, spec_of(pixels, bad, ViewParams(xsize=8)).pixels)


def test_mask_of_other_shape_is_data_unavailable() -> None:
    frame = Frame(np.ones((8, 8), np.uint16), PixelMask(np.ones((8, 9), bool)), U16_SAT, {})
    with pytest.raises(DataUnavailable, match="mask shape"):
        reduce_frame(frame, ViewParams(xsize=8))


def test_non_finite_window_is_invalid_view() -> None:
    with pytest.raises(InvalidView):
        reduce_frame(make_frame(np.ones((8, 8), np.uint16)), ViewParams(zoom=2.0, segcol=math.nan))


def test_meta_is_frame_meta_plus_stats() -> None:
    frame = make_frame(np.ones((16, 16), np.uint16), fn="/x.h5", frame=3, first_frame=1)
    reduced = reduce_frame(frame, ViewParams(xsize=8))
    assert reduced.meta["fn"] == "/x.h5" and reduced.meta["frame"] == 3
    stats = {"n", "mean", "rms", "stddev", "min", "max", "spots", "nSaturated"}
    assert stats <= reduced.meta.keys()
    assert "n" not in frame.meta


# --- the edge fold (our fix, in the picture after the statistics) ------------------


def _reductions(
    pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_], params: ViewParams
) -> tuple[Any, Any]:
    window = plan_window((pixels.shape[0], pixels.shape[1]), params, max_xsize=10000)
    zeroed = zero_masked(pixels.copy(), PixelMask(bad.copy()))
    code = int(np.iinfo(pixels.dtype).max)
    original = reduce_window(zeroed, window, code)
    folded = reduce_window(zeroed, window, code)
    fold_edges(zeroed, window, folded.pixels)
    return original, folded


FOLD_GEOMETRIES = [
    ((83, 97), ViewParams(xsize=9)),
    ((64, 64), ViewParams(xsize=8)),
    ((90, 95), ViewParams(xsize=8, zoom=2.0, segcol=-0.5, segrow=1.6)),
    ((90, 95), ViewParams(xsize=10, zoom=1.3, segcol=-0.25, segrow=-0.3)),
    ((61, 59), ViewParams(xsize=9, zoom=3.7, segcol=2.9, segrow=-0.4)),
    ((31, 77), ViewParams(xsize=8, keep_aspect=True)),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(("shape", "params"), FOLD_GEOMETRIES)
def test_edge_fold_changes_only_the_edge_boxes(
    rng: np.random.Generator,
    dtype: type[np.unsignedinteger[Any]],
    shape: tuple[int, int],
    params: ViewParams,
) -> None:
    pixels, bad = random_image(rng, shape, dtype)
    original, folded = _reductions(pixels, bad, params)
    np.testing.assert_array_equal(original.pixels, spec_of(pixels, bad, params).pixels)
    changed = np.argwhere(original.pixels != folded.pixels)
    window = plan_window(shape, params, max_xsize=10000)
    wide = dtype is np.uint32
    edges = []
    for origin, win, dst, size in (
        (window.y0, window.height, window.out_height, shape[0]),
        (window.x0, window.width, window.out_width, shape[1]),
    ):
        boxes = plan_boxes(origin, win, dst, size, check_samples=not wide)
        edges.append({boxes.out_lo, boxes.out_hi - 1})
    for row, col in changed.tolist():
        assert row in edges[0] or col in edges[1], (row, col)
    assert (folded.pixels >= original.pixels).all()  # a fold only adds pixels
    assert folded.saturated >= original.saturated


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize(
    ("shape", "params"),
    [
        ((41, 43), ViewParams(xsize=8)),
        ((50, 50), ViewParams(xsize=8, zoom=1.5, segcol=-0.4, segrow=0.7)),
    ],
)
def test_with_the_fold_every_window_pixel_survives(
    wide: bool, shape: tuple[int, int], params: ViewParams
) -> None:
    window = plan_window(shape, params, max_xsize=10000)
    rows = range(max(window.y0, 0), min(window.y0 + window.height, shape[0]))
    cols = range(max(window.x0, 0), min(window.x0 + window.width, shape[1]))
    dtype = np.uint32 if wide else np.uint16
    for row in rows:
        for col in cols:
            pixels = np.zeros(shape, dtype)
            pixels[row, col] = 1000
            _, folded = _reductions(pixels, np.zeros(shape, bool), params)
            assert int(folded.pixels.max()) == 1000, (row, col)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_the_fold_leaves_the_numbers_alone(
    rng: np.random.Generator, dtype: type[np.unsignedinteger[Any]]
) -> None:
    # 83 x 97 -> 9: the last columns and rows are in no box; put the brightest pixel there.
    pixels = rng.integers(0, 1000, (83, 97)).astype(dtype)
    pixels[82, 96] = 60000
    plain = reduce_frame(make_frame(pixels.copy()), ViewParams(xsize=9))
    folded = reduce_frame(make_frame(pixels.copy()), ViewParams(xsize=9), fold=True)
    assert folded.meta == plain.meta  # mean, rms, spots, levels: the original's
    assert int(plain.pixels.max()) < 60000 == int(folded.pixels[8, 8])
    changed = np.argwhere(plain.pixels != folded.pixels)
    assert all(row == 8 or col == 8 for row, col in changed.tolist())
