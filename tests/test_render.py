"""Contrast, label banner, JPEG encoding, blank fallback and the cached form of a Reduced."""

from __future__ import annotations

import io
import json
import math
import struct
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from istasks import jobs
from istasks.core.contrast import (
    RED,
    Levels,
    contrast_levels,
    marked_view,
    saturated_indices,
    to_8bit,
)
from istasks.core.jpeg import Encoded, encode_jpeg, encode_view
from istasks.core.label import MAX_LABEL_BYTES, banner_text, draw_banner
from istasks.core.params import ContrastParams, LabelParams, ViewParams
from istasks.core.readers.base import Frame, PixelMask
from istasks.core.view import Reduced, reduce_frame, render_blank, render_jpeg
from istasks.errors import DataUnavailable, EncodeError

U16_SAT = 0xFFFF
U32_SAT = 0xFFFFFFFF


def decode(encoded: Encoded) -> Image.Image:
    assert encoded.media_type == "image/jpeg"
    assert encoded.data[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(encoded.data))
    image.load()
    return image


def spec_grey(value: int, white: int, black: int) -> int:
    """Spec 5.7 in exact arithmetic: trunc(255 - (v - w) / (b - w) * 255)."""
    if value <= white:
        return 255
    if value >= black:
        return 0
    return math.trunc(255 - Fraction(value - white, black - white) * 255)


def reduced_image(pixels: npt.NDArray[Any], saturation: int = U32_SAT, **meta: Any) -> Reduced:
    return Reduced(pixels, saturation, {"mean": 100.0, "stddev": 20.0, **meta})


# --- contrast ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "mean", "stddev", "expected"),
    [
        (ContrastParams(wval=0, contrast=-1), 100.7, 20.5, Levels(0, 121)),
        (ContrastParams(wval=-1, contrast=0), 100.7, 20.5, Levels(80, 121)),
        (ContrastParams(wval=-5, contrast=-1), 3.0, 10.0, Levels(0, 13)),
        (ContrastParams(wval=50, contrast=40), 0.0, 0.0, Levels(50, 51)),
        (ContrastParams(wval=50, contrast=50), 0.0, 0.0, Levels(50, 51)),
        (ContrastParams(wval=10, contrast=300), 1e6, 1.0, Levels(10, 300)),
        (ContrastParams(wval=0, contrast=-1), 0.0, 0.0, Levels(0, 1)),
    ],
)
def test_contrast_levels(
    params: ContrastParams, mean: float, stddev: float, expected: Levels
) -> None:
    assert contrast_levels(params, {"mean": mean, "stddev": stddev}) == expected


def test_contrast_levels_tolerate_bad_meta() -> None:
    meta = {"mean": "x", "stddev": math.nan}
    assert contrast_levels(ContrastParams(wval=-1, contrast=-1), meta) == Levels(0, 1)


@pytest.mark.parametrize(
    ("white", "black"), [(0, 1), (10, 300), (7, 1000), (1000, 70000), (65000, 65600)]
)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_grey_levels_follow_the_spec_formula_exactly(
    white: int, black: int, dtype: type[np.unsignedinteger[Any]]
) -> None:
    top = min(black + 5, int(np.iinfo(dtype).max) - 1)
    values = np.arange(max(white - 5, 0), top + 1, dtype=np.int64)
    pixels = values.astype(dtype).reshape(1, -1)
    view = to_8bit(pixels, int(np.iinfo(dtype).max), Levels(white, black))
    assert view.shape == pixels.shape and view.dtype == np.uint8
    expected = [spec_grey(int(v), white, black) for v in pixels.ravel()]
    assert view.ravel().tolist() == expected


@given(st.integers(0, 2**32), st.integers(1, 2**32), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_grey_levels_for_any_levels_are_the_exact_formula(white: int, span: int, seed: int) -> None:
    """Spans of every size (a table below 2**16, a division per pixel above)."""
    rng = np.random.default_rng(seed)
    near = np.clip(rng.integers(white - 3, white + span + 3, 48), 0, 2**32 - 1)
    pixels = np.concatenate([near, rng.integers(0, 2**32, 16)]).astype(np.uint32).reshape(4, 16)
    view = to_8bit(pixels, U32_SAT, Levels(white, white + span))
    expected = [
        spec_grey(int(v), white, white + span) if v != U32_SAT else -1 for v in pixels.ravel()
    ]
    got = view.ravel().tolist() if view.ndim == 2 else view[..., 1].ravel().tolist()
    assert [g for g, e in zip(got, expected, strict=True) if e >= 0] == [
        e for e in expected if e >= 0
    ]


def test_grey_view_for_large_32_bit_values() -> None:
    pixels = np.array([[0, 2**31, 4_000_000_000, U32_SAT - 1]], np.uint32)
    view = to_8bit(pixels, U32_SAT, Levels(0, U32_SAT - 1))
    assert view.ravel().tolist() == [spec_grey(int(v), 0, U32_SAT - 1) for v in pixels.ravel()]


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, U16_SAT), (np.uint32, U32_SAT)])
def test_saturated_pixels_are_pure_red(dtype: type[np.unsignedinteger[Any]], code: int) -> None:
    pixels = np.array([[0, 50, code], [code, 200, 100]], dtype)
    view = to_8bit(pixels, code, Levels(0, 100), top_rows=2)
    assert view.shape == (4, 3, 3)
    assert (view[:2] == 255).all()
    assert tuple(view[2, 2]) == RED and tuple(view[3, 0]) == RED
    assert tuple(view[2, 1]) == (127, 127, 127)  # trunc(255 - 0.5 * 255)
    assert tuple(view[3, 1]) == (0, 0, 0) and tuple(view[2, 0]) == (255, 255, 255)


def test_no_saturated_pixel_gives_grey_view() -> None:
    view = to_8bit(np.array([[1, 2]], np.uint16), U16_SAT, Levels(0, 2), top_rows=1)
    assert view.shape == (2, 2)
    assert view.tolist() == [[255, 255], [127, 0]]


def test_render_reports_levels_used(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 1000, size=(64, 64), dtype=np.uint32)
    reduced = reduced_image(pixels)
    auto = render_jpeg(reduced, ContrastParams(wval=-1, contrast=-1), LabelParams())
    assert (auto.wval_used, auto.bval_used) == (80, 120)
    manual = render_jpeg(reduced, ContrastParams(wval=30, contrast=20), LabelParams())
    assert (manual.wval_used, manual.bval_used) == (30, 31)
    assert decode(manual.jpeg).size == (64, 64)


def test_render_with_saturation_is_colour_with_red_block() -> None:
    pixels = np.zeros((64, 64), np.uint16)
    pixels[16:32, 16:32] = U16_SAT
    rendered = render_jpeg(
        reduced_image(pixels, U16_SAT), ContrastParams(wval=0, contrast=10), LabelParams()
    )
    image = decode(rendered.jpeg)
    assert image.mode == "RGB"
    red = np.asarray(image)[20:28, 20:28].astype(int)
    assert (red[..., 0] > 230).all() and (red[..., 1:] < 30).all()
    assert (np.asarray(image)[40:, 40:] > 240).all()


def test_render_without_saturation_is_grey(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 100, size=(32, 48), dtype=np.uint32)
    image = decode(render_jpeg(reduced_image(pixels), ContrastParams(), LabelParams()).jpeg)
    assert image.mode == "L" and image.size == (48, 32)


@pytest.mark.parametrize(
    "pixels", [np.zeros((0, 4), np.uint16), np.zeros((4, 4), np.float64), np.zeros(4, np.uint16)]
)
def test_render_refuses_unusable_pixels(pixels: npt.NDArray[Any]) -> None:
    with pytest.raises(DataUnavailable):
        render_jpeg(reduced_image(pixels), ContrastParams(), LabelParams())


# --- label ------------------------------------------------------------------------------


@pytest.mark.parametrize("height", [0, 1, 15, 16, 17, 64])
def test_label_height_gives_exact_jpeg_size(height: int, rng: np.random.Generator) -> None:
    # The original dropped a row for 1..15 and failed for 17..64 (bug 12).
    pixels = rng.integers(0, 200, size=(96, 96), dtype=np.uint32)
    reduced = reduced_image(pixels, frame=10, first_frame=1, last_frame=20)
    rendered = render_jpeg(reduced, ContrastParams(), LabelParams("x_1", height))
    assert decode(rendered.jpeg).size == (96, 96 + height)


def test_spec_example_size() -> None:
    reduced = reduced_image(np.ones((512, 512), np.uint32), frame=10, first_frame=1, last_frame=9)
    rendered = render_jpeg(reduced, ContrastParams(wval=0, contrast=-1), LabelParams("x_1", 16))
    assert decode(rendered.jpeg).size == (512, 528)


@pytest.mark.parametrize("label_height", [17, 64])
def test_label_with_saturation_keeps_exact_size(label_height: int) -> None:
    pixels = np.zeros((40, 50), np.uint32)
    pixels[0, 0] = U32_SAT
    rendered = render_jpeg(
        reduced_image(pixels), ContrastParams(), LabelParams("sat", label_height)
    )
    image = decode(rendered.jpeg)
    assert image.mode == "RGB" and image.size == (50, 40 + label_height)


def test_banner_draws_dark_text_on_white() -> None:
    banner = draw_banner(200, 16, "x_1 10")
    assert banner.shape == (16, 200) and banner.dtype == np.uint8
    assert banner.min() < 80  # glyphs
    assert (banner[:, 120:] == 255).all()  # nothing after the text
    assert (draw_banner(200, 16, "") == 255).all()


def test_banner_in_rendered_jpeg() -> None:
    reduced = reduced_image(np.zeros((64, 128), np.uint32))  # all white image
    rendered = render_jpeg(reduced, ContrastParams(wval=0, contrast=10), LabelParams("HH", 20))
    grey = np.asarray(decode(rendered.jpeg)).astype(int)
    assert grey[:20, :30].min() < 100  # text in the banner, at the left
    assert grey[20:, :].min() > 240  # image rows untouched


@pytest.mark.parametrize(
    ("text", "meta", "expected"),
    [
        ("x_1", {"frame": 7, "first_frame": 1, "last_frame": 100}, "x_1 7"),
        ("x_1", {"frame": 1, "first_frame": 1, "last_frame": 1}, "x_1"),
        ("x_1", {}, "x_1"),
        ("a\tb\x7fc\x00d", {}, "a\tb\x7fc"),  # kept: skipped when drawn; a NUL ends it
        ("é✓", {}, "é✓"),
        ("y" * 70, {"frame": 3, "first_frame": 1, "last_frame": 5}, "y" * MAX_LABEL_BYTES),
        ("", {"frame": 3, "first_frame": 1, "last_frame": 5}, " 3"),
    ],
)
def test_banner_text(text: str, meta: dict[str, Any], expected: str) -> None:
    assert banner_text(text, meta) == expected


def test_frame_number_comes_from_frame_meta() -> None:
    # Bug 18: the original printed the raw request field (0 when omitted).
    pixels = np.ones((4, 4), np.uint16)
    frame = Frame(pixels, None, U16_SAT, {"frame": 1, "first_frame": 1, "last_frame": 9})
    reduced = reduce_frame(frame, ViewParams(frame=1, xsize=8))
    assert banner_text("lbl", reduced.meta) == "lbl 1"


# --- JPEG -------------------------------------------------------------------------------


def test_encode_grey_and_rgb(rng: np.random.Generator) -> None:
    grey = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2)
    assert decode(encode_jpeg(grey, quality=90)).mode == "L"
    image = decode(encode_jpeg(rgb, quality=75))
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (33, 47), (9, 8), (1, 9), (1, 1)])
def test_marked_view_encodes_like_its_rgb_image(
    height: int, width: int, rng: np.random.Generator
) -> None:
    """The colour planes made from the grey view and its red pixels give the image that
    encoding the RGB view gives, to within rounding (far below the JPEG's own error)."""
    pixels = rng.integers(0, 300, size=(height, width)).astype(np.uint32)
    red = rng.choice(pixels.size, size=max(1, pixels.size // 20), replace=False)
    pixels.reshape(-1)[red] = U32_SAT
    pixels[-1, -1] = U32_SAT  # an odd last row/column is replicated by the subsampling
    levels = Levels(0, 300)
    rgb = to_8bit(pixels, U32_SAT, levels)
    view = marked_view(pixels, levels, saturated_indices(pixels, U32_SAT))
    via_rgb = np.asarray(decode(encode_jpeg(rgb, quality=95)), dtype=float)
    via_planes = np.asarray(decode(encode_view(view, quality=95)), dtype=float)
    assert via_planes.shape == rgb.shape
    jpeg_error = np.abs(via_rgb - rgb).mean()
    assert np.abs(via_planes - via_rgb).mean() <= max(jpeg_error / 4, 0.5)
    r, g, _ = via_planes.reshape(-1, 3)[view.red].T
    assert (r - g > 20).all()  # red stays red (chroma is shared with 3 grey neighbours)


def test_marked_view_without_red_is_a_grey_jpeg(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 300, size=(16, 16)).astype(np.uint16)
    view = marked_view(pixels, Levels(0, 300), saturated_indices(pixels, U16_SAT), top_rows=4)
    assert view.red.size == 0 and view.grey.shape == (20, 16)
    assert (view.grey[:4] == 255).all()
    assert decode(encode_view(view, quality=90)).mode == "L"


def test_reduced_finds_its_saturated_pixels_once() -> None:
    pixels = np.zeros((4, 4), np.uint16)
    pixels[1, 2] = pixels[3, 0] = U16_SAT
    reduced = reduced_image(pixels, U16_SAT)
    first = reduced.saturated()
    assert first.tolist() == [6, 12]
    assert reduced.saturated() is first


def test_higher_quality_is_closer_and_bigger(rng: np.random.Generator) -> None:
    grey = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    low, high = encode_jpeg(grey, quality=30), encode_jpeg(grey, quality=100)
    assert len(high.data) > len(low.data)
    error_low = np.abs(np.asarray(decode(low)).astype(int) - grey).mean()
    error_high = np.abs(np.asarray(decode(high)).astype(int) - grey).mean()
    assert error_high < error_low


@pytest.mark.parametrize(
    ("array", "quality"),
    [
        (np.zeros((4, 4), np.uint16), 90),
        (np.zeros((4, 4, 4), np.uint8), 90),
        (np.zeros((0, 4), np.uint8), 90),
        (np.zeros((4, 70000), np.uint8), 90),
        (np.zeros((4, 4), np.uint8), 0),
        (np.zeros((4, 4), np.uint8), 101),
    ],
)
def test_encode_rejects_bad_input(array: npt.NDArray[Any], quality: int) -> None:
    with pytest.raises(EncodeError):
        encode_jpeg(array, quality=quality)


def test_render_passes_quality_through(rng: np.random.Generator) -> None:
    reduced = reduced_image(rng.integers(0, 200, size=(64, 64), dtype=np.uint32))
    q100 = render_jpeg(reduced, ContrastParams(), LabelParams(), quality=100).jpeg
    q50 = render_jpeg(reduced, ContrastParams(), LabelParams(), quality=50).jpeg
    assert len(q100.data) > len(q50.data)
    with pytest.raises(EncodeError):
        render_jpeg(reduced, ContrastParams(), LabelParams(), quality=0)


# --- blank fallback -----------------------------------------------------------------------


@pytest.mark.parametrize(("xsize", "width"), [(3, 8), (8, 8), (100, 100), (5000, 200)])
def test_blank_is_uniform_grey_square(xsize: int, width: int) -> None:
    # The upper clamp fixes bug 23 (the original allocated any xsize x xsize).
    image = decode(render_blank(xsize, LabelParams(), max_xsize=200))
    assert image.size == (width, width)
    assert np.abs(np.asarray(image).astype(int) - 0xF0).max() <= 1


def test_blank_with_label_has_banner_without_frame_number() -> None:
    image = decode(render_blank(100, LabelParams("x_1", 16)))
    assert image.size == (100, 116)
    grey = np.asarray(image).astype(int)
    assert grey[:16].min() < 100 and (grey[:16, 60:] > 250).all()
    assert np.abs(grey[16:] - 0xF0).max() <= 1


@pytest.mark.parametrize("label", [LabelParams("", 16), LabelParams("x_1", 0)])
def test_blank_without_label_text_or_height_is_square(label: LabelParams) -> None:
    assert decode(render_blank(50, label)).size == (50, 50)


# --- cached form ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_reduced_round_trip(rng: np.random.Generator, dtype: type[np.unsignedinteger[Any]]) -> None:
    pixels = rng.integers(0, int(np.iinfo(dtype).max), size=(200, 180), dtype=dtype)
    bad = np.zeros(pixels.shape, bool)
    bad[:, 90] = True
    meta = {"fn": "/d/x_master.h5", "frame": 2, "wavelength": 0.979, "array": np.arange(3)}
    code = int(np.iinfo(dtype).max)
    reduced = reduce_frame(Frame(pixels, PixelMask(bad), code, meta), ViewParams(xsize=60))
    data = reduced.to_bytes()
    assert len(data) < reduced.nbytes + 3072  # a small header: meta and the 16 rings
    back = Reduced.from_bytes(data)
    assert back.rings == reduced.rings and back.rings is not None and len(back.rings) == 16
    # An entry cached before rings were kept still reads (the meta endpoint leaves them out).
    older = Reduced(reduced.pixels, reduced.saturation, reduced.meta, reduced.sentinel)
    assert Reduced.from_bytes(older.to_bytes()).rings is None
    assert back.pixels.dtype == dtype and back.pixels.shape == (60, 60)
    np.testing.assert_array_equal(back.pixels, reduced.pixels)
    assert back.saturation == code
    assert back.meta == {**reduced.meta, "array": [0, 1, 2]}
    assert back.nbytes == reduced.nbytes == 60 * 60 * np.dtype(dtype).itemsize
    assert render_jpeg(back, ContrastParams(), LabelParams()).jpeg.data[:2] == b"\xff\xd8"


def _cached(header: dict[str, Any], pixel_bytes: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<4sI", b"ISR2", len(text)) + text + pixel_bytes


GOOD_HEADER = {"dtype": "<u2", "shape": [2, 3], "saturation": 65535, "meta": {}}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"ISR2",
        b"XXXX" + bytes(20),
        struct.pack("<4sI", b"ISR2", 1000) + b"{}",
        struct.pack("<4sI", b"ISR2", 3) + b"{x}",
        struct.pack("<4sI", b"ISR2", 2) + b"\xff\xfe",
        _cached(GOOD_HEADER, bytes(11)),
        _cached(GOOD_HEADER, bytes(13)),
        _cached({**GOOD_HEADER, "dtype": "<f8"}, bytes(12)),
        _cached({**GOOD_HEADER, "dtype": ["<u2"]}, bytes(12)),
        _cached({**GOOD_HEADER, "shape": [2, -3]}, bytes(12)),
        _cached({**GOOD_HEADER, "shape": [6]}, bytes(12)),
        _cached({**GOOD_HEADER, "shape": [10**30, 1]}, bytes(12)),
        _cached({**GOOD_HEADER, "saturation": "max"}, bytes(12)),
        _cached({**GOOD_HEADER, "meta": []}, bytes(12)),
        struct.pack("<4sI", b"ISR2", 2) + b"[]",
    ],
)
def test_corrupt_cached_reduced_is_data_unavailable(data: bytes) -> None:
    with pytest.raises(DataUnavailable):
        Reduced.from_bytes(data)


def test_minimal_cached_reduced_is_accepted() -> None:
    back = Reduced.from_bytes(_cached(GOOD_HEADER, np.arange(6, dtype="<u2").tobytes()))
    assert back.pixels.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back.sentinel is None


def test_cached_reduced_of_the_tiling_algorithm_is_refused() -> None:
    # "ISR1" entries hold the old tiling reduction (before issue 11): never served.
    text = json.dumps(GOOD_HEADER).encode()
    old = struct.pack("<4sI", b"ISR1", len(text)) + text + bytes(12)
    with pytest.raises(DataUnavailable, match="bad header"):
        Reduced.from_bytes(old)


@pytest.mark.parametrize(
    ("pixels", "sentinel"),
    [(np.full((64, 64), 7, np.uint16), 0xFFFF), (np.full((4, 4), 7, np.uint16), None)],
)
def test_cached_reduced_keeps_its_sentinel(pixels: npt.NDArray[Any], sentinel: int | None) -> None:
    # A 16-bit box view leaves 0xFFFF out of the statistics; a nearest view counts it.
    reduced = reduce_frame(Frame(pixels, None, U16_SAT, {}), ViewParams(xsize=8))
    assert reduced.sentinel == sentinel
    assert Reduced.from_bytes(reduced.to_bytes()).sentinel == sentinel


@pytest.mark.parametrize("sentinel", ["65535", True, 1.5])
def test_cached_reduced_with_a_bad_sentinel_is_data_unavailable(sentinel: object) -> None:
    with pytest.raises(DataUnavailable, match="sentinel"):
        Reduced.from_bytes(_cached({**GOOD_HEADER, "sentinel": sentinel}, bytes(12)))


# --- request fields read as the original read them (spec 1.4, 5.5, 5.7) -----------------


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"wval": 5, "contrast": 200}, ContrastParams(wval=5, contrast=200)),
        ({"wval": 5.0, "contrast": 200.0}, ContrastParams(wval=0, contrast=0)),  # reals: 0
        ({"wval": "5", "contrast": "200"}, ContrastParams(wval=0, contrast=0)),
        ({"wval": True}, ContrastParams(wval=0, contrast=0)),
        ({}, ContrastParams(wval=0, contrast=0)),  # missing: white 0, black automatic
        ({"wval": -1, "contrast": -1}, ContrastParams(wval=-1, contrast=-1)),
    ],
)
def test_contrast_fields_are_json_integers(job: dict[str, Any], expected: ContrastParams) -> None:
    assert jobs.contrast_params(job) == expected


def test_real_contrast_means_automatic_levels() -> None:
    # "contrast": 200.0 reads as 0, so bval = (int)(mean + stddev) (spec 5.7).
    meta = {"mean": 100.7, "stddev": 20.5}
    levels = contrast_levels(jobs.contrast_params({"wval": 5.0, "contrast": 200.0}), meta)
    assert levels == Levels(0, 121)


@pytest.mark.parametrize(
    ("zoom", "expected"),
    [(1.25, 1.3), (1.26, 1.3), (1.24, 1.2), (2.05, 2.1), (1.15, 1.2), (1.04, 1.0), (0.5, 1.0)],
)
def test_zoom_rounds_halves_up_like_the_original(zoom: float, expected: float) -> None:
    # floor(10 * zoom + 0.5) / 10 (spec 5.5); Python's round() would give 1.2 for 1.25.
    assert jobs.view_params({"zoom": zoom, "segcol": 1, "segrow": 1}).zoom == expected


def test_zoom_of_one_or_less_drops_the_segments() -> None:
    params = jobs.view_params({"zoom": 1.04, "segcol": 2.5, "segrow": -1})
    assert (params.zoom, params.segcol, params.segrow) == (1.0, 0.0, 0.0)
