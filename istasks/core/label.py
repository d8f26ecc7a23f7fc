"""The label banner drawn above a view (spec 5.8), in the original's font and placement.

The font is X11 misc-fixed "9x15B" (:mod:`istasks.core.font_9x15b`), drawn as the
original's ``isJpegLabel`` did: black glyph pixels on white, left aligned from x = 0 with
no margins, a 9-pixel advance. The text is the UTF-8 bytes of the label, cut to 62 bytes
(the original's ``snprintf`` into 63); bytes below 32 or above 127 (``char`` is signed)
are skipped without advancing the pen, while the right-edge test still uses the byte's
index: a glyph is drawn only if ``index * 9 < width``, and only its columns
``index * 9 + column <= width`` (the one pixel past the edge the original wrote into the
next buffer is dropped).

Rows: the original emitted ``min(height, 15) + 1`` glyph rows whatever the height; the
16th reads the first row of the next character's glyph (blank for every glyph of this
font). A 16-row banner is exactly that. Our fixes (bug 12): a banner of 1..15 rows is the
glyphs' first ``height`` rows (the original wrote one row more and lost the image's
last row), one of 17..64 rows is the 16-row banner over white rows (the original failed
with "jpeg compression error"). The frame number appended for multi-frame datasets is the
normalised one from the frame's meta (bug 18: the original printed the raw request
field, 0 when omitted; the two agree whenever the client sends ``frame``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from istasks.core import font_9x15b as font
from istasks.core.params import MAX_LABEL_HEIGHT

#: The original's label buffer held 63 bytes with the NUL: 62 bytes of text.
MAX_LABEL_BYTES = 62
#: Rows the original drew from the font: the glyph rows plus one.
GLYPH_ROWS = font.HEIGHT + 1
INK, PAPER = 0, 255


def _cells() -> npt.NDArray[np.uint8]:
    """(256, 16, 9) grey cells by byte value: the 15 glyph rows, then the first row of
    the next character's glyph, as the original's 16th row read it. Bytes without a
    glyph (below 32, above 127) are never drawn; their cells are blank."""
    words = np.frombuffer(font.GLYPHS, dtype=">u2").reshape(-1, font.HEIGHT)
    bits = (words[..., None] >> (15 - np.arange(font.WIDTH))) & 1  # (96, 15, 9)
    glyphs = np.where(bits.astype(bool), INK, PAPER).astype(np.uint8)
    cells = np.full((256, GLYPH_ROWS, font.WIDTH), PAPER, np.uint8)
    cells[font.FIRST : font.LAST + 1, : font.HEIGHT] = glyphs
    cells[font.FIRST : font.LAST, font.HEIGHT] = glyphs[1:, 0]  # DEL's next glyph: blank
    cells.setflags(write=False)
    return cells


CELLS = _cells()


def banner_height(height: int) -> int:
    """The banner rows actually drawn: 0 for heights outside 0..64 (spec 2.2)."""
    return height if 0 <= height <= MAX_LABEL_HEIGHT else 0


def banner_text(text: str, meta: Mapping[str, Any] | None = None) -> str:
    """Label text as the original's buffer held it: ``text``, plus " <frame>" when the
    dataset has several frames, up to a NUL, cut to 62 UTF-8 bytes (on a character
    boundary: the bytes of a cut character would not be drawn anyway). Characters
    without a glyph are kept, since they take an index (see :func:`draw_banner`)."""
    if meta is not None and meta.get("first_frame") != meta.get("last_frame"):
        frame = meta.get("frame")
        if frame is not None:
            text = f"{text} {frame}"
    text = text.split("\0", 1)[0]
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_LABEL_BYTES:
        return text
    return raw[:MAX_LABEL_BYTES].decode("utf-8", "ignore")


def draw_banner(width: int, rows: int, text: str) -> npt.NDArray[np.uint8]:
    """A (rows, width) grey banner: white, ``text`` in black from x = 0 (see module doc)."""
    banner = np.full((rows, width), PAPER, np.uint8)
    drawn = min(rows, GLYPH_ROWS)
    pen = 0
    for index, byte in enumerate(text.encode("utf-8", "surrogatepass")):
        if byte < font.FIRST or byte > font.LAST:
            continue  # no glyph: skipped, the pen stays
        start = index * font.WIDTH
        if start >= width:
            break
        columns = min(font.WIDTH, width - start + 1, width - pen)
        if columns > 0:
            banner[:drawn, pen : pen + columns] = CELLS[byte, :drawn, :columns]
        pen += min(font.WIDTH, width - start + 1)
    return banner
