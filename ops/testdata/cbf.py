"""Write Pilatus mini-CBF files as a PILATUS3 X 6M writes them, through fabio.

Byte-offset compressed int32 pixels, a PILATUS_1.2 mini-header, module gaps (-1) laid
out like the 6M's 5 x 12 modules of 487 x 195 pixels with 7- and 17-pixel gaps, and a
few bad pixels (-2). The default shape is the full 6M (2527 rows x 2463 columns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from fabio.cbfimage import CbfImage

from ops.testdata.pattern import diffraction_pattern

PILATUS_6M_SHAPE = (2527, 2463)
MODULE_ROWS, MODULE_COLS = 195, 487
GAP_ROWS, GAP_COLS = 17, 7
GAP, BAD = -1, -2
COUNT_CUTOFF = 1_048_575

#: The physical values the default mini-header states (units as in the header).
PIXEL_SIZE_M = 172e-6
EXPOSURE_TIME_S = 0.199
WAVELENGTH_A = 0.97872
DETECTOR_DISTANCE_M = 0.3
START_ANGLE_DEG = 12.5
ANGLE_INCREMENT_DEG = 0.2
DETECTOR_NAME = "PILATUS3 6M"


def beam_centre_px(shape: tuple[int, int]) -> tuple[float, float]:
    """(x, y) beam centre the default header states for an image of ``shape``."""
    return (shape[1] / 2 + 4.5, shape[0] / 2 - 2.5)


def mini_header(shape: tuple[int, int]) -> str:
    """A PILATUS3 6M mini-header in the detector's own wording."""
    beam_x, beam_y = beam_centre_px(shape)
    lines = [
        f"# Detector: {DETECTOR_NAME}, S/N 60-0123, LS-CAT 21-ID-D",
        "# 2025-11-14T12:30:07.123",
        f"# Pixel_size {PIXEL_SIZE_M:g} m x {PIXEL_SIZE_M:g} m",
        "# Silicon sensor, thickness 0.001000 m",
        f"# Exposure_time {EXPOSURE_TIME_S:.7f} s",
        "# Exposure_period 0.2000000 s",
        "# Tau = 1.991e-07 s",
        f"# Count_cutoff {COUNT_CUTOFF} counts",
        "# Threshold_setting: 6344 eV",
        "# Gain_setting: autog (vrf = 1.000)",
        "# N_excluded_pixels = 0",
        "# Excluded_pixels: badpix_mask.tif",
        "# Flat_field: (nil)",
        "# Image_path: /ramdisk/",
        f"# Wavelength {WAVELENGTH_A:.5f} A",
        f"# Detector_distance {DETECTOR_DISTANCE_M:.5f} m",
        f"# Beam_xy ({beam_x:.2f}, {beam_y:.2f}) pixels",
        "# Flux 0.000000",
        "# Filter_transmission 1.0000",
        f"# Start_angle {START_ANGLE_DEG:.4f} deg.",
        f"# Angle_increment {ANGLE_INCREMENT_DEG:.4f} deg.",
        "# Detector_2theta 0.0000 deg.",
        "# Polarization 0.990",
        "# Alpha 0.0000 deg.",
        "# Kappa 0.0000 deg.",
        f"# Phi {START_ANGLE_DEG:.4f} deg.",
        f"# Phi_increment {ANGLE_INCREMENT_DEG:.4f} deg.",
        "# Omega 0.0000 deg.",
        "# Omega_increment 0.0000 deg.",
        "# Oscillation_axis X.CW",
        "# N_oscillations 1",
    ]
    return "\r\n".join(lines)


def module_gaps(shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """True on the inter-module gap pixels of a Pilatus 6M-like layout of ``shape``."""
    rows = np.arange(shape[0]) % (MODULE_ROWS + GAP_ROWS) >= MODULE_ROWS
    cols = np.arange(shape[1]) % (MODULE_COLS + GAP_COLS) >= MODULE_COLS
    return rows[:, None] | cols[None, :]


def cbf_pixels(shape: tuple[int, int], seed: int = 0) -> npt.NDArray[np.int32]:
    """The seeded int32 image :func:`write_cbf` stores: counts, -1 gaps, five -2 pixels."""
    rng = np.random.default_rng(seed)
    counts = diffraction_pattern(shape, rng, background=3.0, spot_peak=2000.0)
    pixels = np.minimum(counts, COUNT_CUTOFF).astype(np.int32)
    pixels[module_gaps(shape)] = GAP
    flat = pixels.reshape(-1)
    flat[rng.choice(flat.size, 5, replace=False)] = BAD
    return pixels


def write_cbf(
    path: Path,
    *,
    shape: tuple[int, int] = PILATUS_6M_SHAPE,
    seed: int = 0,
    header: str | None = None,
) -> Path:
    """Write a mini-CBF of ``shape`` (rows, columns) to ``path`` and return ``path``.

    ``header`` replaces the default mini-header text (lines starting with ``# ``).
    """
    image = CbfImage(
        data=cbf_pixels(shape, seed),
        header={
            "_array_data.header_convention": "PILATUS_1.2",
            "_array_data.header_contents": mini_header(shape) if header is None else header,
        },
    )
    image.write(str(path))
    return path
