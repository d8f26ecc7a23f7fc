"""Seeded diffraction-like images for the generated test files.

A smooth background falling off from the beam centre, one diffuse ring, Poisson noise
and sharp Bragg-like spots: enough structure for reduction, statistics and spot counts
to be meaningful, at any detector size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Relative weights of the 7-tap Gaussian that shapes each spot (sigma ~ 1 pixel).
_SPOT_KERNEL = np.exp(-0.5 * np.arange(-3, 4) ** 2)


def diffraction_pattern(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    background: float = 20.0,
    spots: int = 200,
    spot_peak: float = 4000.0,
) -> npt.NDArray[np.int64]:
    """Counts (int64, >= 0, unclipped) of a diffraction-like frame of ``shape``.

    Spot peak heights follow an exponential law of mean ``spot_peak``, so a few spots
    are much brighter than the rest, as on real frames.
    """
    rows, cols = shape
    y, x = np.ogrid[:rows, :cols]
    radius = np.hypot(y - rows / 2, x - cols / 2) / max(rows, cols)
    mean = background * (1 + 3 * np.exp(-radius / 0.15))
    mean = mean + background * np.exp(-(((radius - 0.3) / 0.01) ** 2))
    counts = rng.poisson(mean).astype(np.int64)
    impulses = np.zeros(shape, dtype=np.float64)
    where = (rng.integers(0, rows, spots), rng.integers(0, cols, spots))
    np.add.at(impulses, where, rng.exponential(spot_peak, spots))
    counts += np.rint(_blur(impulses)).astype(np.int64)
    return counts


def _blur(image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Separable Gaussian blur (edges wrap, harmless for synthetic spots)."""
    for axis in (0, 1):
        out = np.zeros_like(image)
        for shift, weight in zip(range(-3, 4), _SPOT_KERNEL, strict=True):
            out += weight * np.roll(image, shift, axis=axis)
        image = out
    return image
