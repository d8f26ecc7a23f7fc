"""The gateway's OpenAPI 3.1 document, written out (served at ``/openapi.json``).

Hand-written rather than generated: Starlette has no schema generator without YAML
docstrings, and the document is small. tests/test_gateway.py checks that every route
of the app is in it and that it validates as JSON Schema where it must.
"""

from __future__ import annotations

from typing import Any

from istasks.core.params import MAX_LABEL_HEIGHT, MIN_XSIZE

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


#: The ``meta`` endpoint's body: the detector's own fields (they vary by format) plus
#: the view's statistics and its 16 ring bins (radii in detector pixels from the beam).
_RING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ring": {"type": "integer", "minimum": 0},
        "n": {"type": "integer", "minimum": 0},
        "mean": {"type": "number"},
        "rms": {"type": "number"},
        "spots": {"type": "integer", "minimum": 0},
        "inner_px": {"type": ["number", "null"]},
        "outer_px": {"type": ["number", "null"]},
    },
    "required": ["ring", "n", "mean", "rms", "spots", "inner_px", "outer_px"],
}
PIXEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "x": {"type": "integer"},
        "y": {"type": "integer"},
        "frame": {"type": "integer"},
        "value": {"type": ["integer", "null"]},
        "saturated": {"type": "boolean"},
    },
    "required": ["x", "y", "frame", "value", "saturated"],
}
META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "mean": {"type": "number"},
        "rms": {"type": "number"},
        "stddev": {"type": "number"},
        "min": {"type": "integer"},
        "max": {"type": "integer"},
        "spots": {"type": "integer"},
        "rings": {"type": "array", "items": _RING_SCHEMA},
    },
    "required": ["n", "mean", "spots"],
}


def _problems(*statuses: int) -> dict[str, Any]:
    texts = {
        401: "no session, or a session not accepted",
        403: "ESAF not allowed, identity refused, or the file not readable by the user",
        404: "no such file or frame",
        413: "request body too large",
        414: "query too long",
        415: "body is not JSON",
        422: "a bad parameter",
        429: "too many requests in flight for this session",
        502: "the worker answered with an error",
        503: "no worker or Redis available",
        504: "no reply in time",
    }
    return {
        str(s): {
            "description": texts[s],
            "content": {"application/problem+json": {"schema": _PROBLEM}},
        }
        for s in statuses
    }


def _query(name: str, schema: dict[str, Any], text: str, *, required: bool = False) -> Any:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": text,
    }


def _frame_params() -> list[Any]:
    return [
        {
            "name": "esaf",
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
            "description": "ESAF number (0: the user's own data)",
        },
        _query("fn", {"type": "string", "maxLength": 4096}, "image file", required=True),
        _query("frame", {"type": "integer", "minimum": 1}, "frame number (default 1)"),
    ]


def _view_params(max_xsize: int) -> list[Any]:
    number = {"type": "number"}
    return [
        *_frame_params(),
        _query(
            "xsize",
            {"type": "integer", "minimum": MIN_XSIZE, "maximum": max_xsize},
            "output width in pixels",
        ),
        _query("zoom", {"type": "number", "minimum": 1}, "magnification (rounded to 0.1)"),
        _query("segcol", number, "window column: x origin = trunc(width/zoom * segcol)"),
        _query("segrow", number, "window row: y origin = trunc(height/zoom * segrow)"),
        _query("wval", {"type": "integer"}, "white level (<0 with contrast<=0: automatic)"),
        _query("contrast", {"type": "integer"}, "black level (<=0: automatic)"),
        _query("label", {"type": "string", "maxLength": 1024}, "banner text"),
        _query(
            "labelHeight",
            {"type": "integer", "minimum": 0, "maximum": MAX_LABEL_HEIGHT},
            "banner height (0: none)",
        ),
        _query("keepAspect", {"type": "boolean"}, "output height follows the detector"),
    ]


def openapi_document(max_xsize: int) -> dict[str, Any]:
    """The document for a gateway whose views are at most ``max_xsize`` wide."""
    auth: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]
    view_errors = _problems(401, 403, 404, 414, 422, 429, 502, 503, 504)
    return {
        "openapi": "3.1.0",
        "info": {"title": "is image server HTTP gateway", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the login service's session id (pid)",
                },
                "cookie": {"type": "apiKey", "in": "cookie", "name": "is_session"},
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                    "required": ["type", "title", "status", "detail"],
                },
                "Session": {
                    "type": "object",
                    "properties": {
                        "user": {"type": ["string", "null"]},
                        "esafs": {"type": "array", "items": {"type": "integer"}},
                    },
                },
            },
        },
        "paths": {
            "/api/v1/session": {
                "get": {
                    "summary": "the current session",
                    "security": auth,
                    "responses": {
                        "200": {
                            "description": "session",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Session"}
                                }
                            },
                        },
                        **_problems(401, 503),
                    },
                },
                "post": {
                    "summary": "sign in: keep the pid in an HttpOnly SameSite=Strict cookie",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"pid": {"type": "string"}},
                                    "required": ["pid"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {"description": "signed in; cookie set"},
                        **_problems(401, 413, 415, 422, 503),
                    },
                },
                "delete": {
                    "summary": "forget the cookie",
                    "responses": {"204": {"description": "cookie cleared"}},
                },
            },
            "/api/v1/esaf/{esaf}/view": {
                "get": {
                    "summary": "the JPEG of a view; levels in X-IS-Wval-Used/X-IS-Bval-Used",
                    "security": auth,
                    "parameters": _view_params(max_xsize),
                    "responses": {
                        "200": {
                            "description": "the view",
                            "headers": {
                                "ETag": {"schema": {"type": "string"}},
                                "X-IS-Wval-Used": {"schema": {"type": "integer"}},
                                "X-IS-Bval-Used": {"schema": {"type": "integer"}},
                            },
                            "content": {"image/jpeg": {}},
                        },
                        "304": {"description": "If-None-Match matched"},
                        **view_errors,
                    },
                }
            },
            "/api/v1/esaf/{esaf}/view.json": {
                "get": {
                    "summary": "levels and meta of the same view (no second reduction)",
                    "security": auth,
                    "parameters": _view_params(max_xsize),
                    "responses": {
                        "200": {
                            "description": "levels, etag, meta",
                            "content": {"application/json": {}},
                        },
                        **view_errors,
                    },
                }
            },
            "/api/v1/esaf/{esaf}/meta": {
                "get": {
                    "summary": "detector metadata, spot count and ring statistics of a frame",
                    "security": auth,
                    "parameters": _frame_params(),
                    "responses": {
                        "200": {
                            "description": "the frame's meta, its statistics and its rings",
                            "content": {"application/json": {"schema": META_SCHEMA}},
                        },
                        **view_errors,
                    },
                }
            },
            "/api/v1/esaf/{esaf}/pixel": {
                "get": {
                    "summary": "one detector pixel of a frame at full depth (the viewer's "
                    "value under the cursor)",
                    "security": auth,
                    "parameters": [
                        *_frame_params(),
                        _query("x", {"type": "integer", "minimum": 0}, "column", required=True),
                        _query("y", {"type": "integer", "minimum": 0}, "row", required=True),
                    ],
                    "responses": {
                        "200": {
                            "description": "the pixel; value null outside the image",
                            "content": {"application/json": {"schema": PIXEL_SCHEMA}},
                        },
                        **view_errors,
                    },
                }
            },
            "/api/v1/esaf/{esaf}/index": {
                "post": {
                    "summary": "start indexing; follow it at the returned events URL",
                    "security": auth,
                    "parameters": _frame_params()[:1],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "fn1": {"type": "string"},
                                        "frame1": {"type": "integer"},
                                        "fn2": {"type": "string"},
                                        "frame2": {"type": "integer"},
                                        "tag": {"type": "string"},
                                    },
                                    "required": ["fn1"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": {"description": "started: {id, events}"},
                        **_problems(401, 403, 413, 415, 422, 429, 503),
                    },
                }
            },
            "/api/v1/index/{run_id}/events": {
                "get": {
                    "summary": "Server-Sent Events: progress, then result or error",
                    "security": auth,
                    "parameters": [
                        {
                            "name": "run_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {}},
                        },
                        **_problems(401, 403, 404),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "health",
                    "responses": {
                        "200": {"description": "ok"},
                        "503": {"description": "Redis unreachable"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (loopback clients only)",
                    "responses": {"200": {"description": "text format"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": {"description": "OpenAPI"}},
                }
            },
        },
    }
