"""Jobs to reply frames (spec 2.2, 2.3) on generated Eiger files, with the Redis cache."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from istasks import jobs
from istasks.cache import report_outcome
from istasks.errors import IsError
from istasks.service import Service, build_service
from istasks.settings import Settings
from ops.testdata.eiger import write_eiger
from queues.naming import Identity

GID = 5001
IDENT = Identity(4001, GID)


@pytest.fixture
def master(tmp_path: Path) -> Path:
    return write_eiger(tmp_path / "data", "x_1", nimages=4, frames_per_file=2, shape=(512, 514))


@pytest.fixture
def service(redis_url: str) -> Iterator[Service]:
    svc = build_service(Settings(redis_url=redis_url), IDENT)
    yield svc
    svc.close()


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "JPEG"
        return image.size


def test_jpeg_frames(service: Service, master: Path) -> None:
    job = {"type": "jpeg", "pid": "p", "esaf": 51234, "fn": str(master), "frame": 3,
           "xsize": 256, "label": "x_1", "labelHeight": 16, "tag": "img-3",
           "contrast": -1}  # fmt: skip
    echo, meta, jpeg = service.jpeg(job)
    reply = json.loads(echo)
    assert reply == {**job, "wval_used": reply["wval_used"], "bval_used": reply["bval_used"]}
    assert isinstance(reply["wval_used"], int)
    assert reply["bval_used"] > reply["wval_used"]
    assert echo == json.dumps(reply, separators=(",", ":"), sort_keys=True).encode()
    info = json.loads(meta)
    assert info["fn"] == str(master)
    assert info["frame"] == 3
    assert (info["first_frame"], info["last_frame"]) == (1, 4)
    for key in ("n", "mean", "rms", "stddev", "min", "max", "spots", "nSaturated"):
        assert key in info
    assert list(json.loads(meta)) == sorted(info)
    assert jpeg[:2] == b"\xff\xd8"
    assert jpeg_size(jpeg) == (256, 256 + 16)


def test_jpeg_second_request_is_a_cache_hit(service: Service, master: Path) -> None:
    job = {"type": "jpeg", "fn": str(master), "frame": 2, "xsize": 128}
    first = service.jpeg(job)
    second = service.jpeg({**job, "wval": 5, "contrast": 40})  # same geometry, new contrast
    assert service.cache.stats() == {"computed": 1, "hits": 0, "lru_hits": 1}
    assert json.loads(second[0])["wval_used"] == 5
    assert json.loads(second[0])["bval_used"] == 40
    assert second[1] == first[1]


def test_warm_view_meta_names_the_path_each_request_sent(
    service: Service, master: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JPEG LRU keeps a view's meta frame ready made for the path it was rendered
    for; the same view asked for by another name of that path (relative to the ESAF
    home) still reads the ``fn`` it sent."""
    monkeypatch.chdir(master.parent)
    job = {"type": "jpeg", "fn": str(master), "frame": 1, "xsize": 128}
    first = service.jpeg(job)
    relative = service.jpeg({**job, "fn": master.name})
    again = service.jpeg(job)
    assert service.cache.stats()["computed"] == 1  # one reduction
    assert len(service.jpegs) == 1  # and one rendering, answered from the JPEG LRU
    assert json.loads(first[1])["fn"] == str(master)
    assert json.loads(relative[1])["fn"] == master.name
    assert json.loads(relative[1]) == {**json.loads(first[1]), "fn": master.name}
    assert again[1] == first[1]
    assert relative[2] == first[2]


def test_jpeg_blank_for_missing_file_says_why(service: Service, tmp_path: Path) -> None:
    job = {"type": "jpeg", "fn": str(tmp_path / "gone_master.h5"), "xsize": 100,
           "label": "gone", "labelHeight": 16}  # fmt: skip
    echo, meta, jpeg = service.jpeg(job)
    reply = json.loads(echo)
    assert "wval_used" not in reply
    assert "No such file" in reply.pop("error")
    assert reply == job
    assert meta == b""
    assert jpeg_size(jpeg) == (100, 116)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.convert("RGB").getpixel((50, 80)) == pytest.approx((240, 240, 240), abs=2)


def test_jpeg_blank_without_fn_is_the_original_reply(service: Service) -> None:
    echo, meta, jpeg = service.jpeg({"type": "jpeg", "xsize": 3})
    assert echo == b'{"type":"jpeg","xsize":3}'
    assert meta == b""
    assert jpeg_size(jpeg) == (8, 8)


def test_jpeg_blank_for_frame_out_of_range_and_oversize(redis_url: str, master: Path) -> None:
    service = build_service(Settings(redis_url=redis_url, max_xsize=500), IDENT)
    try:
        echo, meta, _ = service.jpeg({"fn": str(master), "frame": 99, "xsize": 64})
        assert meta == b""
        assert json.loads(echo)["error"]
        echo, meta, jpeg = service.jpeg({"fn": str(master), "xsize": 20000})
    finally:
        service.close()
    assert meta == b""
    assert json.loads(echo)["error"]
    assert jpeg_size(jpeg) == (500, 500)  # bug 23 fixed: the blank is clamped


def test_relative_fn_resolves_against_cwd(
    service: Service, master: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(master.parent.parent)
    relative = f"{master.parent.name}/{master.name}"
    echo, meta, _ = service.jpeg({"fn": relative, "xsize": 64})
    assert "error" not in json.loads(echo)
    assert json.loads(meta)["fn"] == relative


def test_spots_edits_job_and_returns_meta(service: Service, master: Path) -> None:
    job = {"type": "spots", "fn": str(master), "frame": 1, "zoom": 4, "segcol": 2}
    frames = service.spots(job)
    assert len(frames) == 2
    echo = json.loads(frames[0])
    assert echo == {**job, "xsize": 384, "zoom": 1.0, "segcol": 0.0, "segrow": 0.0}
    assert b'"zoom":1.0' in frames[0]
    meta = json.loads(frames[1])
    assert isinstance(meta["spots"], int)
    assert meta["spots"] > 0
    # A 384-wide full-frame jpeg shares the reduction (same cache key).
    service.jpeg({"type": "jpeg", "fn": str(master), "frame": 1, "xsize": 384})
    assert service.cache.stats()["computed"] == 1


def test_spots_errors_keep_the_original_text(service: Service, tmp_path: Path) -> None:
    with pytest.raises(IsError) as missing:
        service.spots({"type": "spots", "tag": "a"})
    assert missing.value.wire_text() == (
        'isSpots.c isSpots: Missing filename for job {"tag":"a","type":"spots"}'
    )
    gone = str(tmp_path / "gone.h5")
    with pytest.raises(IsError) as no_data:
        service.spots({"type": "spots", "fn": gone})
    assert no_data.value.wire_text() == (
        f'isSpots.c isSpots: Missing data for job {{"fn":"{gone}","segcol":0.0,'
        '"segrow":0.0,"type":"spots","xsize":384,"zoom":1.0}'
    )


def test_rewritten_file_is_not_served_stale(service: Service, tmp_path: Path) -> None:
    data = tmp_path / "data"
    master = write_eiger(data, "y", nimages=1, shape=(128, 128), seed=1)
    first = json.loads(service.spots({"fn": str(master), "xsize": 64})[1])
    # The detector writes a new version (replacing the files, as a file writer does).
    fresh = write_eiger(tmp_path / "fresh", "y", nimages=1, shape=(256, 256), seed=2)
    for path in fresh.parent.iterdir():
        path.replace(data / path.name)
    second = json.loads(service.spots({"fn": str(master), "xsize": 64})[1])
    assert second["x_pixels_in_detector"] == 256 != first["x_pixels_in_detector"]
    assert service.cache.stats()["computed"] == 2


def _jpeg_outcome(service: Service, job: dict[str, object]) -> tuple[str, list[bytes]]:
    with report_outcome() as report:
        frames = service.jpeg(job)
    return report.outcome, frames


def test_repeated_identical_view_is_served_from_the_jpeg_lru(
    service: Service, master: Path
) -> None:
    job = {"type": "jpeg", "fn": str(master), "frame": 2, "xsize": 128, "contrast": 40,
           "label": "x", "labelHeight": 16}  # fmt: skip
    first = _jpeg_outcome(service, job)
    again = _jpeg_outcome(service, {**job, "tag": "reload"})
    assert (first[0], again[0]) == ("computed", "jpeg")
    assert again[1][1:] == first[1][1:]  # same meta and JPEG bytes
    assert json.loads(again[1][0])["tag"] == "reload"  # the echo is this request's job
    # The reduced cache was not asked again: no contrast, encode or Redis work.
    assert service.cache.stats() == {"computed": 1, "hits": 0, "lru_hits": 0}
    assert len(service.jpegs) == 1
    # Anything the bytes depend on is in the key: label, contrast.
    for other in ({**job, "label": "y"}, {**job, "labelHeight": 20}, {**job, "wval": 7}):
        outcome, frames = _jpeg_outcome(service, other)
        assert outcome == "lru" and frames[2] != first[1][2]
    relative_fn = _jpeg_outcome(service, {**job, "fn": f"{master.parent}/../data/{master.name}"})
    assert json.loads(relative_fn[1][1])["fn"] == f"{master.parent}/../data/{master.name}"


def test_jpeg_lru_never_serves_a_rewritten_or_unreadable_file(
    service: Service, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    master = write_eiger(data, "y", nimages=1, shape=(128, 128), seed=1)
    job = {"type": "jpeg", "fn": str(master), "xsize": 64}
    first = service.jpeg(job)
    assert _jpeg_outcome(service, job)[0] == "jpeg"
    fresh = write_eiger(tmp_path / "fresh", "y", nimages=1, shape=(256, 256), seed=2)
    for path in fresh.parent.iterdir():
        path.replace(data / path.name)
    outcome, second = _jpeg_outcome(service, job)
    assert outcome == "computed"
    assert json.loads(second[1])["x_pixels_in_detector"] == 256
    master.unlink()  # stat'ed on every request: the cached reply is not shown
    outcome, gone = _jpeg_outcome(service, job)
    assert outcome == "none" and "error" in json.loads(gone[0]) and gone[1] == b""
    assert first[2] != second[2]


def test_jpeg_lru_budget_zero_turns_it_off(redis_url: str, master: Path) -> None:
    svc = build_service(Settings(redis_url=redis_url, jpeg_lru_max_bytes=0), IDENT)
    try:
        job = {"type": "jpeg", "fn": str(master), "xsize": 64}
        outcomes = [_jpeg_outcome(svc, job)[0] for _ in range(2)]
        assert outcomes == ["computed", "lru"] and len(svc.jpegs) == 0
    finally:
        svc.close()


def test_fold_setting_has_its_own_cache_entries(redis_url: str, master: Path) -> None:
    # IS_FOLD_EDGES changes the picture, never the numbers; workers of either setting may
    # share one Redis, so the folded reduction is cached under its own key.
    job = {"type": "jpeg", "fn": str(master), "frame": 1, "xsize": 9}
    plain = build_service(Settings(redis_url=redis_url), IDENT)
    folded = build_service(Settings(redis_url=redis_url, fold_edges=True), IDENT)
    try:
        plain_meta = plain.jpeg(job)[1]
        assert folded.jpeg(job)[1] == plain_meta
        assert folded.cache.stats()["computed"] == 2  # per ESAF: one reduction per setting
        params = folded.reduced(str(master), jobs.view_params(job)).pixels
        unfolded = plain.reduced(str(master), jobs.view_params(job)).pixels
        assert (params >= unfolded).all()
    finally:
        plain.close()
        folded.close()


# -- what a blank reply tells the browser (issue 17) -------------------------------------


def _blank_error(service: Service, fn: str, frame: int = 1) -> str:
    echo, meta, _ = service.jpeg({"type": "jpeg", "fn": fn, "frame": frame, "xsize": 64})
    assert meta == b""  # the blank fallback: job echo, empty meta, grey JPEG
    reason: str = json.loads(echo)["error"]
    return reason


def test_blank_reply_names_the_path_as_sent_not_the_worker_home(
    service: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    home = tmp_path / "home" / "e50001"
    home.mkdir(parents=True)
    monkeypatch.chdir(home)
    sent = os.path.relpath("/etc/passwd", home)  # ../../../.. up to / and down again
    caplog.set_level(logging.INFO, logger="istasks.service")
    assert _blank_error(service, sent) == f"no supported detector format in {sent!r}"
    assert f"{home}/{sent}" in caplog.text  # the worker's log keeps the resolved path
    assert "No such file" in _blank_error(service, "nope_master.h5")
    assert str(home) not in _blank_error(service, "nope_master.h5")
    assert _blank_error(service, ".") == "[Errno 21] Is a directory: '.'"


def test_blank_reply_of_a_relative_dataset_hides_where_its_data_files_are(
    service: Service, master: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Eiger reader resolves the master's directory: a symlinked home shows too."""
    (master.parent / "x_1_data_000002.h5").unlink()
    link = tmp_path / "esaf-home"
    link.symlink_to(master.parent.parent)
    monkeypatch.chdir(link)
    sent = f"{master.parent.name}/{master.name}"
    reason = _blank_error(service, sent, frame=3)
    assert "frame 3 not available" in reason
    assert str(tmp_path) not in reason
    # An absolute name is the user's own text: shown as sent.
    assert str(master) in _blank_error(service, str(master), frame=3)


def test_index_error_names_the_path_as_sent(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsError) as refused:
        service.index({"type": "index", "fn1": "adir", "frame1": 1})
    assert refused.value.wire_text() == "isIndex.c isIndex: adir is not a regular file"
