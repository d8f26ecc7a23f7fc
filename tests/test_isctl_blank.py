"""``isctl render`` / ``isctl meta`` say on stderr why a view is blank and exit non-zero.

Run as operators run them (a process of the real command line) on files written by the
real tools: a nexgen NXmx master whose data files are absent (the case that once rendered
a grey blank with exit 0), and SMV images that decode but show nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ops.testdata.fabio_files import pattern, write_edf, write_smv
from ops.testdata.nxmx import write_nxmx

SHAPE = (64, 48)


def _isctl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def absent_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nexgen master (links + VDS, int32) whose data files were never written."""
    return write_nxmx(tmp_path_factory.mktemp("absent"), frames=2100, shape=SHAPE, data=False)


def test_render_of_missing_data_writes_nothing_and_says_why(
    absent_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "view.jpg"
    result = _isctl("render", absent_data, "--frame", "1001", "-o", out)
    assert result.returncode == 1
    assert not out.exists()
    assert "the service would answer blank" in result.stderr
    assert "frame 1001 not available" in result.stderr
    assert "xtal_1_000002.h5): data file missing" in result.stderr


def test_meta_of_missing_data_prints_meta_then_the_reason(absent_data: Path) -> None:
    result = _isctl("meta", absent_data, "--frame", "7")
    assert result.returncode == 1
    meta = json.loads(result.stdout)
    assert meta["frame_count"] == 2100 and meta["frame"] == 7
    assert "frame 7 would be served blank" in result.stderr
    assert "data file missing" in result.stderr


def test_meta_without_the_frame_check_succeeds(absent_data: Path) -> None:
    result = _isctl("meta", absent_data, "--no-frame")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["image_depth"] == 4


def test_render_of_present_data_succeeds(tmp_path: Path) -> None:
    master = write_nxmx(tmp_path, frames=3, shape=SHAPE)
    out = tmp_path / "view.jpg"
    result = _isctl("render", master, "--frame", "2", "--xsize", "64", "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:2] == b"\xff\xd8"
    assert "renders blank" not in result.stderr
    assert json.loads(result.stdout.splitlines()[0])["frame"] == 2


@pytest.mark.parametrize(
    ("pixels", "reason"),
    [
        (np.zeros(SHAPE, np.uint16), "every unmasked pixel is zero"),
        (np.full(SHAPE, 60000, np.uint16), "every unmasked pixel holds the saturation value"),
    ],
    ids=["zeros", "all-saturated"],
)
def test_render_of_a_featureless_frame_writes_it_and_exits_2(
    tmp_path: Path, pixels: np.ndarray, reason: str
) -> None:
    image = write_smv(tmp_path / "x.img", pixels)
    out = tmp_path / "view.jpg"
    result = _isctl("render", image, "-o", out)
    assert result.returncode == 2
    assert out.read_bytes()[:2] == b"\xff\xd8"
    assert f"frame 1 renders blank: {reason}" in result.stderr
    assert _isctl("meta", image).returncode == 2


def test_every_pixel_flagged_is_reported_as_masked(tmp_path: Path) -> None:
    image = write_edf(tmp_path / "x.edf", [np.full(SHAPE, -1, np.int32)])
    result = _isctl("meta", image)
    assert result.returncode == 2
    assert "renders blank: every pixel is masked" in result.stderr


def test_view_window_of_zeros_is_reported(tmp_path: Path) -> None:
    counts = np.zeros(SHAPE, np.uint16)
    counts[:8, :8] = pattern((8, 8), top=1000) + 1  # content in one corner only
    image = write_smv(tmp_path / "x.img", counts)
    out = tmp_path / "view.jpg"
    result = _isctl("render", image, "--zoom", "4", "--segcol", "0.5", "--segrow", "0.5", "-o", out)
    assert result.returncode == 2
    assert "every pixel in the view window is zero or masked" in result.stderr
    assert _isctl("render", image, "-o", out).returncode == 0
