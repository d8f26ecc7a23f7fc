"""The text jansson's ``json_loadb(payload, len, 0, &error)`` puts in ``error.text``.

The original answered a request it could not parse with ``Failed to parse request: `` and
that text (spec 3.4), e.g. ``string or '}' expected near end of file`` for a truncated
object. :func:`first_error` reproduces it without jansson: a small lexer and an iterative
parser that follow jansson 2.x ``src/load.c`` (MIT licence) step by step, far enough to
find its first error, including which bytes it had read as the current token (the
``near '<token>'`` context, shown when it is 1..20 bytes; ``near end of file`` when
nothing was read) and its UTF-8 check of each character as it reads it. Only called for
payloads Python's parser refused or accepted where jansson would not (a lone surrogate
escape, ``\\u0000``, a top-level scalar), so it stays off the request path.
"""

from __future__ import annotations

import math
import re

#: jansson's JSON_PARSER_MAX_DEPTH.
MAX_DEPTH = 2048
#: jansson shows the current token as context only up to this many bytes.
MAX_CONTEXT_BYTES = 20
#: jansson's JSON_ERROR_TEXT_LENGTH, with its NUL.
MAX_TEXT_BYTES = 159
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Tokens: the structural characters stand for themselves.
EOF, INVALID, STRING, INTEGER, REAL, TRUE, FALSE, NULL = range(8)
_WORDS = {b"true": TRUE, b"false": FALSE, b"null": NULL}
_SCALARS = frozenset({STRING, INTEGER, REAL, TRUE, FALSE, NULL})
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET, _COLON, _COMMA = b"{}[]:,"
_STRUCTURAL = frozenset(b"{}[]:,")

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_LETTERS = re.compile(rb"[A-Za-z]*")
_DIGITS = re.compile(rb"[0-9]*")
_PLAIN_STRING = re.compile(rb'[^"\\\x00-\x1f]*')
_ESCAPE = re.compile(rb"\\(?:u([0-9A-Fa-f]{4})|.)", re.DOTALL)
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")


class _Failed(Exception):
    """Parsing stopped; the text is the lexer's first error or this one."""


class _Lexer:
    """jansson's stream + lexer over one payload. ``pos`` is the next byte to read; the
    current token's saved text is ``data[start:pos]`` (jansson saves exactly the bytes
    it has read for the token, minus the ones it put back)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stop, self.bad_byte = _readable(data)
        self.pos = 0
        self.start: int | None = None  # None: between tokens, nothing saved
        self.broken = False  # jansson's STREAM_STATE_ERROR after a UTF-8 error
        self.error: str | None = None  # the first error set (jansson keeps only that)
        self.token = INVALID
        self.nul_in_string = False

    # -- errors ------------------------------------------------------------------------

    def set_error(self, message: str) -> None:
        """jansson's ``error_set``: the message with its context, unless one is set."""
        if self.error is None:
            self.error = _cut(self._with_context(message))

    def fail(self, message: str) -> _Failed:
        """Set ``message`` (if it is the first error) and stop."""
        self.set_error(message)
        return _Failed()

    def _with_context(self, message: str) -> str:
        saved = b"" if self.start is None else self.data[self.start : self.pos]
        if saved and saved[0] != 0:
            if len(saved) > MAX_CONTEXT_BYTES:
                return message
            shown = saved.split(b"\0", 1)[0].decode("utf-8", "replace")
            return f"{message} near '{shown}'"
        return message if self.broken else f"{message} near end of file"

    # -- stream ------------------------------------------------------------------------

    def get(self) -> int | None:
        """Next byte, or None at the end (EOF, or after a UTF-8 error)."""
        if self.pos < self.stop:
            self.pos += 1
            return self.data[self.pos - 1]
        if self.bad_byte is not None and not self.broken:
            self.broken = True
            self.set_error(f"unable to decode byte 0x{self.bad_byte:x}")
        return None

    def unget(self, byte: int | None) -> None:
        if byte is not None:
            self.pos -= 1

    def skip(self, pattern: re.Pattern[bytes]) -> None:
        match = pattern.match(self.data, self.pos, self.stop)
        assert match is not None  # every pattern here also matches the empty string
        self.pos = match.end()

    # -- tokens ------------------------------------------------------------------------

    def scan(self) -> int:
        """Read the next token into ``token`` (jansson's ``lex_scan``)."""
        self.start = None
        self.nul_in_string = False
        self.skip(_WHITESPACE)
        byte = self.get()
        if byte is None:
            self.token = INVALID if self.broken else EOF
            return self.token
        self.start = self.pos - 1
        if byte in _STRUCTURAL:
            self.token = byte
        elif byte == ord('"'):
            self.token = self._string()
        elif byte == ord("-") or 0x30 <= byte <= 0x39:
            self.token = self._number(byte)
        elif 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A:
            self.skip(_LETTERS)
            self.unget(self.get())  # jansson reads one past the word (a UTF-8 check)
            self.token = _WORDS.get(self._saved(), INVALID)
        else:
            if byte >= 0x80:  # the rest of the character is saved with it
                self.pos = self.start + _utf8_length(byte)
            self.token = INVALID
        return self.token

    def _string(self) -> int:
        """After the opening quote: a STRING token, or INVALID with an error set."""
        while True:
            self.skip(_PLAIN_STRING)
            byte = self.get()
            if byte == ord('"'):
                return self._decode_escapes()
            if byte is None:
                if not self.broken:
                    self.set_error("premature end of input")
                return INVALID
            if byte <= 0x1F:
                self.unget(byte)
                name = "unexpected newline" if byte == 0x0A else f"control character 0x{byte:x}"
                self.set_error(name)
                return INVALID
            if not self._escape():
                self.set_error("invalid escape")
                return INVALID

    def _escape(self) -> bool:
        """After a backslash: False for an invalid escape."""
        byte = self.get()
        if byte == ord("u"):
            for _ in range(4):
                byte = self.get()
                if byte is None or byte not in _HEX:
                    return False
            return True
        return byte is not None and byte in _SIMPLE_ESCAPES

    def _decode_escapes(self) -> int:
        """jansson's second pass over a complete string: surrogates and NUL."""
        assert self.start is not None
        body, at = self.data[self.start + 1 : self.pos - 1], 0
        while (match := _ESCAPE.search(body, at)) is not None:
            at = match.end()
            if match[1] is None:
                continue
            value = int(match[1], 16)
            if 0xD800 <= value <= 0xDBFF:
                low = _ESCAPE.match(body, at) if body[at : at + 2] == b"\\u" else None
                if low is None:
                    self.set_error(f"invalid Unicode '\\u{value:04X}'")
                    return INVALID
                second = int(low[1], 16)
                if not 0xDC00 <= second <= 0xDFFF:
                    self.set_error(f"invalid Unicode '\\u{value:04X}\\u{second:04X}'")
                    return INVALID
                at = low.end()
            elif 0xDC00 <= value <= 0xDFFF:
                self.set_error(f"invalid Unicode '\\u{value:04X}'")
                return INVALID
            elif value == 0:
                self.nul_in_string = True
        return STRING

    def _number(self, byte: int | None) -> int:
        """jansson's ``lex_scan_number`` from its first byte (already read)."""
        if byte == ord("-"):
            byte = self.get()
        if byte == ord("0"):
            byte = self.get()
            if _is_digit(byte):
                self.unget(byte)
                return INVALID
        elif _is_digit(byte):
            byte = self._digits()
        else:
            self.unget(byte)
            return INVALID
        if byte in (ord("."), ord("e"), ord("E")):
            return self._real(byte)
        self.unget(byte)
        value = int(self._saved())
        if _INT64_MIN <= value <= _INT64_MAX:
            return INTEGER
        self.set_error("too big negative integer" if value < 0 else "too big integer")
        return INVALID

    def _real(self, byte: int | None) -> int:
        """The fraction and exponent of a number, from the '.', 'e' or 'E' after its
        integer part."""
        if byte == ord("."):
            byte = self.get()
            if not _is_digit(byte):
                self.unget(byte)
                return INVALID
            byte = self._digits()
        if byte in (ord("e"), ord("E")):
            byte = self.get()
            if byte in (ord("+"), ord("-")):
                byte = self.get()
            if not _is_digit(byte):
                self.unget(byte)
                return INVALID
            byte = self._digits()
        self.unget(byte)
        if math.isinf(float(self._saved())):
            self.set_error("real number overflow")
            return INVALID
        return REAL

    def _saved(self) -> bytes:
        """The bytes read for the current token."""
        assert self.start is not None
        return self.data[self.start : self.pos]

    def _digits(self) -> int | None:
        """Consume a run of digits; return the byte after it (read, as jansson does)."""
        self.skip(_DIGITS)
        return self.get()


def first_error(payload: bytes) -> str | None:
    """jansson's error text for ``payload`` (flags 0), or None when it would parse it."""
    lex = _Lexer(payload)
    try:
        if lex.scan() not in (_LBRACE, _LBRACKET):
            raise lex.fail("'[' or '{' expected")
        _parse_value(lex)
        if lex.scan() != EOF:
            raise lex.fail("end of file expected")
    except _Failed:
        return lex.error
    return lex.error  # None: a lexer error always ends the parse, so there is none


def _parse_value(lex: _Lexer) -> None:
    """jansson's recursive ``parse_value``/``parse_object``/``parse_array``, with an
    explicit stack of the open containers (2048 levels would not fit Python's)."""
    open_containers: list[int] = []
    while True:
        if len(open_containers) + 1 > MAX_DEPTH:
            raise lex.fail("maximum parsing depth reached")
        if _enter_value(lex, open_containers):
            continue  # a non-empty container was opened: its first value is next
        while open_containers:  # the value is complete: close what it completes
            lex.scan()
            if lex.token == _COMMA:
                lex.scan()
                if open_containers[-1] == _LBRACE:
                    _member_key(lex)
                elif lex.token == EOF:
                    raise lex.fail("']' expected")
                break
            if open_containers[-1] == _LBRACE and lex.token != _RBRACE:
                raise lex.fail("'}' expected")
            if open_containers[-1] == _LBRACKET and lex.token != _RBRACKET:
                raise lex.fail("']' expected")
            open_containers.pop()
        else:
            return


def _enter_value(lex: _Lexer, open_containers: list[int]) -> bool:
    """Start the value at the current token. True when it opened a non-empty container
    (its first value is now the current token), False when the value is complete."""
    token = lex.token
    if token == _LBRACE:
        if lex.scan() == _RBRACE:
            return False
        open_containers.append(_LBRACE)
        _member_key(lex)
        return True
    if token == _LBRACKET:
        if lex.scan() == _RBRACKET:
            return False
        if lex.token == EOF:
            raise lex.fail("']' expected")
        open_containers.append(_LBRACKET)
        return True
    if token == STRING and lex.nul_in_string:
        raise lex.fail("\\u0000 is not allowed without JSON_ALLOW_NUL")
    if token in _SCALARS:
        return False
    raise lex.fail("invalid token" if token == INVALID else "unexpected token")


def _member_key(lex: _Lexer) -> None:
    """An object member's key and colon; leaves the value's first token current."""
    if lex.token != STRING:
        raise lex.fail("string or '}' expected")
    if lex.nul_in_string:
        raise lex.fail("NUL byte in object key not supported")
    if lex.scan() != _COLON:
        raise lex.fail("':' expected")
    lex.scan()


def _readable(data: bytes) -> tuple[int, int | None]:
    """(length of the valid UTF-8 prefix, first byte of the invalid sequence or None).

    jansson checks each character when it reads its first byte; the first invalid
    sequence it can meet starts where Python's strict decoder reports it.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start, data[exc.start]
    return len(data), None


def _utf8_length(first: int) -> int:
    """Bytes of a valid UTF-8 character from its first byte."""
    return 2 if first < 0xE0 else 3 if first < 0xF0 else 4


def _is_digit(byte: int | None) -> bool:
    return byte is not None and 0x30 <= byte <= 0x39


def _cut(text: str) -> str:
    """At most the 159 bytes jansson's error buffer holds."""
    raw = text.encode("utf-8")
    if len(raw) <= MAX_TEXT_BYTES:
        return text
    return raw[:MAX_TEXT_BYTES].decode("utf-8", "ignore")
