"""Send many raw ZeroMQ messages at once and hold every reply to the one-reply rule.

A :class:`Probe` is one message as a client could send it, well-formed or not. The
:class:`Storm` sends a batch of probes with all of them in flight: tagged probes share
one DEALER socket and carry a unique first frame (the bridge's ROUTER answers along the
routing frames it received, so the tag comes back first); probes whose shape leaves no
room for a tag (one frame, or a bare delimiter) get a DEALER socket each. ``req_storm``
does the same through REQ sockets, as is.js does. :func:`check_reply` is the one place
that says what a valid answer is.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from PIL import Image

from istasks.replies import MAX_ERROR_BYTES

#: Reply shapes of the successful request kinds (spec 1.3), leading empty frame included.
SUCCESS_FRAMES = {"jpeg": 4, "spots": 3, "index": 3}
#: Error texts that are never a fair answer to bad input: an unexpected exception, or a
#: request that timed out, found its worker dead or the service unavailable.
BUG_PREFIXES = (
    "is: internal error",
    "bridge: ",
    "isMain.c main: session store unavailable",
)


@dataclass(frozen=True)
class Probe:
    """One message. Its reply must be ``frames[:echo] + [b""] + reply frames`` (after the
    tag, for tagged probes). ``kind`` names the success shape allowed ("jpeg", "spots",
    "index"), None when only an error may come back; ``note`` describes it for failures.
    """

    frames: tuple[bytes, ...]
    echo: int = 0
    kind: str | None = None
    note: str = ""
    tagged: bool = True


@dataclass
class Ledger:
    """Counts over the whole module: requests, replies by outcome, storm tests run."""

    sent: int = 0
    errors: int = 0
    successes: int = 0
    runs: set[str] = field(default_factory=set)

    def record(self, outcomes: Sequence[str]) -> None:
        """Add a batch's outcomes ("error" or "success")."""
        self.sent += len(outcomes)
        self.errors += sum(1 for o in outcomes if o == "error")
        self.successes += sum(1 for o in outcomes if o == "success")


def check_reply(reply: Sequence[bytes], kind: str | None, note: str, max_width: int) -> str:
    """Assert ``reply`` is one error frame or a valid success of ``kind``; the outcome."""
    assert reply, f"empty reply to {note}"
    if reply[0]:
        _check_error(reply, note)
        return "error"
    assert kind is not None, f"success reply {_short(reply)} to {note}: only an error fits"
    assert len(reply) == SUCCESS_FRAMES[kind], f"{kind} reply of {len(reply)} frames to {note}"
    echo = json.loads(reply[1])
    assert isinstance(echo, dict), f"job echo {reply[1][:200]!r} to {note}"
    if kind == "jpeg":
        assert reply[2] == b"" or isinstance(json.loads(reply[2]), dict), note
        _check_jpeg(reply[3], note, max_width)
    elif kind == "spots":
        assert "spots" in json.loads(reply[2]), f"spots meta {reply[2][:200]!r} to {note}"
    else:
        assert reply[2] == b"" or json.loads(reply[2]) is not None, note
    return "success"


def _check_error(reply: Sequence[bytes], note: str) -> None:
    assert len(reply) == 1, f"error reply of {len(reply)} frames {_short(reply)} to {note}"
    assert len(reply[0]) <= MAX_ERROR_BYTES, f"error frame of {len(reply[0])} bytes to {note}"
    text = reply[0].decode("utf-8")
    assert "Traceback" not in text, text
    assert not text.startswith(BUG_PREFIXES), f"{text!r} in reply to {note}"


def _check_jpeg(data: bytes, note: str, max_width: int) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "JPEG", note
        width, height = image.size
    assert 8 <= width <= max_width, f"JPEG {width} px wide in reply to {note}"
    # keepAspect may make a tall image; never more than a few times the width limit.
    assert height <= 4 * max_width + 64, f"JPEG {width}x{height} in reply to {note}"


def _short(frames: Sequence[bytes]) -> str:
    return repr([f[:80] for f in frames])[:400]


class Storm:
    """Batches of probes against one endpoint, every probe of a batch in flight at once."""

    def __init__(
        self,
        endpoint: str,
        *,
        forbidden: Sequence[bytes] = (),
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.forbidden = tuple(forbidden)  # bytes no reply may contain (secrets)
        self._ctx = context or zmq.Context.instance()
        self._dealer = self._socket()
        self._serial = 0

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        """Close the shared socket."""
        self._dealer.close(linger=0)

    def run(self, probes: Sequence[Probe], *, timeout_s: float, max_width: int) -> list[str]:
        """:meth:`exchange`, then :func:`check_reply` on each; the outcomes in order."""
        replies = self.exchange(probes, timeout_s=timeout_s)
        return [
            check_reply(reply, probe.kind, probe.note, max_width)
            for probe, reply in zip(probes, replies, strict=True)
        ]

    def exchange(self, probes: Sequence[Probe], *, timeout_s: float) -> list[list[bytes]]:
        """Send every probe, collect every reply (route and delimiter removed) in order.

        Fails when a probe gets no reply within ``timeout_s``, more than one reply
        (replies are awaited a little after the last one to see late duplicates), a
        reply along the wrong route, or a reply holding a forbidden byte string.
        """
        expected: dict[bytes, tuple[int, Probe]] = {}
        lone: dict[zmq.Socket[Any], tuple[int, Probe]] = {}
        for index, probe in enumerate(probes):
            if probe.tagged:
                self._serial += 1
                tag = b"t%d" % self._serial
                expected[tag] = (index, probe)
                self._dealer.send_multipart([tag, *probe.frames])
            else:
                sock = self._socket()
                lone[sock] = (index, probe)
                sock.send_multipart(list(probe.frames))
        replies: dict[int, list[bytes]] = {}
        try:
            self._collect(expected, lone, replies, timeout_s)
            lost = [probes[i].note for i in range(len(probes)) if i not in replies]
            assert not lost, f"{len(lost)} of {len(probes)} requests unanswered, e.g. {lost[:5]}"
        except BaseException:
            # The rest of this batch is still in flight to the shared socket: a fresh
            # one keeps those replies from failing the next exchange as strays.
            self._dealer.close(linger=0)
            self._dealer = self._socket()
            raise
        finally:
            for sock in lone:
                sock.close(linger=0)
        return [replies[i] for i in range(len(probes))]

    def _collect(
        self,
        expected: dict[bytes, tuple[int, Probe]],
        lone: dict[zmq.Socket[Any], tuple[int, Probe]],
        replies: dict[int, list[bytes]],
        timeout_s: float,
    ) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        for sock in lone:
            poller.register(sock, zmq.POLLIN)
        total = len(expected) + len(lone)
        deadline = time.monotonic() + timeout_s
        linger_until: float | None = None
        while True:
            now = time.monotonic()
            if len(replies) == total and linger_until is None:
                linger_until = now + 0.2  # late duplicates would arrive now
            end = linger_until if linger_until is not None else deadline
            if now >= end:
                return
            for sock, _ in poller.poll(int((end - now) * 1000) + 1):
                while True:
                    try:
                        message = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._take(sock, message, expected, lone, replies)

    def _take(
        self,
        sock: zmq.Socket[Any],
        message: list[bytes],
        expected: dict[bytes, tuple[int, Probe]],
        lone: dict[zmq.Socket[Any], tuple[int, Probe]],
        replies: dict[int, list[bytes]],
    ) -> None:
        if sock is self._dealer:
            assert message and message[0] in expected, f"reply to no request: {_short(message)}"
            index, probe = expected[message[0]]
            message = message[1:]
        else:
            index, probe = lone[sock]
        assert index not in replies, f"second reply {_short(message)} to {probe.note}"
        route = list(probe.frames[: probe.echo])
        assert message[: len(route) + 1] == [*route, b""], (
            f"reply {_short(message)} does not carry the route of {probe.note}"
        )
        replies[index] = message[len(route) + 1 :]
        # Replies echo the job and error texts quote it (spec 1.3, 2.5), so a request that
        # itself carries a forbidden string (Hypothesis draws literals from this
        # project's source, "redis://" among them) may see it echoed back.
        sent = b"\0".join(probe.frames)
        for secret in self.forbidden:
            if secret not in sent:
                assert not any(secret in frame for frame in message), (
                    f"secret in reply to {probe.note}"
                )


def req_storm(
    endpoint: str,
    payloads: Sequence[tuple[Sequence[bytes], str | None, str]],
    *,
    timeout_s: float,
    max_width: int,
) -> list[str]:
    """Each (frames, kind, note) from its own REQ socket, all in flight; the outcomes."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sockets: list[zmq.Socket[Any]] = []
    poller = zmq.Poller()
    try:
        for frames, _, _ in payloads:
            sock: zmq.Socket[Any] = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send_multipart(list(frames))
            sockets.append(sock)
            poller.register(sock, zmq.POLLIN)
        replies: dict[int, list[bytes]] = {}
        index_of = {sock: i for i, sock in enumerate(sockets)}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(sockets) and time.monotonic() < deadline:
            for sock, _ in poller.poll(int((deadline - time.monotonic()) * 1000) + 1):
                replies[index_of[sock]] = sock.recv_multipart()
                poller.unregister(sock)
    finally:
        for sock in sockets:
            sock.close(linger=0)
    lost = [payloads[i][2] for i in range(len(payloads)) if i not in replies]
    assert not lost, f"{len(lost)} of {len(payloads)} REQ requests unanswered, e.g. {lost[:5]}"
    return [
        check_reply(replies[i], kind, note, max_width) for i, (_, kind, note) in enumerate(payloads)
    ]
