"""Turn an is.js job into its reply frames (spec 2.2-2.4) with the image core and cache.

No Celery here: :mod:`istasks.tasks` is the thin adapter. Frames are returned *without*
the leading empty "no error" frame; failures are raised as :class:`IsError` and mapped
to the one error frame by ``istasks.replies``. Relative paths resolve against the
worker's cwd (the ESAF home), as in the original.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from istasks.cache import (
    ByteLRU,
    FileVersion,
    ReaderCache,
    ReducedCache,
    SingleFlight,
    note_outcome,
    note_validator,
    stat_version,
)
from istasks.core import bands
from istasks.core.params import MIN_XSIZE, ContrastParams, LabelParams, ViewParams
from istasks.core.readers import open_reader
from istasks.core.readers.base import Frame, FrameReader
from istasks.core.view import (
    Reduced,
    Rendered,
    prepare_frame,
    reduce_frame,
    render_blank,
    render_jpeg,
)
from istasks.errors import DataUnavailable, IndexerError, InvalidView, RequestError
from istasks.indexer import IndexRequest, run_index
from istasks.jobs import (
    Job,
    contrast_params,
    dumps,
    int_field,
    label_params,
    spots_job,
    str_field,
    view_params,
)
from istasks.keys import progress_channel
from istasks.redisconn import connect
from istasks.settings import Settings
from queues.naming import Identity

log = logging.getLogger(__name__)

Frames = list[bytes]

#: Opened readers kept per worker process (an Eiger dataset = master + data files).
READER_CACHE_SIZE = 8
#: Bytes charged per JPEG LRU entry beyond the JPEG (key, meta dict, tuples).
JPEG_ENTRY_OVERHEAD_BYTES = 4096
#: Bytes charged per frame LRU entry beyond its pixels (meta dict, key).
FRAME_ENTRY_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class RenderedView:
    """A rendered jpeg reply before its job echo: the JPEG with the contrast levels used,
    the reduced image's meta (shared with the reduced cache: never mutated) and that meta
    as the reply's JSON frame for the path ``fn`` it was rendered for.

    The JSON is kept because a warm view is answered from the JPEG LRU, where encoding a
    16M frame's 2.5 kB meta again (sorted keys, float reprs) was 90 us of a ~0.5 ms task.
    """

    rendered: Rendered
    meta: dict[str, Any]
    fn: str
    meta_json: bytes

    def meta_frame(self, fn: str) -> bytes:
        """The meta frame for a request naming the file ``fn`` (another path to the same
        file, a link, gets its own ``fn``)."""
        return self.meta_json if fn == self.fn else _meta_frame(self.meta, fn)


class SpotsRequestError(RequestError):
    """``spots`` without ``fn``. Reply: one error frame (spec 2.3)."""

    origin = "isSpots.c isSpots"


class SpotsDataError(DataUnavailable):
    """``spots`` whose frame cannot be reduced. Reply: one error frame (spec 2.3)."""

    origin = "isSpots.c isSpots"


class PixelRequestError(RequestError):
    """``pixel`` (the gateway's) without ``fn``. Reply: one error frame."""

    origin = "is pixel"


class PixelDataError(DataUnavailable):
    """``pixel`` whose frame cannot be read; the message says why (file, frame, access)."""

    origin = "is pixel"


class IndexRequestError(RequestError):
    """``index`` without ``fn1``. Reply: one error frame."""

    origin = "isIndex.c isIndex"


@dataclass
class Service:
    """The request handlers of one worker process (one ESAF gid)."""

    settings: Settings
    cache: ReducedCache[Reduced]
    readers: ReaderCache[FrameReader]
    progress: ProgressOutlet | None = None
    index_slots: threading.BoundedSemaphore | None = None
    #: Rendered replies of repeated identical views; sized by ``jpeg_lru_max_bytes``.
    jpegs: ByteLRU[RenderedView] = field(init=False)
    #: Decoded, prepared frames (core.view.prepare_frame) by file version and frame
    #: number; sized by ``frame_lru_max_bytes``. Tiles of one frame share one decode.
    frames: ByteLRU[Frame] = field(init=False)
    _decoding: SingleFlight[Frame] = field(init=False)

    def __post_init__(self) -> None:
        self.jpegs = ByteLRU(self.settings.jpeg_lru_max_bytes)
        self.frames = ByteLRU(self.settings.frame_lru_max_bytes)
        self._decoding = SingleFlight()

    # -- requests ---------------------------------------------------------------------

    def jpeg(self, job: Job) -> Frames:
        """``""`` is added by the caller; here: job echo, meta, JPEG (spec 2.2).

        When the image cannot be produced the reply is the original's blank fallback
        (job unchanged, empty meta, grey JPEG), but the reason is not swallowed: it is
        logged and added to the echoed job as ``error`` (is.js ignores unknown fields).
        """
        fn = str_field(job, "fn")
        params = view_params(job)
        label = label_params(job)
        if not fn:
            return self._blank(job, params, reason=None)
        try:
            view = self.rendered(fn, params, contrast_params(job), label)
        except (DataUnavailable, OSError) as exc:  # EncodeError is not: it stays an error
            # The log has the worker's whole story; the browser gets the path it sent.
            log.info("jpeg %s frame %d: blank image (%s)", fn, params.frame, exc)
            return self._blank(job, params, reason=public_reason(exc, fn))
        rendered = view.rendered
        echo = dict(job, wval_used=rendered.wval_used, bval_used=rendered.bval_used)
        return [_json(echo), view.meta_frame(fn), rendered.jpeg.data]

    def spots(self, job: Job) -> Frames:
        """Job (with the spots edits) and the meta holding ``spots`` (spec 2.3)."""
        fn = str_field(job, "fn")
        if not fn:
            raise SpotsRequestError(f"Missing filename for job {dumps(job)}")
        edited = spots_job(job)
        try:
            reduced = self.reduced(fn, view_params(edited))
        except (DataUnavailable, OSError) as exc:
            log.info("spots %s: no data (%s)", fn, exc)
            raise SpotsDataError(f"Missing data for job {dumps(edited)}") from exc
        meta = _reply_meta(reduced.meta, fn)
        if job.get("rings") is True and reduced.rings is not None:
            # Asked for by the gateway (its meta endpoint); is.js never sends it, so its
            # replies stay the original's.
            meta["rings"] = reduced.rings
        return [_json(edited), _json(meta)]

    def pixel(self, job: Job) -> Frames:
        """Job (unchanged) and one pixel of a frame at full depth: ``x, y, frame, value,
        saturated`` (``value`` None outside the image).

        The gateway's, for the value under the viewer's cursor. It is read from the frame
        LRU, so hovering over the frame on screen decodes nothing. It is the prepared frame,
        so a masked pixel reads 0, as the picture shows it.
        """
        fn = str_field(job, "fn")
        if not fn:
            raise PixelRequestError(f"Missing filename for job {dumps(job)}")
        x, y, number = int_field(job, "x"), int_field(job, "y"), int_field(job, "frame") or 1
        try:
            frame = self.decoded(stat_version(resolve_path(fn)), number)
        except (DataUnavailable, OSError) as exc:
            log.info("pixel %s frame %d: %s", fn, number, exc)
            raise PixelDataError(public_reason(exc, fn)) from exc
        height, width = frame.pixels.shape
        value = int(frame.pixels[y, x]) if 0 <= x < width and 0 <= y < height else None
        found = {"x": x, "y": y, "frame": number, "value": value,
                 "saturated": value is not None and value == frame.saturation}  # fmt: skip
        return [_json(job), _json(found)]

    def index(self, job: Job) -> Frames:
        """Job (unchanged) and the indexer's result JSON or ``""`` (spec 2.4, 6.2)."""
        request = _index_request(job)
        slots = self.index_slots
        if slots is not None and not slots.acquire(blocking=False):
            raise IndexerError("too many index jobs running for this user; try again later")
        try:
            result = run_index(
                request,
                command=self.settings.indexer_command,
                timeout_s=self.settings.index_timeout_s,
                tmp_dir=self.settings.index_tmp_dir,
                publish=_ProgressPublisher(self.progress) if self.progress else None,
            )
        except IndexerError as exc:
            log.info("index %s: %s", request.fn1, exc)
            names = (str_field(job, "fn1") or "", str_field(job, "fn2") or "")
            raise IndexerError(public_reason(exc, *names)) from exc
        finally:
            if slots is not None:
                slots.release()
        return [_json(job), b"" if result is None else _json(result)]

    # -- shared steps -----------------------------------------------------------------

    def rendered(
        self, fn: str, params: ViewParams, contrast: ContrastParams, label: LabelParams
    ) -> RenderedView:
        """The rendered view, from the JPEG LRU or rendered from the reduced image.

        The file is stat'ed on every request as the worker's identity (permissions keep
        applying) and its version is part of the key, so a rewritten file is never served
        stale. The levels used are a function of ``contrast`` and the reduced image's
        stats, so the requested contrast identifies them.
        """
        path = resolve_path(fn)
        version = stat_version(path)
        key = _jpeg_key(
            self.cache.key(version, params.cache_token()),
            contrast,
            label,
            self.settings.jpeg_quality,
        )
        note_validator(key)
        view = self.jpegs.get(key)
        if view is not None:
            note_outcome("jpeg")
            return view
        reduced = self.reduced(fn, params, version=version)
        rendered = render_jpeg(reduced, contrast, label, quality=self.settings.jpeg_quality)
        meta_json = _meta_frame(reduced.meta, fn)
        view = RenderedView(rendered, reduced.meta, fn, meta_json)
        size = len(rendered.jpeg.data) + len(meta_json) + JPEG_ENTRY_OVERHEAD_BYTES
        self.jpegs.put(key, view, size)
        return view

    def reduced(
        self, fn: str, params: ViewParams, *, version: FileVersion | None = None
    ) -> Reduced:
        """The reduced image for ``fn``/``params``, from the cache or computed once
        (``version``: the caller's fresh stat of the file, if it has one)."""
        path = resolve_path(fn)
        self._check_cost(params)

        def compute(version: FileVersion) -> Reduced:
            frame = self.decoded(version, params.frame)
            return reduce_frame(
                frame,
                params,
                spot_sensitivity=self.settings.spot_sensitivity,
                max_xsize=self.settings.max_xsize,
                fold=self.settings.fold_edges,
            )

        token = params.cache_token(fold=self.settings.fold_edges)
        shared = params.zoom <= 1.0 or self.settings.share_zoomed_views
        version = version or stat_version(path)
        # A tile left out of Redis is not kept in this worker either while its frame is in
        # the frame LRU: its JPEG is kept (the JPEG LRU), and a new contrast reduces it
        # again from the decoded frame in ~3 ms. Kept, every tile took fresh memory (4
        # MB for 1024 px uint32) that the kernel had to fault in and zero: on the
        # benchmark host 1-8 ms per tile, measured inside the worker (the reduction of a
        # zoom-4 tile, p50 of 48, 2.6-7.4 ms kept against 1.2-1.5 ms not kept; tile p50
        # end to end 15.3-19.4 against 11.3-14.3 ms in alternating runs). Tiles no longer
        # evict whole views from the LRU either.
        keep = shared or frame_key(version, params.frame) not in self.frames
        return self.cache.get(path, token, compute, version=version, shared=shared, keep=keep)

    def decoded(self, version: FileVersion, number: int) -> Frame:
        """Frame ``number`` of the file at ``version``, prepared for reduction: from the
        frame LRU, or read once however many threads ask for it at the same time (the
        tiles of a zoom arrive together)."""
        key = frame_key(version, number)
        frame = self.frames.get(key)
        if frame is not None:
            return frame

        def read() -> Frame:
            with self.readers.lease(version) as reader:
                prepared = prepare_frame(reader.read_frame(number))
            self.frames.put(key, prepared, prepared.pixels.nbytes + FRAME_ENTRY_OVERHEAD_BYTES)
            return prepared

        return self._decoding.do(key, read)

    def close(self) -> None:
        """Close readers and Redis connections."""
        self.readers.close()
        self.cache.close()
        if self.progress is not None:
            self.progress.client.close()

    def _check_cost(self, params: ViewParams) -> None:
        """InvalidView (the blank image with its reason, as over ``max_xsize``) for a
        view of more pixels than ``view_max_pixels``, before any reading or reducing."""
        width = max(params.xsize, MIN_XSIZE)
        budget = self.settings.view_max_pixels
        if budget > 0 and width * width > budget:
            raise InvalidView(
                f"xsize {params.xsize}: a view of {width * width} pixels is over the budget of "
                f"{budget} pixels (IS_VIEW_MAX_PIXELS)"
            )

    def _blank(self, job: Job, params: ViewParams, *, reason: str | None) -> Frames:
        label = label_params(job)
        budget = self.settings.view_max_pixels
        widest = self.settings.max_xsize
        if budget > 0:
            widest = min(widest, max(math.isqrt(budget), MIN_XSIZE))
        blank = render_blank(
            params.xsize, label, quality=self.settings.jpeg_quality, max_xsize=widest
        )
        echo = job if reason is None else dict(job, error=reason)
        return [_json(echo), b"", blank.data]


@dataclass(frozen=True)
class ProgressOutlet:
    """Where this worker sends index progress: its own identity channel on the result
    Redis (:func:`istasks.keys.progress_channel`), the one channel its ACL user may use.

    A worker never publishes on the channel a client named (``progressPublisher``): it
    wraps each message as ``{"channel": <that name>, "message": <is.js JSON text>}`` and
    the bridge, which subscribes to every identity's channel on the same connection as
    the results, relays it there only while that identity has such a request in flight.
    """

    client: redis.Redis
    channel: str


class _ProgressPublisher:
    """Publishes one index job's progress through the worker's :class:`ProgressOutlet`.

    A failure (Redis down, or an ACL that forbids the channel) is logged once and the
    rest of that job's progress is dropped: progress is best effort, never an error.
    """

    def __init__(self, outlet: ProgressOutlet) -> None:
        self._outlet = outlet
        self._failed = False

    def __call__(self, channel: str, message: str) -> None:
        if self._failed:
            return
        relayed = json.dumps({"channel": channel, "message": message})
        try:
            self._outlet.client.publish(self._outlet.channel, relayed)
        except (redis.RedisError, OSError) as exc:
            self._failed = True
            log.warning("progress to %s not published (%s); dropping the rest", channel, exc)


def build_service(settings: Settings, identity: Identity, *, threads: int | None = None) -> Service:
    """The service of ``identity``'s worker (cache of its ESAF gid) with ``threads`` task
    threads (default ``settings.worker_concurrency``), wired to the cache Redis and, for
    index progress, to the result Redis (where the bridge listens)."""
    bands.set_threads(settings.image_threads)
    cache: ReducedCache[Reduced] = ReducedCache(
        settings.cache,
        identity.gid,
        Reduced.from_bytes,
        ttl_s=settings.cache_ttl_s,
        lru_max_bytes=settings.lru_max_bytes,
        redis_max_bytes=settings.cache_max_bytes,
    )
    readers: ReaderCache[FrameReader] = ReaderCache(
        READER_CACHE_SIZE, open_reader, lambda reader: reader.close()
    )
    progress = None
    if settings.results:
        client = connect(settings.results, settings, socket_timeout=2.0)
        progress = ProgressOutlet(client, progress_channel(identity.uid, identity.gid))
    # Index jobs may run for many minutes; always leave a thread for views (bug 8/23).
    slots = threading.BoundedSemaphore(max(1, (threads or settings.worker_concurrency) - 1))
    return Service(settings, cache, readers, progress, slots)


def frame_key(version: FileVersion, number: int) -> str:
    """The frame LRU's key of frame ``number`` of the file at ``version``."""
    return f"{version.path}\0{version.mtime_ns}\0{version.size}\0{number}"


def resolve_path(fn: str) -> str:
    """``fn`` as the original opened it: absolute, or relative to the cwd (ESAF home).

    A NUL byte (JSON allows it as an escape) names no file: every OS call would raise
    ValueError, so it is refused here as unavailable data like any other bad path.
    """
    if "\0" in fn:
        raise DataUnavailable(f"no such file (the path contains a NUL byte): {fn!r}")
    return fn if os.path.isabs(fn) else os.path.join(os.getcwd(), fn)


def _index_request(job: Job) -> IndexRequest:
    fn1 = str_field(job, "fn1")
    if not fn1:
        raise IndexRequestError(f"Missing fn1 for job {dumps(job)}")
    fn2 = str_field(job, "fn2")
    return IndexRequest(
        fn1=resolve_path(fn1),
        fn2=resolve_path(fn2) if fn2 and fn2 != fn1 else None,
        frame1=int_field(job, "frame1"),
        frame2=int_field(job, "frame2"),
        tag=str_field(job, "tag") or "Tag_Not_Found",
        channel=str_field(job, "progressPublisher") or None,
    )


def _reply_meta(meta: Mapping[str, Any], fn: str) -> dict[str, Any]:
    """A reduced image's meta with ``fn`` as requested (the cache is shared per gid)."""
    return dict(meta, fn=fn)


def _meta_frame(meta: Mapping[str, Any], fn: str) -> bytes:
    """The reply's meta frame: :func:`_reply_meta` as JSON."""
    return _json(_reply_meta(meta, fn))


def _jpeg_key(reduced_key: str, contrast: ContrastParams, label: LabelParams, quality: int) -> str:
    """JPEG LRU key: the reduced image's key plus everything else the bytes depend on
    (the label text is hashed: it is client-chosen and may be long)."""
    text = hashlib.sha256(label.text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{reduced_key}|w{contrast.wval}|c{contrast.contrast}|q{quality}|l{label.height}-{text}"


def public_reason(exc: BaseException, *names: str) -> str:
    """Why a request for the files ``names`` failed, in the user's own terms: the blank
    reply's ``error`` field, an index error's text.

    Readers name the file they opened: for a relative ``fn`` that is the worker's cwd
    (the ESAF home, ``IS_DATA_ROOT``) joined with it, which tells the browser how the
    server's directories are laid out (``/home/e50001/../../../etc/passwd`` for a request
    of ``../../../etc/passwd``). When a name was relative the cwd is taken out: the
    requested file reads as it was sent and any other file under the cwd (an Eiger data
    file) relative to it, as the user would name it. Absolute names are the user's own
    text and stay as they are.
    """
    text = str(exc) or type(exc).__name__
    if not any(name and not os.path.isabs(name) for name in names):
        return text
    try:
        cwd = os.getcwd()
    except OSError:  # the cwd was removed: nothing the reader said can name it
        return text
    if cwd == os.sep:
        return text
    # The cwd as given and as resolved (readers resolve an Eiger master's directory),
    # each plain and as repr() shows it inside a message; longest first.
    forms = {form for path in (cwd, os.path.realpath(cwd)) for form in (path, repr(path)[1:-1])}
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(re.escape(form) + _CWD_END, _relative, text)
    return text


#: Where a directory name ends inside a message: a separator, a quote, a blank, ":" or ",".
_CWD_END = r"(/|(?=[\'\"\s:,)]|$))"


def _relative(match: re.Match[str]) -> str:
    """``<cwd>/x`` reads ``x``; the cwd itself reads ``.``."""
    return "" if match.group(1) == "/" else "."


def _json(obj: object) -> bytes:
    return dumps(obj).encode()
