"""The service (with its real Redis cache) on the issue 18 formats.

A fabio-read SMV image and a nexgen NXmx master are served like any Eiger file; an NXmx
master whose data files are missing keeps the grey blank reply of spec 2.2, its job
echo's ``error`` naming the missing file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from istasks.service import Service, build_service
from istasks.settings import Settings
from ops.testdata.fabio_files import GEOMETRY, pattern, write_smv
from ops.testdata.nxmx import write_nxmx
from queues.naming import Identity

IDENT = Identity(4001, 5001)
SHAPE = (256, 240)


@pytest.fixture
def service(redis_url: str) -> Iterator[Service]:
    svc = build_service(Settings(redis_url=redis_url), IDENT)
    yield svc
    svc.close()


def _size(jpeg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size


def test_smv_view_and_spots(service: Service, tmp_path: Path) -> None:
    image = write_smv(tmp_path / "lyso_1_001.img", pattern(SHAPE, top=50000))
    echo, meta, jpeg = service.jpeg({"type": "jpeg", "fn": str(image), "xsize": 128})
    assert "error" not in json.loads(echo)
    info = json.loads(meta)
    assert info["wavelength"] == pytest.approx(GEOMETRY["wavelength"])
    assert info["detector_distance"] == pytest.approx(GEOMETRY["detector_distance"])
    assert info["max"] > 0
    assert _size(jpeg) == (128, 128)
    spots = service.spots({"type": "spots", "fn": str(image), "xsize": 128})
    assert "spots" in json.loads(spots[-1])


def test_nxmx_view_through_the_vds(service: Service, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path, frames=3, shape=SHAPE)
    _, meta, jpeg = service.jpeg({"type": "jpeg", "fn": str(master), "frame": 3, "xsize": 64})
    info = json.loads(meta)
    assert (info["frame"], info["last_frame"]) == (3, 3)
    assert info["max"] > 0
    assert _size(jpeg) == (64, 64)


def test_nxmx_missing_data_is_the_blank_reply_with_its_reason(
    service: Service, tmp_path: Path
) -> None:
    master = write_nxmx(tmp_path, frames=3, shape=SHAPE, data=False)
    job = {"type": "jpeg", "fn": str(master), "frame": 2, "xsize": 100}
    echo, meta, jpeg = service.jpeg(job)
    reply = json.loads(echo)
    assert "xtal_1_000001.h5): data file missing" in reply.pop("error")
    assert reply == job
    assert meta == b""
    assert _size(jpeg) == (100, 100)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.convert("RGB").getpixel((50, 50)) == pytest.approx((240, 240, 240), abs=2)
