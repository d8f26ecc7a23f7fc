"""The viewer page in a real headless Chromium, against the real stack with its gateway.

Debian's ``chromium`` (installed by scripts/bootstrap.sh when run as root) is driven by
Playwright for Python through ``executable_path``: no browser is ever downloaded. The
test skips when either is missing. Set ``VIEWER_SCREENSHOT=<path.png>`` to keep the
screenshot it takes (README's picture is made that way).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from istasks.core.readers import open_reader
from istasks.core.view import prepare_frame
from ops.stack import Stack, dev_user
from ops.testdata.eiger import write_eiger

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("no chromium installed (apt-get install chromium)", allow_module_level=True)

#: The viewer's viewport and tile size (bridge/gateway/static/viewer.js).
S = 640


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="is-viewer-"))
    path.chmod(0o755)
    write_eiger(path, "x", nimages=4, frames_per_file=2, shape=(1062, 1028), seed=11)
    for item in path.iterdir():
        item.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from istasks.settings import Settings

    settings = Settings(worker_idle_s=300, view_timeout_s=20, gateway_port=0)
    with Stack.start(tmp_path_factory.mktemp("run"), settings, gateway=True) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def _hover(
    page: Any, box: dict[str, float], x: float, y: float
) -> tuple[str, tuple[float, float], tuple[float, float]]:
    """Move the mouse to (x, y) of the view; the resolution shown, and where the page saw
    the pointer and its pan (the layout has fractional offsets: the browser rounds)."""
    page.mouse.move(box["x"] + x, box["y"] + y)
    cursor, pan = page.evaluate("[state.cursor, [state.panX, state.panY]]")
    return page.text_content("#res") or "", tuple(cursor), tuple(pan)


def _resolution(
    meta: dict[str, Any], x: float, y: float, zoom: int = 1, pan: tuple[float, float] = (0, 0)
) -> float:
    """d (A) at screen point (x, y) from the frame's geometry. The tile under the point is
    the view zoom, segcol=c, segrow=r: window origin trunc(w * c) with w = trunc(width /
    zoom), output pixel i sampling i * w / xsize + origin (istasks.core.reduce)."""

    def detector(pos: float, offset: float, size: int) -> float:
        tile = min(int((pos + offset) // S), zoom - 1)
        window = math.trunc(size / zoom)
        return math.trunc(window * tile) + (pos + offset - tile * S) * window / S

    dx = detector(x, pan[0], meta["x_pixels_in_detector"])
    dy = detector(y, pan[1], meta["y_pixels_in_detector"])
    r = math.hypot(
        (dx - meta["beam_center_x"]) * meta["x_pixel_size"],
        (dy - meta["beam_center_y"]) * meta["y_pixel_size"],
    )
    two_theta = math.atan2(r, meta["detector_distance"])
    return float(meta["wavelength"] / (2 * math.sin(two_theta / 2)))


def _checksum(page: Any, selector: str) -> int:
    """Sum of the RGB values of the first image matching ``selector``, read back from
    a canvas (the tiles are same-origin, so the canvas is readable)."""
    return int(
        page.eval_on_selector(
            selector,
            """img => { const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                let s = 0; for (const v of g.getImageData(0, 0, c.width, c.height).data) s += v;
                return s; }""",
        )
    )


def test_viewer_in_chromium(stack: Stack, data_dir: Path, browser: Any, tmp_path: Path) -> None:
    pid = stack.add_session([0], user=dev_user())
    fn = str(data_dir / "x_master.h5")
    fragment = urllib.parse.urlencode({"pid": pid, "esaf": 0, "fn": fn})
    page = browser.new_page(viewport={"width": 1200, "height": 820})
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    outside: list[str] = []
    page.on(
        "request", lambda r: None if r.url.startswith(stack.gateway_url) else outside.append(r.url)
    )
    page.goto(f"{stack.gateway_url}/#{fragment}")

    # An image loads, the panels fill, and the pid left the address bar for a cookie.
    page.wait_for_selector('#tiles img[data-loaded="1"][data-frame="1"]', timeout=30_000)
    page.wait_for_selector("#stat-spots", timeout=30_000)
    assert "pid=" not in page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "is_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.text_content("#frame-last") == "4"
    assert int(page.text_content("#stat-spots") or "0") > 0
    # The ring panel: a row per ring with pixels, each its resolution shell in Å.
    shells = page.eval_on_selector_all(
        "#rings-table tbody tr td:first-child", "cells => cells.map(c => c.textContent)"
    )
    outer = [float(shell.split("–")[1]) for shell in shells]  # Å, falling outwards
    assert len(outer) >= 8 and outer == sorted(outer, reverse=True) and outer[-1] > 0
    shot = Path(os.environ.get("VIEWER_SCREENSHOT") or tmp_path / "viewer.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    # Resolution at the cursor, as the geometry predicts.
    headers = {"Authorization": f"Bearer {pid}"}
    meta = httpx.get(
        f"{stack.gateway_url}/api/v1/esaf/0/view.json",
        params={"fn": fn, "frame": 1, "xsize": S},
        headers=headers,
        timeout=30,
    ).json()["meta"]
    box = page.locator("#view").bounding_box()
    for x, y in ((420, 150), (40, 600), (330, 300)):
        shown, (cx, cy), _ = _hover(page, box, x, y)
        assert shown.endswith(" Å"), shown
        assert abs(float(shown.split()[0]) - _resolution(meta, cx, cy)) <= 0.01, (x, y, shown)
    # The full-depth value under the cursor once it rests: the frame's own pixel there
    # (as the worker prepares it: masked pixels 0), with the pixel it names.
    page.wait_for_selector("#value[data-at]", timeout=30_000)
    at = page.get_attribute("#value", "data-at") or ""
    px, py = (int(v) for v in at.split(","))
    reader = open_reader(fn)
    try:
        pixel = int(prepare_frame(reader.read_frame(1)).pixels[py, px])
    finally:
        reader.close()
    assert (page.text_content("#value") or "").split()[0] == str(pixel), (at, pixel)

    # Frame 2 by the arrow key: a new picture.
    before = _checksum(page, '#tiles img[data-frame="1"]')
    page.locator("#view").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_selector('#tiles img[data-loaded="1"][data-frame="2"]', timeout=30_000)
    assert page.text_content("#frame-num") == "2"
    frame2 = _checksum(page, '#tiles img[data-frame="2"]')
    assert frame2 != before

    # Zoom with the wheel: a zoom-2 tile arrives (zoom/segcol/segrow in its request).
    with page.expect_response(lambda r: "zoom=2" in r.url and r.status == 200) as tile:
        page.mouse.move(box["x"] + 320, box["y"] + 320)
        page.mouse.wheel(0, -120)
    assert "segcol=" in tile.value.url and tile.value.headers["content-type"] == "image/jpeg"
    page.wait_for_selector('#tiles img[data-loaded="1"][data-zoom="2"]', timeout=30_000)
    assert page.text_content("#zoom-num") == "2"
    # Zoomed in about the centre (pan 320 px): the resolution still matches the geometry,
    # through the tile under the cursor (tile 0 and tile 1 have their own window origin).
    for x, y in ((100, 500), (600, 50)):
        shown, (cx, cy), (pan_x, pan_y) = _hover(page, box, x, y)
        assert abs(pan_x - 320) <= 1 and abs(pan_y - 320) <= 1
        expected = _resolution(meta, cx, cy, zoom=2, pan=(pan_x, pan_y))
        assert abs(float(shown.split()[0]) - expected) <= 0.01, (x, y, shown, expected)

    # Contrast: move the white slider; tiles come back with that level.
    page.eval_on_selector(
        "#wval",
        "el => { el.value = String(Number(el.max) / 2); el.dispatchEvent(new Event('change')); }",
    )
    page.wait_for_selector('#tiles img[data-loaded="1"][data-url*="wval="]', timeout=30_000)
    contrasted = _checksum(page, '#tiles img[data-loaded="1"][data-url*="wval="]')
    assert contrasted != frame2
    assert page.get_attribute("#download", "href").startswith("/api/v1/esaf/0/view?")  # type: ignore[union-attr]
    assert not failed and not outside, (failed, outside)
    page.close()
