"""The label banner drawn above a view (spec 5.8): black text on white, left aligned.

Fixes bug 12: the banner has exactly the requested height (0..64), so the JPEG is always
``image height + banner height`` rows; the original emitted 16 rows whatever the height,
dropping an image row for 1..15 and failing for 17..64. The frame number appended for
multi-frame datasets is the normalised one from the frame's meta (bug 18: the original
printed the raw request field, 0 when omitted). The font is Pillow's built-in scalable
font sized to the banner (the bitmap default when FreeType is missing).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from istasks.core.params import MAX_LABEL_HEIGHT

#: The original's label buffer held 63 characters.
MAX_LABEL_CHARS = 63

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def banner_height(height: int) -> int:
    """The banner rows actually drawn: 0 for heights outside 0..64 (spec 2.2)."""
    return height if 0 <= height <= MAX_LABEL_HEIGHT else 0


def banner_text(text: str, meta: Mapping[str, Any] | None = None) -> str:
    """Label text: ``text``, plus " <frame>" when the dataset has several frames.

    Non-printable characters are dropped and the result is cut to 63 characters.
    """
    if meta is not None and meta.get("first_frame") != meta.get("last_frame"):
        frame = meta.get("frame")
        if frame is not None:
            text = f"{text} {frame}"
    printable = "".join(ch for ch in text if ch.isprintable())
    return printable[:MAX_LABEL_CHARS]


def draw_banner(width: int, height: int, text: str) -> npt.NDArray[np.uint8]:
    """A (height, width) grey banner: white, with ``text`` in black from x = 0."""
    image = Image.new("L", (width, height), 255)
    if text and height > 0:
        font = fitted_font(height)
        top = 0
        if isinstance(font, ImageFont.FreeTypeFont):
            top = max((height - sum(font.getmetrics())) // 2, 0)
        ImageDraw.Draw(image).text((0, top), text, fill=0, font=font)
    return np.asarray(image)


@functools.lru_cache(maxsize=MAX_LABEL_HEIGHT + 1)
def fitted_font(height: int) -> Font:
    """The largest built-in font whose ascent + descent fits ``height`` pixels."""
    # Ascent + descent is ~1.25 x the size, so the search takes a dozen steps at most;
    # the result is cached per height.
    size = max(height, 1)
    font = _load_font(size)
    while size > 1 and isinstance(font, ImageFont.FreeTypeFont):
        if sum(font.getmetrics()) <= height:
            break
        size -= 1
        font = _load_font(size)
    return font


def _load_font(size: int) -> Font:
    """Pillow's default font at ``size``; the bitmap default without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):
        return ImageFont.load_default()
