"""is.js job objects: lenient field access (spec 1.4), normalisation, canonical JSON.

The C server read fields through jansson accessors that never fail: a wrong-typed or
missing integer reads as 0, a number accepts int or real, a string is None otherwise.
We keep that leniency for wire compatibility and normalise in one place (spec 2.2, 2.3).
Standard library only: the bridge imports this.
"""

from __future__ import annotations

import json
import math
from typing import Any

from istasks.core.params import (
    MAX_LABEL_HEIGHT,
    MIN_XSIZE,
    SPOTS_XSIZE,
    ContrastParams,
    LabelParams,
    ViewParams,
)

Job = dict[str, Any]


def int_field(job: Job, key: str) -> int:
    """jansson ``json_integer_value``: only a JSON integer counts, anything else is 0."""
    value = job.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value


def number_field(job: Job, key: str) -> float:
    """jansson ``json_number_value``: integer or real, anything else (or NaN/inf) is 0.0."""
    value = job.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        result = float(value)
    except OverflowError:  # an int beyond float range (the bridge refuses those anyway)
        return 0.0
    return result if math.isfinite(result) else 0.0


def str_field(job: Job, key: str) -> str | None:
    """jansson ``json_string_value``: the string, or None for any other type."""
    value = job.get(key)
    return value if isinstance(value, str) else None


def dumps(obj: object) -> str:
    """Compact JSON with sorted keys, raw UTF-8 and unescaped '/' (jansson's output)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def view_params(job: Job) -> ViewParams:
    """Normalise the geometry fields of a ``jpeg``/``spots`` job (spec 2.2).

    An ``xsize`` above the limit is kept as is here; the core refuses it with
    InvalidView so that the caller can send the blank fallback, as the original does.
    """
    frame = int_field(job, "frame")
    xsize = max(int_field(job, "xsize"), MIN_XSIZE)
    zoom = _nearest_tenth(number_field(job, "zoom"))
    segcol, segrow = number_field(job, "segcol"), number_field(job, "segrow")
    if zoom <= 1.0:
        zoom, segcol, segrow = 1.0, 0.0, 0.0
    keep_aspect = job.get("keepAspect") is True
    return ViewParams(
        frame=frame if frame > 0 else 1,
        xsize=xsize,
        zoom=zoom,
        segcol=segcol,
        segrow=segrow,
        keep_aspect=keep_aspect,
    )


def _nearest_tenth(value: float) -> float:
    """``value`` rounded to 0.1 as the original does, ``floor(10 * zoom + 0.5) / 10``
    (spec 5.5: halves go up, 1.25 -> 1.3, where Python's ``round`` gives 1.2); a value
    too large to scale stays as it is (``floor`` of the overflowed product would raise)."""
    scaled = value * 10.0 + 0.5
    return math.floor(scaled) / 10.0 if math.isfinite(scaled) else value


def contrast_params(job: Job) -> ContrastParams:
    """``wval``/``contrast`` as read by the original (missing means 0 / auto)."""
    return ContrastParams(wval=int_field(job, "wval"), contrast=int_field(job, "contrast"))


def label_params(job: Job) -> LabelParams:
    """Banner text and height; heights outside 0..64 mean no banner (spec 2.2)."""
    height = int_field(job, "labelHeight")
    if height < 0 or height > MAX_LABEL_HEIGHT:
        height = 0
    return LabelParams(text=str_field(job, "label") or "", height=height)


def spots_job(job: Job) -> Job:
    """The edits the original makes to a ``spots`` job before reducing (spec 2.3)."""
    edited = dict(job)
    if "xsize" not in edited:
        edited["xsize"] = SPOTS_XSIZE
    edited.update(segcol=0.0, segrow=0.0, zoom=1.0)
    return edited
