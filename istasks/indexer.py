"""Run the external indexer (RAPD's ``rapd.index``) for an ``index`` request (spec 6.2).

Fixes the original's bug 9: the run has a deadline and kills its whole process group,
never leaves a zombie, always removes its private temp dir, JSON-escapes progress text,
and sends the final ``done`` message only when the request named a channel. Progress
is handed to a ``publish`` callable: the worker's goes to its own identity channel and
the bridge relays it to the named channel on the *service's* session Redis
(istasks.service, bridge.dispatch), never to a host taken from the request
(``progressAddress``/``progressPort`` are ignored): a client must not be able to make
the service open connections to hosts of its choice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from istasks.errors import IndexerError

log = logging.getLogger(__name__)

#: Detector option for HDF5 files written by a DCU with this software version (Eiger2 16M).
EIGER2_SOFTWARE_VERSION = "1.8.0"
EIGER2_DETECTOR = "lscat_dectris_eiger2_16m"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SOFTWARE_VERSION_PATH = "/entry/instrument/detector/detectorSpecific/software_version"
#: A partial progress line is published after this much silence (the original polled at 100 ms).
PROGRESS_FLUSH_S = 0.1
MAX_PROGRESS_CHARS = 255
MAX_STDERR_BYTES = 1024 * 1024
#: Between SIGTERM and SIGKILL of the process group on timeout.
KILL_GRACE_S = 2.0

#: ``publish(channel, message_json)``; errors are the publisher's to swallow.
Publish = Callable[[str, str], None]


@dataclass(frozen=True)
class IndexRequest:
    """The normalised fields of an ``index`` job (paths already absolute)."""

    fn1: str
    fn2: str | None = None
    frame1: int = 0
    frame2: int = 0
    tag: str = "Tag_Not_Found"
    channel: str | None = None


@dataclass
class _Streams:
    """What the indexer wrote, gathered while it runs."""

    json_out: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    progress: bytearray = field(default_factory=bytearray)
    last_progress: float = 0.0


def detector_option(path: str) -> list[str]:
    """``--detector lscat_dectris_eiger2_16m`` for a DCU 1.8 HDF5 file, else nothing."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _HDF5_SIGNATURE:
                return []
        import h5py

        with h5py.File(path, "r") as h5:
            raw = h5[_SOFTWARE_VERSION_PATH][()]
    except (OSError, KeyError, TypeError) as exc:
        log.info("no software_version in %s (%s): no --detector option", path, exc)
        return []
    version = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return ["--detector", EIGER2_DETECTOR] if version == EIGER2_SOFTWARE_VERSION else []


def _refuse_special_file(path: str) -> None:
    """IndexerError when ``path`` exists but is not a regular file: opening a FIFO
    blocks (here, then in the indexer for the whole timeout) and a device never ends.
    A missing file is left to the indexer, as the original did."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise IndexerError(f"{path} is not a regular file")


def image_arguments(request: IndexRequest, names: list[str]) -> list[str]:
    """The trailing arguments of spec 6.2 step 2, from the symlink names."""
    if len(names) > 1:
        return names
    if request.frame1 != 0:
        return ["--hdf5_image_range", f"{request.frame1},{request.frame2}", names[0]]
    return names


def run_index(
    request: IndexRequest,
    *,
    command: str,
    timeout_s: float,
    tmp_dir: str | None = None,
    publish: Publish | None = None,
) -> Any:
    """Run the indexer; its JSON result (plus ``stderr``), or None without usable output.

    Raises IndexerError when the command cannot be started or runs past ``timeout_s``.
    """
    argv = shlex.split(command)
    if not argv:
        raise IndexerError("no indexer command configured (IS_INDEXER_COMMAND)")
    for path in filter(None, (request.fn1, request.fn2)):
        _refuse_special_file(path)
    detector = detector_option(request.fn1)
    workdir = tempfile.mkdtemp(prefix="isIndex-", dir=tmp_dir)
    started = time.monotonic()
    try:
        names = _link_images(workdir, request)
        args = detector + image_arguments(request, names)
        streams = _run(argv, args, workdir, timeout_s=timeout_s, request=request, publish=publish)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if request.channel and publish is not None:
            publish(request.channel, json.dumps({"done": True, "tag": request.tag}))
    log.info("index %s: %.1f s", request.fn1, time.monotonic() - started)
    return _result(streams)


def _link_images(workdir: str, request: IndexRequest) -> list[str]:
    """Symlink the images into the temp dir under their base names (as the original)."""
    names = []
    for path in filter(None, (request.fn1, request.fn2)):
        name = os.path.basename(path)
        target = os.path.join(workdir, name)
        try:
            os.symlink(path, target)
        except OSError as exc:
            raise IndexerError(f"cannot link {path} for indexing: {exc.strerror}") from exc
        # An argument starting with "-" would be read as an option.
        names.append(name if not name.startswith("-") else "./" + name)
    return names


def _run(
    argv: list[str],
    args: list[str],
    workdir: str,
    *,
    timeout_s: float,
    request: IndexRequest,
    publish: Publish | None,
) -> _Streams:
    json_r, json_w = os.pipe()
    prog_r, prog_w = os.pipe()
    full = [*argv, "--json", "--json-fd", str(json_w), "--progress-fd", str(prog_w), *args]
    try:
        proc = subprocess.Popen(
            full,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(json_w, prog_w),
            start_new_session=True,  # own process group: a timeout kills all of it
            env=_child_env(),
        )
    except OSError as exc:
        os.close(json_r)
        os.close(prog_r)
        raise IndexerError(f"cannot run indexer {argv[0]}: {exc.strerror or exc}") from exc
    finally:
        os.close(json_w)  # keep only the child's write ends, so EOF means it is done
        os.close(prog_w)
    assert proc.stderr is not None
    streams = _Streams()
    emit = _progress_emitter(request, publish)
    finished = False
    try:
        fds = (proc.stderr.fileno(), json_r, prog_r)
        finished = _collect(proc, fds, streams, emit, timeout_s)
    finally:
        os.close(json_r)
        os.close(prog_r)
        proc.stderr.close()
        _end_group(proc, gently=not finished)
    if not finished:
        raise IndexerError(f"indexer timed out after {timeout_s:.0f} s")
    if proc.returncode:
        log.info("indexer exited with status %s", proc.returncode)
    return streams


def _collect(
    proc: subprocess.Popen[bytes],
    fds: tuple[int, int, int],
    streams: _Streams,
    emit: Callable[[bytes], None],
    timeout_s: float,
) -> bool:
    """Read the three pipes until they close, then wait for the child; False on timeout.

    The child is never reaped here, only observed, so its pid keeps naming its group.
    """
    deadline = time.monotonic() + timeout_s
    err_fd, json_fd, prog_fd = fds
    sinks = {err_fd: streams.stderr, json_fd: streams.json_out, prog_fd: streams.progress}
    with selectors.DefaultSelector() as sel:
        for fd in sinks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            ready = sel.select(timeout=min(PROGRESS_FLUSH_S, remaining_s))
            for key, _ in ready:
                _read_into(sel, key.fd, sinks[key.fd], streams, prog_fd)
            _flush_progress(streams, emit, force=False)
            if not ready and _has_exited(proc):
                break  # pipes held open by a leftover grandchild: the child is done
    _flush_progress(streams, emit, force=True)
    while not _has_exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _read_into(
    sel: selectors.BaseSelector, fd: int, sink: bytearray, streams: _Streams, prog_fd: int
) -> None:
    chunk = os.read(fd, 65536)
    if not chunk:
        sel.unregister(fd)
        return
    if sink is streams.stderr and len(sink) >= MAX_STDERR_BYTES:
        return  # keep the first MiB; a runaway log must not fill memory
    sink.extend(chunk)
    if fd == prog_fd:
        streams.last_progress = time.monotonic()


def _progress_emitter(request: IndexRequest, publish: Publish | None) -> Callable[[bytes], None]:
    """Turn one progress line into the JSON message of spec 6.2 (properly escaped)."""
    channel = request.channel

    def emit(raw: bytes) -> None:
        text = "".join(ch for ch in raw.decode("ascii", "ignore") if " " <= ch <= "~")
        text = text.strip()[:MAX_PROGRESS_CHARS]
        if text and channel and publish is not None:
            publish(channel, json.dumps({"progress": text, "done": False, "tag": request.tag}))

    return emit


def _flush_progress(streams: _Streams, emit: Callable[[bytes], None], *, force: bool) -> None:
    """Publish complete lines; a partial line too once the writer has been quiet."""
    buf = streams.progress
    while b"\n" in buf:
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        emit(line)
    quiet = time.monotonic() - streams.last_progress >= PROGRESS_FLUSH_S
    if buf and (force or quiet):
        emit(bytes(buf))
        buf.clear()


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """True when the child has exited, without reaping it (its pid keeps the group id)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _end_group(proc: subprocess.Popen[bytes], *, gently: bool) -> None:
    """Kill whatever is left of the indexer's process group, then reap the child.

    ``gently`` (timeout, error) sends SIGTERM first and allows KILL_GRACE_S to exit.
    After a normal exit this only removes leftover grandchildren.
    """
    if gently and not _has_exited(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        while not _has_exited(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _child_env() -> dict[str, str]:
    """Our environment minus ``IS_*``: queue keys and secrets stay out of the indexer."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IS_")}


def _result(streams: _Streams) -> Any:
    """The json-fd document (None if empty or invalid) with ``stderr`` added if any."""
    result: Any = None
    text = bytes(streams.json_out).strip()
    if text:
        try:
            result = json.loads(text)
        except ValueError as exc:
            log.warning("indexer JSON output unparsable: %s", exc)
    stderr = bytes(streams.stderr).decode("utf-8", "replace")
    if stderr:
        if not isinstance(result, dict):
            result = {} if result is None else {"result": result}
        result["stderr"] = stderr
    return result
