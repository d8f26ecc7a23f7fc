"""Hypothesis strategies for hostile is.js requests: jobs, payload bytes and envelopes.

Jobs mostly carry a valid session pid so that they get past the bridge and reach a
worker, with every other field hostile: wrong JSON types, huge or negative numbers,
unicode, path tricks and the hostile files of :mod:`tests.fuzz_files`. Payloads add
what a JSON encoder never produces (random bytes, non-UTF-8, cut JSON, NaN, unpaired
surrogate escapes, deep nesting). Envelopes wrap payloads in every multipart shape a
DEALER can send. Each strategy yields a :class:`~tests.fuzz_wire.Probe` that knows which
reply shape it may get.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from bridge.wire import MAX_ENVELOPE_FRAMES
from tests.fuzz_wire import SUCCESS_FRAMES, Probe

KINDS = ("jpeg", "spots", "index")
TYPES: tuple[str, ...] = (
    "jpeg",
    "JPEG",
    "Jpeg",
    "spots",
    "SPOTS",
    "index",
    "rsync_transfer",
    "dance",
    "",
)
TYPES += ("local_dir_stats", "jpeg ", "jpe\u0301g", "\uff4a\uff50\uff45\uff47")
EDGE_INTS: tuple[int, ...] = (
    0,
    -1,
    1,
    7,
    8,
    9,
    63,
    64,
    65,
    384,
    1024,
    10_000,
    10_001,
    40_000,
    40_001,
)
EDGE_INTS += (2**31 - 1, 2**31, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63))
EDGE_FLOATS: tuple[float, ...] = (
    0.0,
    -0.0,
    0.05,
    0.95,
    1.0,
    1.04,
    1.05,
    1e-300,
    5e-324,
    1e300,
    0.1 + 0.2,
)
EDGE_FLOATS += (1.7976931348623157e308, -1.7976931348623157e308)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
hostile_ints = st.one_of(
    st.sampled_from(EDGE_INTS),
    st.integers(-100, 20_000),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
hostile_numbers = st.one_of(
    hostile_ints, st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=False, allow_infinity=False)
)


def weighted(
    usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], rare_share: float
) -> st.SearchStrategy[Any]:
    """``rare`` about ``rare_share`` of the time, else ``usual`` (``one_of`` would give each
    branch an equal share, and merges repeated branches)."""
    slots = round(1 / rare_share)
    return st.integers(1, slots).flatmap(lambda n: rare if n == slots else usual)


def field_value(typical: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the field's own kind of value, sometimes any JSON value (a wrong type)."""
    return weighted(typical, json_values, 1 / 4)


def jobs(pids: Sequence[str], paths: Sequence[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Job objects: a known pid most of the time, every other field hostile or absent."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "esaf": field_value(st.sampled_from((0, 0, 0, -5, 7, 51234, 2**40, 2**63 - 1))),
        "fn": field_value(st.sampled_from(paths) | st.text(max_size=40)),
        "frame": field_value(hostile_ints),
        "xsize": field_value(hostile_ints),
        "zoom": field_value(hostile_numbers),
        "segcol": field_value(hostile_numbers),
        "segrow": field_value(hostile_numbers),
        "wval": field_value(hostile_ints),
        "contrast": field_value(hostile_ints),
        "label": field_value(st.text(max_size=60) | st.sampled_from(("x" * 3000, "☃" * 500))),
        "labelHeight": field_value(hostile_ints),
        "tag": json_values,
        "keepAspect": field_value(st.booleans()),
        "fn1": field_value(st.sampled_from(paths)),
        "fn2": field_value(st.sampled_from(paths)),
        "frame1": field_value(hostile_ints),
        "frame2": field_value(hostile_ints),
        "progressPublisher": field_value(st.text(max_size=20)),
    }
    # Mostly a valid pid and a served type, so that most jobs reach a worker.
    return st.builds(
        _job,
        pid=weighted(st.sampled_from(pids), json_values, 1 / 8),
        kind=weighted(st.sampled_from(KINDS), st.sampled_from(TYPES) | json_values, 1 / 4),
        chosen=st.fixed_dictionaries({}, optional=fields),
        extra=st.dictionaries(st.text(max_size=8), json_values, max_size=2),
    )


def _job(pid: Any, kind: Any, chosen: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, **chosen, "pid": pid, "type": kind}


def success_kind(payload: bytes) -> str | None:
    """The success shape a payload may get: its ``type`` when the JSON is an object."""
    try:
        job = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    kind = job.get("type") if isinstance(job, dict) else None
    lowered = kind.lower() if isinstance(kind, str) else None
    return lowered if lowered in SUCCESS_FRAMES else None


def job_payloads(pids: Sequence[str], paths: Sequence[str]) -> st.SearchStrategy[bytes]:
    """A job encoded as is.js would (UTF-8 JSON), with or without ASCII escapes."""
    return st.builds(
        lambda job, ascii_only: json.dumps(job, ensure_ascii=ascii_only).encode(),
        jobs(pids, paths),
        st.booleans(),
    )


#: Whole payloads no client should send.
ODD_PAYLOADS: tuple[bytes, ...] = (
    b"",
    b"null",
    b"[]",
    b"{}",
    b'"jpeg"',
    b"42",
    b"[{}]",
    b"}",
    b"{" * 50,
)
ODD_PAYLOADS += (b"\xef\xbb\xbf{}", b"NaN", b'{"pid":NaN}', b'{"pid":Infinity}')
#: JSON texts spliced in as a job's label: NaN, overflows, unpaired surrogates, nesting.
ODD_VALUES: tuple[str, ...] = ("NaN", "-Infinity", "1e400", "-1e999", "9" * 30, "-" + "9" * 25)
ODD_VALUES += ("9223372036854775808", '"\\ud800"', '"\\udfff x"', '"\\ud83d\\ude00"')
ODD_VALUES += ('"a\\u0000b"', "[" * 900 + "]" * 900, "[" * 3000 + "]" * 3000)
ODD_VALUES += ('{"a":' * 600 + "1" + "}" * 600, '"' + "\\\\" * 200 + '"')


def raw_payloads(pids: Sequence[str]) -> st.SearchStrategy[bytes]:
    """Payload bytes no JSON encoder writes: noise, cut or invalid JSON, deep nesting."""
    base = f'{{"type":"jpeg","pid":{json.dumps(pids[0])},"esaf":0,"xsize":64'
    return st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=40).map(lambda b: b"\xff\xfe" + b),
        st.text(max_size=80).map(lambda t: t.encode("utf-8")),
        st.sampled_from(ODD_PAYLOADS),
        st.integers(0, len(base)).map(lambda n: base[:n].encode()),
        st.sampled_from(ODD_VALUES).map(
            lambda v: f'{base},"label":{v},"labelHeight":16}}'.encode()
        ),
        st.integers(900, 1100).map(lambda n: f'{base},"x":{"[" * n}{"]" * n}}}'.encode()),
    )


def _frame(max_size: int = 30) -> st.SearchStrategy[bytes]:
    """A non-empty frame (an empty one would be read as the delimiter)."""
    return st.binary(min_size=1, max_size=max_size)


def probes(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[Probe]:
    """Payloads in well-formed envelopes (with or without extra frames after them)."""
    return st.builds(
        lambda payload, extra: Probe(
            (b"", payload, *extra), kind=success_kind(payload), note=f"payload {payload[:300]!r}"
        ),
        payloads,
        st.lists(st.binary(max_size=20), max_size=3),
    )


def envelope_probes(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[Probe]:
    """Every multipart shape: many routing frames, no delimiter, no payload, lone frames."""
    return st.one_of(
        st.builds(_routed, st.lists(_frame(), min_size=1, max_size=80), payloads),
        st.builds(_undelimited, st.lists(_frame(200), min_size=1, max_size=6)),
        st.just(Probe((b"",), note="delimiter without payload")),
        st.builds(lambda p: Probe((b"", b"", p), note="empty payload, then more"), payloads),
        st.builds(lambda f: Probe((f,), note=f"one frame {f[:60]!r}", tagged=False), _frame(200)),
        st.just(Probe((b"",), note="a lone empty frame", tagged=False)),
        st.builds(
            lambda p: Probe(
                (b"", p), kind=success_kind(p), note=f"untagged {p[:200]!r}", tagged=False
            ),
            payloads,
        ),
    )


def _routed(route: list[bytes], payload: bytes) -> Probe:
    # The bridge sees our socket id and the tag in front of ``route``.
    fits = len(route) + 3 <= MAX_ENVELOPE_FRAMES
    kind = success_kind(payload) if fits else None
    return Probe(
        (*route, b"", payload),
        echo=len(route),
        kind=kind,
        note=f"{len(route)} routing frames, payload {payload[:200]!r}",
    )


def _undelimited(frames: list[bytes]) -> Probe:
    # No delimiter: the bridge answers along every frame but the last.
    return Probe(tuple(frames), echo=len(frames) - 1, note=f"no delimiter {frames!r:.200}")


def req_requests(
    payloads: st.SearchStrategy[bytes],
) -> st.SearchStrategy[tuple[list[bytes], str | None, str]]:
    """(frames after the REQ delimiter, success kind, note) for REQ clients."""
    return st.builds(
        lambda payload, extra: ([payload, *extra], success_kind(payload), f"REQ {payload[:200]!r}"),
        payloads,
        st.lists(st.binary(max_size=10), max_size=2),
    )
