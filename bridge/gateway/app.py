"""The gateway's ASGI application (Starlette): routes, session checks, dispatch, caching.

Every request is checked against the session store (one ``HMGET`` through
:class:`bridge.sessions.SessionVerifier`), so a logout refuses the next request. The
session's pid comes from ``Authorization: Bearer <pid>`` or from the ``HttpOnly``,
``SameSite=Strict`` cookie that ``POST /api/v1/session`` sets for the viewer page; the
ESAF is part of the path. Blocking steps (the session's Redis, NSS lookups) run in a
worker thread; the dispatch itself never blocks the event loop (its sender threads do).

Views carry a strong ETag: a digest of the JPEG bytes the worker made. The worker is
still asked on every request (answered from its JPEG LRU when the view is warm): it
re-checks, as the user, that the file may still be read and has not changed, which a
gateway-side 304 could not. What a 304 saves is the transfer and the browser's decode;
within ``VIEW_MAX_AGE_S`` the browser does not even ask.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.dispatch import Dispatcher
from bridge.gateway.indexruns import IndexRuns
from bridge.gateway.openapi import openapi_document
from bridge.gateway.params import (
    PIXEL_REQUIRED,
    REQUIRED,
    Parser,
    frame_fields,
    parse_index_body,
    parse_query,
    pixel_fields,
    view_fields,
)
from bridge.gateway.problems import Problem, blank_status, error_status, problem_response
from bridge.metrics import BridgeMetrics
from bridge.outcome import Reply, frames_outcome
from bridge.sessions import Session, SessionStoreUnavailable, SessionVerifier
from istasks.errors import AuthError, IdentityError
from istasks.keys import VALIDATOR_HEX
from istasks.logs import redact_token
from istasks.redisconn import connect
from istasks.replies import error_frames
from istasks.settings import Settings
from queues.identity import IdentityResolver
from queues.naming import Identity

log = logging.getLogger(__name__)
T = TypeVar("T")

API = "/api/v1"
COOKIE = "is_session"
STATIC_DIR = Path(__file__).with_name("static")
#: Longest query string and request body accepted (a view's query is ~200 bytes).
MAX_QUERY_BYTES = 8192
MAX_BODY_BYTES = 16384
#: What a pid may look like: printable, cookie-safe, bounded.
PID_PATTERN = re.compile(r"[A-Za-z0-9._~+/=:-]{1,256}")
MAX_ESAF = 2**31 - 1
#: How long the browser may reuse a view without asking (panning back, replaying frames).
VIEW_MAX_AGE_S = 60
#: Extra wait beyond the dispatcher's own deadline before the gateway answers 504.
DEADLINE_MARGIN_S = 5.0
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        b"style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
)


class Gateway:
    """The HTTP front of the service over the bridge's verifier, resolver and dispatcher."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        sessions: SessionVerifier,
        identities: IdentityResolver,
        *,
        metrics: BridgeMetrics | None = None,
        health: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._sessions = sessions
        self._identities = identities
        self._metrics = metrics or BridgeMetrics()
        self._health = health
        self._runs = IndexRuns(settings.sessions)
        self._in_flight: dict[str, int] = {}
        self._total_in_flight = 0
        self._rid_prefix = "gw" + secrets.token_hex(2)
        self._rid_count = 0
        self._metrics.track_in_flight(lambda: self._total_in_flight)
        self._view_fields = view_fields(settings.max_xsize)
        self._frame_fields = frame_fields()
        self._pixel_fields = pixel_fields()

    @property
    def metrics(self) -> BridgeMetrics:
        """The series served on ``/metrics``."""
        return self._metrics

    def app(self) -> ASGIApp:
        """The ASGI application: routes inside the size and security-header guard."""
        esaf = API + "/esaf/{esaf:int}"
        routes = [
            Route("/", self.page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
            Route(API + "/session", self.session_get, methods=["GET"]),
            Route(API + "/session", self.session_login, methods=["POST"]),
            Route(API + "/session", self.session_logout, methods=["DELETE"]),
            Route(esaf + "/view", self.view, methods=["GET"]),
            Route(esaf + "/view.json", self.view_json, methods=["GET"]),
            Route(esaf + "/meta", self.meta, methods=["GET"]),
            Route(esaf + "/pixel", self.pixel, methods=["GET"]),
            Route(esaf + "/index", self.index_start, methods=["POST"]),
            Route(API + "/index/{run_id}/events", self.index_events, methods=["GET"]),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={
                Problem: _on_problem,
                HTTPException: _on_http_exception,
                Exception: _on_crash,
            },
            lifespan=self._lifespan,
        )
        return Guard(app)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Cancel the index relays at shutdown."""
        yield
        await self._runs.close()

    # -- pages ------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The viewer page."""
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI 3.1 document of this API."""
        return JSONResponse(openapi_document(self._settings.max_xsize))

    async def healthz(self, request: Request) -> Response:
        """200 when the session/broker Redis answers, else 503."""
        ok = True if self._health is None else await anyio.to_thread.run_sync(self._health)
        body = {"status": "ok" if ok else "unavailable", "in_flight": self._total_in_flight}
        return JSONResponse(body, 200 if ok else 503, headers={"Cache-Control": "no-store"})

    async def metrics_page(self, request: Request) -> Response:
        """Prometheus text, to loopback clients only (unauthenticated, like the bridge's)."""
        if not _loopback(request):
            raise Problem(403, "metrics are served to loopback clients only")
        body = generate_latest(self._metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- sessions ---------------------------------------------------------------------

    async def session_get(self, request: Request) -> Response:
        """Who the current session is: user and allowed ESAFs."""
        pid = _pid(request)
        session = await self._verify(pid, 0)
        return JSONResponse(_session_body(session), headers={"Cache-Control": "no-store"})

    async def session_login(self, request: Request) -> Response:
        """Check ``{"pid": ...}`` and keep it in an HttpOnly, SameSite=Strict cookie.
        JSON only: a cross-site form cannot post it (and a fetch would need CORS)."""
        body = await _json_body(request)
        pid = body.get("pid") if isinstance(body, dict) else None
        if not isinstance(pid, str) or not PID_PATTERN.fullmatch(pid):
            raise Problem(422, 'the body must be {"pid": "<session id>"}')
        session = await self._verify(pid, 0)
        response = JSONResponse(_session_body(session), headers={"Cache-Control": "no-store"})
        response.set_cookie(
            COOKIE,
            pid,
            httponly=True,
            samesite="strict",
            path="/",
            secure=self._settings.gateway_secure_cookie,
        )
        return response

    async def session_logout(self, request: Request) -> Response:
        """Forget the cookie (the login service's session itself is not touched)."""
        response = Response(status_code=204, headers={"Cache-Control": "no-store"})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- views ------------------------------------------------------------------------

    async def view(self, request: Request) -> Response:
        """The JPEG of one view, with its levels in headers; ETag and 304."""
        jpeg, echo, _meta, reply = await self._jpeg(request)
        etag = _etag(jpeg, reply)
        headers = {
            "ETag": etag,
            "Cache-Control": f"private, max-age={VIEW_MAX_AGE_S}",
            "X-IS-Wval-Used": str(echo.get("wval_used", "")),
            "X-IS-Bval-Used": str(echo.get("bval_used", "")),
            "X-IS-Cache": reply.cache if isinstance(reply, Reply) else "none",
            "Vary": "Cookie, Authorization",
        }
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    async def view_json(self, request: Request) -> Response:
        """The levels and meta of the same view (the same request to the worker: its
        JPEG LRU answers, nothing is reduced a second time)."""
        jpeg, echo, meta, reply = await self._jpeg(request)
        body = {
            "levels": {"wval_used": echo.get("wval_used"), "bval_used": echo.get("bval_used")},
            "etag": _etag(jpeg, reply),
            "meta": json.loads(meta),
        }
        return JSONResponse(body, headers={"Cache-Control": "private, no-cache"})

    async def meta(self, request: Request) -> Response:
        """A frame's detector metadata with its spot count and ring statistics (the
        ``spots`` request of the wire protocol)."""
        return await self._worker_json(request, "spots", self._frame_fields, rings=True)

    async def pixel(self, request: Request) -> Response:
        """One detector pixel at full depth (the viewer's value under the cursor), read by
        the same worker from its frame LRU; ``value`` is null outside the image."""
        return await self._worker_json(request, "pixel", self._pixel_fields, PIXEL_REQUIRED)

    async def _worker_json(
        self,
        request: Request,
        kind: str,
        fields: Mapping[str, Parser],
        required: Mapping[str, str] = REQUIRED,
        **extra: Any,
    ) -> Response:
        """The JSON a worker answers (reply frame 2) to the ``kind`` request the query
        names, plus ``extra`` job fields; Problem otherwise."""

        def values() -> dict[str, Any]:
            return {**extra, **parse_query(_single(request), fields, required)}

        frames = await self._call(request, kind, values)
        if frames[0]:
            raise Problem(error_status(frames), _detail(frames, _pid(request)))
        if len(frames) < 3:
            raise Problem(502, f"malformed {kind} reply from the worker")
        return JSONResponse(json.loads(frames[2]), headers={"Cache-Control": "private, no-cache"})

    async def _jpeg(self, request: Request) -> tuple[bytes, dict[str, Any], bytes, list[bytes]]:
        """(JPEG, echoed job, meta JSON, reply) of the view the query names; Problem
        otherwise. The meta stays text: only ``view.json`` decodes it."""
        frames = await self._call(
            request, "jpeg", lambda: parse_query(_single(request), self._view_fields)
        )
        if frames[0]:
            raise Problem(error_status(frames), _detail(frames, _pid(request)))
        if len(frames) < 4:
            raise Problem(502, "malformed jpeg reply from the worker")
        echo = json.loads(frames[1])
        if not frames[2]:  # the grey fallback: the reason is in the echo
            reason = str(echo.get("error") or "no image for this view")
            raise Problem(blank_status(reason), redact_token(reason, _pid(request)))
        return frames[3], echo, frames[2], frames

    # -- index ------------------------------------------------------------------------

    async def index_start(self, request: Request) -> Response:
        """Start an indexing run; its progress and result at the ``events`` URL (SSE)."""
        esaf = _esaf(request)
        pid, identity = await self._admit(request, esaf)
        fields = parse_index_body(await _json_body(request))
        run = self._runs.new(pid, esaf)
        pubsub = await self._runs.subscribe(run)
        job = {
            "type": "index",
            "pid": pid,
            "esaf": esaf,
            "tag": run.run_id,
            **fields,
            "progressPublisher": run.channel,
        }
        # In a thread: the gateway's dispatcher sends on the caller's thread (main.py).
        submit = self._dispatcher.submit
        future = await anyio.to_thread.run_sync(submit, identity, "index", job, self._next_rid())
        self._runs.follow(run, pubsub, future)
        events = f"{API}/index/{run.run_id}/events"
        return JSONResponse(
            {"id": run.run_id, "events": events},
            202,
            headers={"Location": events, "Cache-Control": "no-store"},
        )

    async def index_events(self, request: Request) -> Response:
        """The run's progress messages, then ``result`` (or ``error``), as SSE."""
        pid = _pid(request)
        run = self._runs.get(request.path_params["run_id"], pid)
        await self._admit(request, run.esaf)  # logged out since the start: refused
        return StreamingResponse(
            run.stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- the request path -------------------------------------------------------------

    async def _admit(self, request: Request, esaf: int) -> tuple[str, Identity]:
        """The request's pid and identity for ``esaf``, or 401/403/503 (one trip to a
        thread for both: the session's Redis and NSS may block)."""
        pid = _pid(request)
        return pid, await self._refusals(pid, lambda: self._identity(pid, esaf))

    def _identity(self, pid: str, esaf: int) -> Identity:
        """The session's identity for ``esaf`` (blocking: the session's Redis, NSS)."""
        session = self._sessions.verify(pid, esaf)
        return self._identities.resolve(session.user, esaf)

    async def _verify(self, pid: str, esaf: int) -> Session:
        return await self._refusals(pid, lambda: self._sessions.verify(pid, esaf))

    async def _refusals(self, pid: str, check: Callable[[], T]) -> T:
        """``check()`` in a thread, its refusals as problems."""
        try:
            return await anyio.to_thread.run_sync(check)
        except IdentityError as exc:
            raise Problem(403, str(exc)) from None
        except SessionStoreUnavailable as exc:
            raise Problem(503, str(exc), headers={"Retry-After": "2"}) from None
        except AuthError as exc:
            text = redact_token(str(exc), pid)
            if "for esaf" in text:
                raise Problem(403, text) from None
            raise Problem(401, text, headers={"WWW-Authenticate": 'Bearer realm="is"'}) from None

    async def _call(
        self, request: Request, kind: str, values: Callable[[], dict[str, Any]]
    ) -> list[bytes]:
        """Admit the request, send its ``kind`` job (the query's ``values()``) and wait
        for the reply: 401/403/503 for the session, then 422 for the query, 429 beyond
        the session's share of requests in flight.

        The session check, the identity and the send take one trip to a thread (the
        dispatcher sends on its caller's thread, main.py): a trip for the check and a
        hand-off to a sender thread cost ~0.1 ms more of the gateway's one GIL a
        request, and the gateway's CPU is what bounds its views/s on a busy host.
        """
        esaf = _esaf(request)
        pid = _pid(request)
        try:
            parsed: dict[str, Any] | Problem = values()
        except Problem as exc:  # told once the session has been checked: 401 comes first
            parsed = exc
        held = self._in_flight.get(pid, 0)
        if held >= self._settings.gateway_session_in_flight:
            raise Problem(
                429,
                f"more than {held} requests in flight for this session",
                headers={"Retry-After": "1"},
            )
        rid = self._next_rid()

        def admit_and_send() -> tuple[Identity, concurrent.futures.Future[list[bytes]]]:
            identity = self._identity(pid, esaf)
            if isinstance(parsed, Problem):
                raise parsed
            job = {"type": kind, "pid": pid, "esaf": esaf, **parsed}
            return identity, self._dispatcher.submit(identity, kind, job, rid)

        self._in_flight[pid] = held + 1
        self._total_in_flight += 1
        started = time.monotonic()
        try:
            identity, future = await self._refusals(pid, admit_and_send)
            limit_s = self._settings.view_timeout_s + self._settings.worker_start_timeout_s
            try:
                frames = await asyncio.wait_for(
                    asyncio.wrap_future(future), limit_s + DEADLINE_MARGIN_S
                )
            except TimeoutError:
                frames = Reply(error_frames(f"no reply in time (request {rid})"), outcome="timeout")
        finally:
            self._total_in_flight -= 1
            left = self._in_flight.pop(pid) - 1
            if left:
                self._in_flight[pid] = left
        cache = frames.cache if isinstance(frames, Reply) else "none"
        outcome = frames_outcome(kind, frames)
        self._metrics.observe(kind, outcome, time.monotonic() - started, cache)
        log.info(
            "rid=%s type=%s identity=%s outcome=%s ms=%.1f",
            rid,
            kind,
            identity.queue,
            outcome,
            (time.monotonic() - started) * 1000,
        )
        return frames

    def _next_rid(self) -> str:
        self._rid_count += 1
        return f"{self._rid_prefix}-{self._rid_count:x}"


class Guard:
    """ASGI wrapper: bounds the query and body sizes before routing, and adds the
    security headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = _size_refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self._app(scope, receive, send_with_headers)


def _size_refusal(scope: Scope) -> Response | None:
    if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        return problem_response(Problem(414, f"the query is longer than {MAX_QUERY_BYTES} bytes"))
    for name, value in scope.get("headers", []):
        too_long = not value.isdigit() or int(value) > MAX_BODY_BYTES
        if name == b"content-length" and too_long:
            detail = f"the body is larger than {MAX_BODY_BYTES} bytes"
            return problem_response(Problem(413, detail))
    return None


async def _json_body(request: Request) -> Any:
    """The request's JSON body (bounded, also when sent without a length); 415/413/422."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise Problem(415, "send the body as application/json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Problem(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise Problem(422, "the body is not valid JSON") from None


def _pid(request: Request) -> str:
    """The session id from the Authorization header or the cookie; 401 without one."""
    challenge = {"WWW-Authenticate": 'Bearer realm="is"'}
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not PID_PATTERN.fullmatch(token):
            raise Problem(401, "Authorization must be 'Bearer <session id>'", headers=challenge)
        return token
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and PID_PATTERN.fullmatch(cookie):
        return cookie
    raise Problem(
        401, "no session: sign in, or send Authorization: Bearer <pid>", headers=challenge
    )


def _esaf(request: Request) -> int:
    esaf = request.path_params["esaf"]
    if not isinstance(esaf, int) or esaf > MAX_ESAF:
        raise Problem(422, f"esaf must be at most {MAX_ESAF}")
    return esaf


def _single(request: Request) -> Mapping[str, str]:
    """The query parameters, each given once (a repeated one is ambiguous: 422)."""
    items = request.query_params.multi_items()
    values = dict(items)
    if len(values) != len(items):
        raise Problem(422, "a query parameter is repeated")
    return values


def _detail(frames: list[bytes], pid: str) -> str:
    return redact_token(frames[0].decode("utf-8", "replace"), pid)


def _session_body(session: Session) -> dict[str, Any]:
    return {"user": session.user, "esafs": sorted(session.allowed_esafs)}


def _etag(jpeg: bytes, reply: list[bytes]) -> str:
    """The view's strong ETag: the worker's validator of it (a digest of the file version
    and every parameter the bytes depend on), or a digest of the bytes themselves when
    the worker sent none (an older worker during a rolling upgrade)."""
    validator = reply.validator if isinstance(reply, Reply) else None
    return f'"{validator or hashlib.sha256(jpeg).hexdigest()[:VALIDATOR_HEX]}"'


def _etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our strong tag."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, request.url.path)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    problem = Problem(exc.status_code, str(exc.detail), headers=exc.headers)
    return problem_response(problem, request.url.path)


async def _on_crash(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback here, never shown to the client."""
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return problem_response(Problem(500, "internal error"), request.url.path)


def health_check(url: str | None) -> Callable[[], bool]:
    """A health probe pinging the Redis at ``url`` (True without one to ping)."""
    client = connect(url, socket_timeout=1.0) if url else None

    def check() -> bool:
        if client is None:
            return True
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    return check
