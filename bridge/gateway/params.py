"""Query parameters of the gateway's endpoints, checked strictly and turned into is.js jobs.

The wire protocol is lenient (a wrong-typed field reads as 0, spec 1.4); an HTTP client
gets a 422 that names the parameter instead. Every ``jpeg`` field of the wire protocol
can be given: ``frame, xsize, zoom, segcol, segrow, wval, contrast, label, labelHeight,
keepAspect``. Unknown parameters are refused, so a typo is not silently a default view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from bridge.gateway.problems import Problem
from istasks.core.params import MAX_LABEL_HEIGHT, MIN_XSIZE

#: Longest file name accepted (PATH_MAX).
MAX_FN_CHARS = 4096
#: Longest banner text (the banner of a 10000 px view holds ~1100 9x15 characters).
MAX_LABEL_CHARS = 1024
#: Largest frame number and zoom accepted (a detector series is far shorter; zoom beyond
#: the detector's size samples single pixels already).
MAX_FRAME = 10_000_000
MAX_ZOOM = 1000.0
#: Black/white levels are counts of at most 32-bit pixels.
LEVEL_RANGE = (-(2**31), 2**32)

Parser = Callable[[str, str], Any]


def _int(low: int, high: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise Problem(422, f"{name} must be an integer, not {raw[:40]!r}") from None
        if not low <= value <= high:
            raise Problem(422, f"{name} must be between {low} and {high}, not {value}")
        return value

    return parse


def _float(low: float, high: float) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise Problem(422, f"{name} must be a number, not {raw[:40]!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise Problem(422, f"{name} must be a finite number in [{low:g}, {high:g}]")
        return value

    return parse


def _text(limit: int) -> Parser:
    def parse(name: str, raw: str) -> str:
        if len(raw) > limit:
            raise Problem(422, f"{name} is longer than {limit} characters")
        if "\0" in raw:
            raise Problem(422, f"{name} contains a NUL character")
        return raw

    return parse


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise Problem(422, f"{name} must be true or false, not {raw[:40]!r}")


def view_fields(max_xsize: int) -> dict[str, Parser]:
    """Parsers of every ``jpeg`` field (``xsize`` bounded by ``IS_MAX_XSIZE``)."""
    return {
        "fn": _text(MAX_FN_CHARS),
        "frame": _int(1, MAX_FRAME),
        "xsize": _int(MIN_XSIZE, max_xsize),
        "zoom": _float(1.0, MAX_ZOOM),
        "segcol": _float(-MAX_ZOOM, MAX_ZOOM),
        "segrow": _float(-MAX_ZOOM, MAX_ZOOM),
        "wval": _int(*LEVEL_RANGE),
        "contrast": _int(*LEVEL_RANGE),
        "label": _text(MAX_LABEL_CHARS),
        "labelHeight": _int(0, MAX_LABEL_HEIGHT),
        "keepAspect": _bool,
    }


def frame_fields() -> dict[str, Parser]:
    """Parsers of a meta/spots request: the file and the frame."""
    return {"fn": _text(MAX_FN_CHARS), "frame": _int(1, MAX_FRAME)}


#: Largest detector coordinate a pixel request may name (no detector comes near it).
MAX_PIXEL_COORDINATE = 1 << 20


def pixel_fields() -> dict[str, Parser]:
    """Parsers of a pixel request: the file, the frame and the detector pixel (x, y)."""
    return frame_fields() | {
        "x": _int(0, MAX_PIXEL_COORDINATE),
        "y": _int(0, MAX_PIXEL_COORDINATE),
    }


#: What every query must name, and what each is (for the 422's text).
REQUIRED = {"fn": "the image file"}
#: A pixel request names the pixel too.
PIXEL_REQUIRED = REQUIRED | {"x": "a detector pixel", "y": "a detector pixel"}


INDEX_FIELDS: dict[str, Parser] = {
    "fn1": _text(MAX_FN_CHARS),
    "fn2": _text(MAX_FN_CHARS),
    "frame1": _int(1, MAX_FRAME),
    "frame2": _int(1, MAX_FRAME),
    "tag": _text(200),
}


def parse_query(
    query: Mapping[str, str],
    fields: Mapping[str, Parser],
    required: Mapping[str, str] = REQUIRED,
) -> dict[str, Any]:
    """The job fields of ``query``; 422 for unknown, repeated or bad parameters and for a
    missing ``required`` one (``fn``, unless told otherwise)."""
    values: dict[str, Any] = {}
    for name, raw in query.items():
        parser = fields.get(name)
        if parser is None:
            raise Problem(422, f"unknown parameter {name[:40]!r}")
        values[name] = parser(name, raw)
    for name, what in required.items():
        if values.get(name) in (None, ""):
            raise Problem(422, f"parameter {name} ({what}) is required")
    return values


def parse_index_body(body: object) -> dict[str, Any]:
    """The job fields of an index request's JSON body."""
    if not isinstance(body, dict):
        raise Problem(422, "the body must be a JSON object")
    values: dict[str, Any] = {}
    for name, raw in body.items():
        parser = INDEX_FIELDS.get(name)
        if parser is None:
            raise Problem(422, f"unknown field {str(name)[:40]!r}")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise Problem(422, f"{name} must be a string or an integer")
        values[name] = parser(name, str(raw))
    if not values.get("fn1"):
        raise Problem(422, "field fn1 (the first image file) is required")
    return values
