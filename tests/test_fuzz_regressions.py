"""Regression tests for the bugs the fuzz test (tests/test_fuzz.py) found, one per cause.

Each reproduces the failing input at the unit that was fixed. Inputs that once hung a
whole worker or allocated gigabytes run in a child process with a time and memory
bound, so that a regression fails here instead of freezing the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from itsdangerous import URLSafeTimedSerializer

from bridge.wire import MAX_JSON_DEPTH, parse_job
from istasks.cache import stat_version
from istasks.core.contrast import MAX_LEVEL, contrast_levels, to_8bit
from istasks.core.params import ContrastParams
from istasks.errors import DataUnavailable, EnvelopeError, RequestError
from istasks.jobs import number_field, view_params
from istasks.service import resolve_path
from queues.envelope import _SALT, open_envelope, queue_key
from tests.fuzz_files import build_tree

QUEUE = "65534:65534"
MASTER = b"m" * 32


def _isolated(code: str, *, timeout_s: float = 60.0, max_bytes: int = 2 << 30) -> str:
    """Run ``code`` in a fresh interpreter limited to ``max_bytes`` of address space;
    its stdout. A hang fails the test after ``timeout_s`` instead of freezing it."""
    prelude = (
        f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({max_bytes}, {max_bytes}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# -- bridge: what jansson refused must not reach a worker ------------------------------


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        # The echo could not be encoded; jansson's texts (bridge.jansson).
        (b'{"pid":"p","label":"\\ud800"}', "invalid Unicode '\\uD800'"),
        (b'{"pid":"p","label":"x\\udfff"}', "invalid Unicode '\\uDFFF'"),
        (b'{"pid":"p","zoom":9223372036854775808}', "too big integer"),
        (b'{"pid":"p","zoom":-9223372036854775809}', "too big negative integer"),
        (b'{"pid":"p","zoom":' + b"9" * 5000 + b"}", "too big integer"),  # not a 4300-digit error
        (b'{"pid":"p","zoom":1e400}', "real number overflow"),  # inf echoed as Infinity
        (b'{"pid":"p","x":' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),
        (b'{"pid":"p","x":' + b"[" * 500 + b"]" * 500 + b"}", "nested deeper than 32"),
    ],
)
def test_bridge_refuses_what_a_worker_cannot_echo(payload: bytes, text: str) -> None:
    with pytest.raises(RequestError, match="Failed to parse request") as caught:
        parse_job(payload)
    assert text in str(caught.value)


def test_bridge_accepts_the_edges_it_must() -> None:
    job = parse_job(
        b'{"pid":"p","label":"\\ud83d\\ude00","a":9223372036854775807,'
        b'"b":-9223372036854775808,"c":1e-400,"d":1.7976931348623157e308,"x":'
        + b"[" * (MAX_JSON_DEPTH - 1)
        + b"]" * (MAX_JSON_DEPTH - 1)
        + b"}"
    )
    assert job["label"] == "\U0001f600" and job["a"] == 2**63 - 1 and job["c"] == 0.0


# -- worker: job fields ----------------------------------------------------------------


@pytest.mark.parametrize("zoom", [1.7976931348623157e308, -1.7976931348623157e308, 1e307])
def test_huge_zoom_is_a_view_not_an_overflow(zoom: float) -> None:
    params = view_params({"zoom": zoom, "segcol": 0.5, "xsize": 64})
    assert params.zoom == (zoom if zoom > 1 else 1.0)


def test_number_field_of_an_int_beyond_float_range() -> None:
    assert number_field({"zoom": 10**400}, "zoom") == 0.0


@pytest.mark.parametrize("wval", [2**53 + 1, 2**63 - 1, 10**400])
def test_huge_contrast_levels_are_capped(wval: int) -> None:
    levels = contrast_levels(ContrastParams(wval=wval, contrast=wval), {"mean": 5, "stddev": 1})
    assert (levels.white, levels.black) == (MAX_LEVEL, MAX_LEVEL + 1)
    pixels = np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000
    view = to_8bit(pixels, 0xFFFFFFFF, levels)  # RuntimeWarning (NaN) would fail here
    assert (view == 255).all()


def test_nul_in_a_path_is_unavailable_data() -> None:
    with pytest.raises(DataUnavailable, match="NUL"):
        resolve_path("/etc/passwd\0.h5")


# -- worker: envelopes -----------------------------------------------------------------


class _BrokenJson:
    """A serializer that signs text no JSON parser reads."""

    @staticmethod
    def dumps(obj: object) -> str:
        return "[" * 10

    @staticmethod
    def loads(text: str) -> object:
        return json.loads(text)


def test_signed_but_unreadable_envelope_is_refused_not_a_crash() -> None:
    """A worker whose JSON parser fails on a genuine envelope (it happened with nesting
    near the recursion limit) refuses it with EnvelopeError instead of crashing the task."""
    key = queue_key(MASTER, QUEUE)
    token = URLSafeTimedSerializer(key, salt=_SALT, serializer=_BrokenJson).dumps({})
    with pytest.raises(EnvelopeError, match="payload unreadable"):
        open_envelope(key, QUEUE, str(token), 60.0)


# -- readers: FIFOs and size bombs ------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    build_tree(root)
    return root


def test_eiger_data_link_to_a_fifo_does_not_freeze_the_process(hostile: Path) -> None:
    """HDF5 opened the FIFO in blocking mode while holding the GIL: every thread of the
    worker stopped until a writer came. Now the data file is refused at once."""
    out = _isolated(
        f"""
        from istasks.core.readers import open_reader
        from istasks.core.readers.eiger_frames import open_hdf5
        from istasks.errors import DataUnavailable
        for call in (lambda: open_hdf5({str(hostile / "fifo.h5")!r}),
                     lambda: open_reader({str(hostile / "fifo_link_master.h5")!r}).read_frame(1)):
            try:
                call()
            except DataUnavailable as exc:
                print(exc)
        """,
        timeout_s=30,
    )
    assert out.count("not a regular file") == 2, out


@pytest.mark.parametrize("name", ["bomb.tif", "bomb_raw.tif", "bomb.mccd", "bomb_sparse.cbf"])
def test_size_bombs_are_refused_before_allocating(hostile: Path, name: str) -> None:
    out = _isolated(f"""
        from istasks.core.readers import open_reader
        from istasks.errors import DataUnavailable
        try:
            open_reader({str(hostile / name)!r}).read_frame(1)
        except DataUnavailable as exc:
            print(exc)
        """)
    assert "exceeds the limit" in out, out


def test_hdf5_size_bomb_is_refused_before_allocating(hostile: Path) -> None:
    """A never-written 30000^2 uint32 stack: h5py would allocate and fill 3.6 GB."""
    out = _isolated(f"""
        from istasks.core.readers import open_reader
        from istasks.errors import DataUnavailable
        try:
            open_reader({str(hostile / "bomb_master.h5")!r}).read_frame(1)
        except DataUnavailable as exc:
            print(exc)
        """)
    assert "exceed the limit" in out, out


def test_index_of_a_fifo_is_refused_at_once(hostile: Path) -> None:
    """The indexer's format probe opened fn1 in blocking mode: a FIFO held an index slot
    for good (and the indexer itself would have waited for the whole timeout)."""
    out = _isolated(
        f"""
        from istasks.errors import IndexerError
        from istasks.indexer import IndexRequest, run_index
        for path in ({str(hostile / "fifo.h5")!r}, "/dev/zero", {str(hostile)!r}):
            try:
                run_index(IndexRequest(fn1=path), command="/bin/true", timeout_s=5)
            except IndexerError as exc:
                print(exc)
        """,
        timeout_s=30,
    )
    assert out.count("is not a regular file") == 3, out
    assert os.path.exists(hostile / "fifo.h5")


def test_file_version_opens_without_blocking_on_a_fifo(hostile: Path) -> None:
    """The cache now opens the file to take its version (read permission proven before a
    cached view is shown, see test_security_matrix); a FIFO must not block that open."""
    out = _isolated(
        f"""
        from istasks.cache import stat_version
        print(stat_version({str(hostile / "fifo.h5")!r}).size)
        """,
        timeout_s=30,
    )
    assert out.strip() == "0"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_version_needs_read_permission(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(DataUnavailable, match="Permission denied"):
        stat_version(str(path))
