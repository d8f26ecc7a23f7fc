"""jansson's parse-error texts (bridge.jansson), as the original sent them (spec 3.4).

Expected texts follow jansson's src/load.c: the message of the first error set, then
`` near '<bytes read for the current token>'`` (1..20 bytes), `` near end of file`` when
none were read, or nothing (longer tokens; UTF-8 errors between tokens).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from bridge.jansson import first_error
from bridge.wire import parse_job
from istasks.errors import RequestError

REQUEST = (
    b'{"type":"jpeg","pid":"0123456789abcdef","esaf":50001,"fn":"/pf/esafs/e50001/x_master.h5",'
    b'"frame":2,"xsize":512,"zoom":1.26,"segcol":1,"segrow":0,"label":"x \\u00e9","labelHeight":16,'
    b'"wval":-1,"contrast":-1,"tag":"t","extra":[true,false,null,[],{},-0.5e-3]}'
)


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        # What a browser client can send: empty, truncated, invalid token, trailing garbage.
        (b"", "'[' or '{' expected near end of file"),
        (b"  \n", "'[' or '{' expected near end of file"),
        (b'{"type":"jpeg","pid":"x","esaf":1,', "string or '}' expected near end of file"),
        (b"{", "string or '}' expected near end of file"),
        (b'{"type"', "':' expected near end of file"),
        (b'{"type":', "unexpected token near end of file"),
        (b'{"type":"jpeg"', "'}' expected near end of file"),
        (b'{"type":"jp', "premature end of input near '\"jp'"),
        (b'{"fn":"/pf/esafs/e50001/x_mas', "premature end of input"),  # token > 20 bytes
        (b"[", "']' expected near end of file"),
        (b"[1,2", "']' expected near end of file"),
        (b"[1,", "']' expected near end of file"),
        (b"[1,]", "unexpected token near ']'"),
        (b"[1 2]", "']' expected near '2'"),
        (b'{"a":1 "b":2}', "'}' expected near '\"b\"'"),
        (b'{"a":1}x', "end of file expected near 'x'"),
        (b'{"a":1}{}', "end of file expected near '{'"),
        (b'{"a":1},', "end of file expected near ','"),
        (b'{"a":undefined}', "invalid token near 'undefined'"),
        (b'{"a":NaN}', "invalid token near 'NaN'"),
        (b'{"a":-Infinity}', "invalid token near '-'"),
        (b"{'a':1}", "string or '}' expected near '''"),
        (b'{"a":}', "unexpected token near '}'"),
        (b'{,"a":1}', "string or '}' expected near ','"),
        (b"{not json", "string or '}' expected near 'not'"),
        # Top level: jansson (flags 0) wants an object or an array.
        (b"42", "'[' or '{' expected near '42'"),
        (b'"text"', "'[' or '{' expected near '\"text\"'"),
        (b"null", "'[' or '{' expected near 'null'"),
        (b"\xef\xbb\xbf{}", "'[' or '{' expected near '\ufeff'"),  # a UTF-8 BOM
        # Numbers.
        (b'{"a":01}', "invalid token near '0'"),
        (b'{"a":1.}', "invalid token near '1.'"),
        (b'{"a":1e+}', "invalid token near '1e+'"),
        (b'{"a":.5}', "invalid token near '.'"),
        (b'{"a":99999999999999999999}', "too big integer near '99999999999999999999'"),
        (b'{"a":-9223372036854775809}', "too big negative integer near '-9223372036854775809'"),
        (b'{"a":-99999999999999999999}', "too big negative integer"),  # 21 bytes: no context
        (b'{"a":1e400}', "real number overflow near '1e400'"),
        # Strings.
        (b'{"a":"x\ny"}', "unexpected newline near '\"x'"),
        (b'{"a":"x\ty"}', "control character 0x9 near '\"x'"),
        (b'{"a":"\\q"}', "invalid escape near '\"\\q'"),
        (b'{"a":"\\u12g4"}', "invalid escape near '\"\\u12g'"),
        (b'{"a":"\\ud800"}', "invalid Unicode '\\uD800' near '\"\\ud800\"'"),
        (b'{"a":"\\udc00x"}', "invalid Unicode '\\uDC00' near '\"\\udc00x\"'"),
        (b'{"a":"\\ud800\\u0041"}', "invalid Unicode '\\uD800\\u0041' near '\"\\ud800\\u0041\"'"),
        (b'{"a":"\\u0000"}', "\\u0000 is not allowed without JSON_ALLOW_NUL near '\"\\u0000\"'"),
        (b'{"a\\u0000":1}', "NUL byte in object key not supported near '\"a\\u0000\"'"),
        # UTF-8, checked as each character is read.
        (b"\xff", "unable to decode byte 0xff"),
        (b'{"a":"\xc3"}', "unable to decode byte 0xc3 near '\"'"),
        (b'{"a":"\xed\xa0\x80"}', "unable to decode byte 0xed near '\"'"),  # a surrogate
        (b'{"a":true\xff}', "unable to decode byte 0xff near 'true'"),
        (b'{"a":1} \xff', "unable to decode byte 0xff"),
        (b'{"a":1}\x00', "end of file expected near end of file"),  # a NUL shows as nothing
        # Depth.
        (b"[" * 2049, "maximum parsing depth reached near '['"),
    ],
)
def test_error_texts(payload: bytes, text: str) -> None:
    assert first_error(payload) == text


@pytest.mark.parametrize(
    "payload",
    [REQUEST, b"{}", b"[]", b' [ {"pid" : "x"} ] \r\n', b'{"a":"\\ud83d\\ude00"}',
     b'{"a":-0,"b":0.0e0,"c":1E+2}', b'{"a":"\\\\u0000"}', b"[" * 2048 + b"]" * 2048],
)  # fmt: skip
def test_what_jansson_accepts(payload: bytes) -> None:
    assert first_error(payload) is None


def test_every_truncation_of_a_request_is_an_error_at_the_end() -> None:
    for cut in range(len(REQUEST)):
        text = first_error(REQUEST[:cut])
        assert text is not None
        if text.endswith("near end of file") or text.startswith("premature end of input"):
            continue
        # Cut inside a token ("1.", "tru", "\\u00"): jansson shows the part it read.
        token = text.split(" near '", 1)[1][:-1]
        assert REQUEST[:cut].endswith(token.encode()), text


def _python_accepts(payload: bytes) -> bool:
    """Python's strict parse plus the rules jansson adds (what parse_job relies on)."""

    def refuse(_: str) -> Any:
        raise ValueError

    def int64(digits: str) -> int:
        if not -(1 << 63) <= int(digits) < 1 << 63:
            raise ValueError
        return int(digits)

    def finite(text: str) -> float:
        if math.isinf(float(text)):
            raise ValueError
        return float(text)

    try:
        value = json.loads(
            payload.decode("utf-8"), parse_constant=refuse, parse_int=int64, parse_float=finite
        )
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict | list) and "\0" not in json.dumps(value, ensure_ascii=False)


def test_refuses_exactly_what_python_refuses_on_mutated_requests() -> None:
    rng = np.random.default_rng(1111)
    alphabet = b'{}[]:," \\u0dD8e.-+1aZ\n\x00\xc3\xa9\xff'
    for _ in range(4000):
        data = bytearray(REQUEST)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(data)))
            byte = alphabet[int(rng.integers(0, len(alphabet)))]
            kind = int(rng.integers(0, 3))
            if kind == 0:
                data[at] = byte
            elif kind == 1:
                data.insert(at, byte)
            else:
                del data[at]
        payload = bytes(data)
        assert (first_error(payload) is None) == _python_accepts(payload), payload


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"", "isMain.c main: Failed to parse request: '[' or '{' expected near end of file"),
        (b'{"pid":"x","esaf":1,', "string or '}' expected near end of file"),
        (b'{"pid":"x","fn":"\\ud800"}', "invalid Unicode '\\uD800' near '\"\\ud800\"'"),
        (b'{"pid":"x","fn":"a\\u0000"}', "\\u0000 is not allowed without JSON_ALLOW_NUL"),
        (b"7", "'[' or '{' expected near '7'"),
        (b'{"pid":"x"}\xff', "unable to decode byte 0xff"),
    ],
)
def test_parse_job_sends_jansson_texts(payload: bytes, text: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_job(payload)
    assert caught.value.wire_text().startswith("isMain.c main: Failed to parse request: ")
    assert text in caught.value.wire_text()


def test_parse_job_accepts_escapes_jansson_accepts() -> None:
    job = parse_job(b'{"pid":"x","label":"\\ud83d\\ude00 \\\\u0000"}')
    assert job["label"] == "\U0001f600 \\u0000"


def test_big_payloads_keep_python_texts() -> None:
    # Beyond MAX_EMULATED_BYTES the emulation (pure Python) is not run on the loop thread.
    big = b'{"pid":"x","pad":"' + b"a" * 10_000
    with pytest.raises(RequestError, match="Failed to parse request: Unterminated string"):
        parse_job(big)
    lone = b'{"pid":"x","pad":"' + b"a" * 10_000 + b'\\ud800"}'
    with pytest.raises(RequestError, match="unpaired surrogate"):
        parse_job(lone)
