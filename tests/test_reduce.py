"""Reduction (spec 5.5) against a plain per-output-pixel reference, plus its edge cases."""

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
from istasks.core.reduce import plan_window
from istasks.core.view import reduce_frame
from istasks.errors import DataUnavailable, InvalidView

U16_SAT = 0xFFFF
U32_SAT = 0xFFFFFFFF


def source_indices(i: int, origin: int, win: int, dst: int) -> list[int]:
    """Source pixels feeding output pixel ``i`` on one axis: its tile, or the centre pick."""
    if win > dst:
        return list(range(origin + i * win // dst, origin + (i + 1) * win // dst))
    return [origin + math.floor((i + 0.5) * win / dst)]


def reference_reduce(
    pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_], params: ViewParams
) -> npt.NDArray[Any]:
    """Obviously-correct reduction: loop over output pixels, max of valid source pixels."""
    height, width = pixels.shape
    win_w = max(math.trunc(width / params.zoom), 1)
    win_h = max(math.trunc(height / params.zoom), 1)
    x0, y0 = math.trunc(win_w * params.segcol), math.trunc(win_h * params.segrow)
    dst_w = max(params.xsize, 8)
    dst_h = max(round(dst_w * win_h / win_w), 1) if params.keep_aspect else dst_w
    out = np.zeros((dst_h, dst_w), pixels.dtype)
    for i in range(dst_h):
        rows = [r for r in source_indices(i, y0, win_h, dst_h) if 0 <= r < height]
        for j in range(dst_w):
            cols = [c for c in source_indices(j, x0, win_w, dst_w) if 0 <= c < width]
            values = [int(pixels[r, c]) for r in rows for c in cols if not bad[r, c]]
            out[i, j] = max(values, default=0)
    return out


def make_frame(
    pixels: npt.NDArray[Any], bad: npt.NDArray[np.bool_] | None = None, **meta: Any
) -> Frame:
    saturation = U16_SAT if pixels.dtype.itemsize == 2 else U32_SAT
    mask = PixelMask(bad.copy()) if bad is not None else None
    return Frame(pixels.copy(), mask, saturation, dict(meta))


def random_image(
    rng: np.random.Generator, shape: tuple[int, int], dtype: type[np.unsignedinteger[Any]]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    high = 60000 if dtype is np.uint16 else 3_000_000_000
    pixels = rng.integers(0, high, size=shape, dtype=dtype)
    bad = rng.random(shape) < 0.1
    bad[:, shape[1] // 3] = True  # a module gap
    return pixels, bad


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize(
    ("shape", "params"),
    [
        ((37, 53), ViewParams(xsize=8)),
        ((53, 37), ViewParams(xsize=11)),
        ((61, 59), ViewParams(xsize=20, zoom=2.0, segcol=1.0, segrow=0.5)),
        ((61, 59), ViewParams(xsize=13, zoom=1.5, segcol=0.7, segrow=0.3)),
        ((61, 59), ViewParams(xsize=9, zoom=3.7, segcol=2.9, segrow=-0.4)),
        ((40, 45), ViewParams(xsize=16, zoom=2.0, segcol=-0.5, segrow=1.6)),
        ((40, 45), ViewParams(xsize=40, zoom=4.0, segcol=3.5, segrow=0.0)),
        ((23, 31), ViewParams(xsize=64)),
        ((23, 97), ViewParams(xsize=50)),
        ((97, 23), ViewParams(xsize=30, keep_aspect=True)),
        ((31, 77), ViewParams(xsize=19, zoom=1.3, segcol=0.2, keep_aspect=True)),
    ],
)
def test_matches_reference(
    rng: np.random.Generator,
    dtype: type[np.unsignedinteger[Any]],
    shape: tuple[int, int],
    params: ViewParams,
) -> None:
    pixels, bad = random_image(rng, shape, dtype)
    reduced = reduce_frame(make_frame(pixels, bad), params)
    expected = reference_reduce(pixels, bad, params)
    assert reduced.pixels.dtype == dtype
    np.testing.assert_array_equal(reduced.pixels, expected)


@st.composite
def views(draw: st.DrawFn) -> tuple[tuple[int, int], ViewParams, int]:
    """An image shape, a view of it (zoom windows anywhere, also off the image), a seed."""
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
    return shape, params, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_matches_reference_random_geometry(view: tuple[tuple[int, int], ViewParams, int]) -> None:
    shape, params, seed = view
    pixels, bad = random_image(np.random.default_rng(seed), shape, np.uint32)
    reduced = reduce_frame(make_frame(pixels, bad), params)
    np.testing.assert_array_equal(reduced.pixels, reference_reduce(pixels, bad, params))


def test_larger_frame_matches_reference(rng: np.random.Generator) -> None:
    pixels, bad = random_image(rng, (331, 297), np.uint32)
    params = ViewParams(xsize=71)
    reduced = reduce_frame(make_frame(pixels, bad), params)
    np.testing.assert_array_equal(reduced.pixels, reference_reduce(pixels, bad, params))


@pytest.mark.parametrize(("shape", "xsize"), [((23, 29), 8), ((29, 23), 13), ((41, 17), 9)])
@pytest.mark.parametrize("keep_aspect", [False, True])
def test_every_single_bright_pixel_survives(
    shape: tuple[int, int], xsize: int, keep_aspect: bool
) -> None:
    params = ViewParams(xsize=xsize, keep_aspect=keep_aspect)
    window = plan_window(shape, params, max_xsize=10000)
    assert window.width > window.out_width and window.height > window.out_height
    for row in range(shape[0]):
        for col in range(shape[1]):
            pixels = np.zeros(shape, np.uint32)
            pixels[row, col] = 1000
            reduced = reduce_frame(make_frame(pixels), params)
            assert int(reduced.pixels.max()) == 1000, (row, col)
            assert np.count_nonzero(reduced.pixels) == 1


def test_bright_pixel_in_zoom_window_survives_and_outside_is_dropped() -> None:
    pixels = np.zeros((100, 100), np.uint16)
    pixels[60, 70] = 500  # inside the window x 50..99, y 50..99
    pixels[10, 10] = 900  # outside
    params = ViewParams(xsize=8, zoom=2.0, segcol=1.0, segrow=1.0)
    reduced = reduce_frame(make_frame(pixels), params)
    assert int(reduced.pixels.max()) == 500
    assert np.count_nonzero(reduced.pixels) == 1


def test_nearest_mode_when_upsampling() -> None:
    pixels = np.arange(16, dtype=np.uint16).reshape(4, 4) + 1
    reduced = reduce_frame(make_frame(pixels), ViewParams(xsize=8))
    # Output pixel i samples the source pixel containing its centre: floor((i + .5) / 2).
    expected = np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(reduced.pixels, expected)


def test_nearest_mode_masked_pixel_gives_zero() -> None:
    pixels = np.full((4, 4), 7, np.uint32)
    bad = np.zeros((4, 4), bool)
    bad[1, 2] = True
    reduced = reduce_frame(make_frame(pixels, bad), ViewParams(xsize=8))
    assert np.count_nonzero(reduced.pixels == 0) == 4
    assert (reduced.pixels[2:4, 4:6] == 0).all()


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


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, U16_SAT), (np.uint32, U32_SAT)])
def test_saturated_pixels_keep_the_code_and_are_counted(
    dtype: type[np.unsignedinteger[Any]], code: int
) -> None:
    pixels = np.full((64, 64), 10, dtype)
    pixels[5, 5] = pixels[5, 6] = pixels[40, 33] = code
    pixels[20, 20] = code  # masked: neither shown nor counted
    bad = np.zeros((64, 64), bool)
    bad[20, 20] = True
    reduced = reduce_frame(make_frame(pixels, bad), ViewParams(xsize=8))
    assert reduced.pixels[0, 0] == code and reduced.pixels[5, 4] == code
    assert np.count_nonzero(reduced.pixels == code) == 2
    assert reduced.meta["nSaturated"] == 3
    assert reduced.saturation == code


def test_saturated_count_is_limited_to_the_window() -> None:
    pixels = np.zeros((64, 64), np.uint32)
    pixels[10, 10] = pixels[50, 50] = U32_SAT
    params = ViewParams(xsize=8, zoom=2.0, segcol=1.0, segrow=1.0)  # window 32..63
    assert reduce_frame(make_frame(pixels), params).meta["nSaturated"] == 1


def test_saturated_count_in_nearest_mode_covers_unsampled_pixels() -> None:
    pixels = np.zeros((6, 6), np.uint16)
    pixels[:, :] = U16_SAT  # every pixel saturated, 36 of them, upsampled to 8 x 8
    reduced = reduce_frame(make_frame(pixels), ViewParams(xsize=8))
    assert reduced.meta["nSaturated"] == 36
    assert (reduced.pixels == U16_SAT).all()


def test_many_saturated_outputs_are_counted_by_one_window_scan() -> None:
    pixels = np.full((100, 100), U32_SAT, np.uint32)
    bad = np.zeros((100, 100), bool)
    bad[:, 7] = True
    reduced = reduce_frame(make_frame(pixels, bad), ViewParams(xsize=50))  # 2500 hits
    assert (reduced.pixels == U32_SAT).all()
    assert reduced.meta["nSaturated"] == 100 * 99


def test_no_saturated_pixels_counts_zero(rng: np.random.Generator) -> None:
    pixels, bad = random_image(rng, (64, 64), np.uint32)
    assert reduce_frame(make_frame(pixels, bad), ViewParams(xsize=8)).meta["nSaturated"] == 0


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
    swapped = pixels.astype(">u2")
    reduced = reduce_frame(make_frame(swapped, bad), ViewParams(xsize=8))
    assert reduced.pixels.dtype == np.uint16
    np.testing.assert_array_equal(
        reduced.pixels, reference_reduce(pixels, bad, ViewParams(xsize=8))
    )


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
