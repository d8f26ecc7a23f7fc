"""The label banner in the original's font (X11 9x15B) and placement (spec 5.8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from istasks.core import font_9x15b as font
from istasks.core.label import CELLS, GLYPH_ROWS, MAX_LABEL_BYTES, banner_text, draw_banner

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "compat" / "golden"
PCF = Path("/usr/share/fonts/X11/misc/9x15B.pcf.gz")
#: The glyph of "A", row by row ('#' = ink), as the font draws it.
GLYPH_A = """
.........
.........
...##....
..####...
.##..##..
##....##.
##....##.
##....##.
########.
##....##.
##....##.
##....##.
.........
.........
.........
"""


def _ink(banner: npt.NDArray[np.uint8]) -> list[str]:
    return ["".join("#" if v == 0 else "." for v in row) for row in banner]


def test_glyph_table() -> None:
    assert (font.WIDTH, font.HEIGHT, font.FIRST, font.LAST) == (9, 15, 32, 127)
    assert len(font.GLYPHS) == (font.LAST - font.FIRST + 1) * font.HEIGHT * 2
    assert _ink(CELLS[ord("A"), : font.HEIGHT]) == GLYPH_A.split()
    assert (CELLS[ord(" ")] == 255).all() and (CELLS[127] == 255).all()
    assert set(np.unique(CELLS)) == {0, 255}


def test_16th_row_is_the_next_glyphs_first_row() -> None:
    for code in range(font.FIRST, font.LAST):
        assert (CELLS[code, font.HEIGHT] == CELLS[code + 1, 0]).all()
    assert (CELLS[:, font.HEIGHT] == 255).all()  # every glyph of 9x15B starts blank


@pytest.mark.skipif(not (GOLDEN / "manifest.json").exists(), reason="../shared/compat absent")
def test_banner_is_the_originals() -> None:
    # Recorded from the original: label "frame", labelHeight 16, frame 2 of 1..4.
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == "small_f2_x512_label_h16")
    request, meta = case["request"], case["meta"]
    recorded = np.asarray(Image.open(GOLDEN / case["jpeg"]).convert("L")).astype(int)
    text = banner_text(request["label"], meta)
    assert text == "frame 2"
    ours = draw_banner(request["xsize"], request["labelHeight"], text)
    top = recorded[: request["labelHeight"]]
    assert (np.where(top < 128, 0, 255) == ours).all()  # every pixel, JPEG noise aside
    assert np.corrcoef(top.ravel(), ours.ravel())[0, 1] > 0.999


def test_black_glyphs_on_white_from_x0_with_a_9px_advance() -> None:
    banner = draw_banner(40, 16, "AA")
    assert banner.shape == (16, 40) and banner.dtype == np.uint8
    assert _ink(banner[:15, :9]) == GLYPH_A.split()
    assert (banner[:, :9] == banner[:, 9:18]).all()
    assert (banner[:, 18:] == 255).all() and (banner[15] == 255).all()


def test_characters_without_a_glyph_are_skipped_without_moving_the_pen() -> None:
    plain = draw_banner(100, 16, "ab")
    assert (draw_banner(100, 16, "a\tb") == plain).all()
    assert (draw_banner(100, 16, "aé\x01b") == plain).all()  # é is two bytes >= 128


def test_right_edge_test_uses_the_byte_index() -> None:
    # "b" is byte 3: 3 * 9 >= 20, so it is not drawn although the pen (9) has room.
    assert (draw_banner(20, 16, "a\t\tb") == draw_banner(20, 16, "a")).all()
    # byte 1 at x 9 on a 12-pixel banner: columns 9..12 pass the test, 12 is past the edge
    cut = draw_banner(12, 16, "aH")
    assert (cut[:, 9:] == CELLS[ord("H"), :16, :3]).all()
    # after a skipped byte the glyph sits at x 9 but is cut as if it were at x 18
    shifted = draw_banner(20, 16, "a\tH")
    assert (shifted[:, 9:12] == CELLS[ord("H"), :16, :3]).all()
    assert (shifted[:, 12:] == 255).all()


@pytest.mark.parametrize("rows", [1, 7, 15, 16, 17, 40, 64])
def test_banner_heights(rows: int) -> None:
    # 16 rows as the original; fewer: the first rows; more: the 16 rows over white.
    full = draw_banner(90, GLYPH_ROWS, "Hg_|")
    banner = draw_banner(90, rows, "Hg_|")
    assert banner.shape == (rows, 90)
    assert (banner[: min(rows, 16)] == full[: min(rows, 16)]).all()
    assert (banner[16:] == 255).all()


def test_banner_text_is_the_originals_62_byte_buffer() -> None:
    several = {"frame": 3, "first_frame": 1, "last_frame": 5}
    assert banner_text("x" * 61, several) == "x" * 61 + " "
    assert len(banner_text("y" * 70).encode()) == MAX_LABEL_BYTES
    assert banner_text("é" * 40) == "é" * 31  # 62 bytes, cut on a character boundary
    assert banner_text("ab\0cd", several) == "ab"
    assert banner_text("x_1", {"frame": 4, "first_frame": 4, "last_frame": 4}) == "x_1"


def test_no_text_or_no_rows() -> None:
    assert (draw_banner(30, 16, "") == 255).all()
    assert draw_banner(30, 0, "abc").shape == (0, 30)


@pytest.mark.skipif(not PCF.exists(), reason="xfonts-base not installed")
def test_committed_glyphs_match_the_font_file() -> None:
    script = ROOT / "scripts" / "extract_font.py"
    argv = [sys.executable, str(script), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
