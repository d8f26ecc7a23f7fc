"""Normalised request parameters of the view pipeline (standard library only).

The bridge and the workers both build these from is.js jobs (see ``istasks.jobs``), so
this module must stay free of numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Smallest output width; the original clamps smaller requests up to it (spec 2.2).
MIN_XSIZE = 8
#: Default output width of a ``spots`` request (IS_DEFAULT_SPOT_IMAGE_WIDTH).
SPOTS_XSIZE = 384
#: Largest label banner the original accepts; larger values mean "no banner".
MAX_LABEL_HEIGHT = 64
#: Names the reduction algorithm inside cache keys, so that reduced images cached by an
#: older algorithm are never served: "r2" is the original's centred boxes (issue 11);
#: keys without it held the tiling boxes.
REDUCTION_VERSION = "r2"


@dataclass(frozen=True)
class ViewParams:
    """What determines a reduced image: frame, output width and zoom window.

    ``zoom`` is already rounded to 0.1 and >= 1 (segcol/segrow forced to 0 when 1).
    ``keep_aspect`` is our opt-in extension: output height follows the detector's
    aspect ratio instead of the original's square output (spec 5.5, bug 11).
    """

    frame: int = 1
    xsize: int = 1024
    zoom: float = 1.0
    segcol: float = 0.0
    segrow: float = 0.0
    keep_aspect: bool = False

    def cache_token(self, *, fold: bool = False) -> str:
        """Stable text naming this geometry inside a cache key: the original's
        ``<frame>-<zoom %.1f>-<segcol %.3f>-<segrow %.3f>-<xsize>`` (spec 5.9), our
        aspect flag, :data:`REDUCTION_VERSION` and ``-f`` for a picture with the edge
        fold (workers of different settings may share one cache)."""
        aspect = "a" if self.keep_aspect else "s"
        return (
            f"{self.frame}-{self.zoom:.1f}-{self.segcol:.3f}-{self.segrow:.3f}"
            f"-{self.xsize}-{aspect}-{REDUCTION_VERSION}{'-f' if fold else ''}"
        )


@dataclass(frozen=True)
class ContrastParams:
    """Black/white points: ``wval < 0`` and ``contrast <= 0`` mean automatic."""

    wval: int = 0
    contrast: int = -1


@dataclass(frozen=True)
class LabelParams:
    """Banner drawn above the image; height 0 means no banner."""

    text: str = ""
    height: int = 0
