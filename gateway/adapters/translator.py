"""One stream through the gateway: upstream SSE events in, the client's bytes out. Pure code.

``feed`` takes each SSE event the upstream sent and returns a ``Piece``: bytes for the
client and what they carry. When the client's format is the upstream's, the upstream's
own bytes go on unchanged, except a usage-only chunk the client did not ask for (the
gateway asks OpenAI-format upstreams for usage, SPEC rule 9) and a keep-alive of blank
data (an SDK would read it as JSON, and fail); otherwise the events are rendered in the
client's format through the IR. Either way every event is parsed for the
record: ``response()`` is the answer so far, as an IR response (its ``id`` is the
upstream's). ``finish`` ends the client's stream when the upstream's bytes end;
``fail`` ends it with the client protocol's error frames (numbered on from the relayed
events where the protocol numbers them). An event whose data is not JSON, or is JSON in
a shape its protocol has not (a list where an index goes), raises ``BrokenStream``
before any of it reaches the client: relaying it would hand the client bytes its SDK
cannot parse, and skipping it would record a completed call that lost part of its
answer.

A piece says what its caller keeps time on (the first token, the terminal event) and
what counting deliveries to the client needs (SSE events, answer text). ``replay`` is
the same translation with a renderer and no parser: a stored answer (request dedup),
rendered as a whole stream in the client's format whatever format it first came in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from gateway import sse

from . import PROTOCOLS, ir, wire


class BrokenStream(ValueError):
    """The upstream sent an event its protocol cannot carry: data that is not JSON."""


@dataclass(slots=True)  # not frozen: one is made per upstream event, and frozen is slower
class Piece:
    """Bytes for the client, and what they carry (not to be changed once made)."""

    data: bytes = b""
    events: int = 0  # SSE events in ``data``
    text: str = ""  # answer text in ``data`` (text deltas: not reasoning, not tool arguments)
    first_token: bool = False  # the call's first text, reasoning or tool-argument delta
    terminal: bool = False  # the upstream's terminal event: the answer is whole

    def __add__(self, other: Piece) -> Piece:
        return Piece(
            self.data + other.data,
            self.events + other.events,
            self.text + other.text,
            self.first_token or other.first_token,
            self.terminal or other.terminal,
        )


class StreamTranslator:
    """An upstream stream in one protocol, for a client of the same one or another."""

    def __init__(self, client_format: str, upstream_format: str, request: dict) -> None:
        client = PROTOCOLS[client_format]
        same = client_format == upstream_format
        self._stream_error = client.stream_error
        self._parser = PROTOCOLS[upstream_format].StreamParser()
        self._renderer = None if same else client.StreamRenderer(request)
        self._hide_usage = same and not request.get("stream_usage")
        self._acc = ir.Accumulator()
        self._tokens = False
        self._ended = False  # the client's stream is over: its end or an error went out

    @classmethod
    def replay(cls, client_format: str, request: dict, response: dict) -> Piece:
        """A stored answer (an IR response) as the client's whole stream, always rendered."""
        translator = cls(client_format, client_format, request)
        translator._renderer = PROTOCOLS[client_format].StreamRenderer(request)
        return translator._translate(ir.stream_events(response), None)

    @staticmethod
    def accepts(content_type: str) -> bool:
        """Whether an upstream answer of this type is a stream: JSON is a verdict instead."""
        return "json" not in content_type

    def preface(self, event: sse.Event) -> bool:
        """Whether the upstream's event opens its stream with nothing a client could use
        yet: a keep-alive, or one of its protocol's ``PREFACE`` (Anthropic's
        ``message_start`` and ``ping``). Until an event that is not, the call has not
        committed to this upstream: an error then fails over (``Response.events``)."""
        if wire.blank(event):
            return True
        kinds = self._parser.PREFACE
        if not kinds:
            return False
        data = wire.event_data(event)
        return ((data and data.get("type")) or event.event) in kinds

    def refusal(self, event: sse.Event) -> str | None:
        """What the upstream's first event says if it is an error event, else None: the
        try failed before anything was answered, as a 2xx JSON answer that is an error
        does (``wire.ErrorAnswer``), and fails over likewise."""
        data = event.data or ""
        if "error" not in data and "failed" not in data:  # most first events: no parse
            return None
        parser = type(self._parser)()  # its own: the stream's parser reads it again
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            for said in parser.feed(event):
                if said["type"] == "error":
                    error = {"type": said.get("error_type"), "message": said.get("message")}
                    return str(wire.error_answer(error))
        return None

    @property
    def terminal(self) -> bool:
        """The upstream's terminal event arrived: its answer is whole."""
        return self._acc.terminal

    @property
    def error(self) -> dict | None:
        """The upstream's error event (``message``, ``type``), if it sent one."""
        return self._acc.error

    def feed(self, event: sse.Event) -> Piece:
        """One upstream event: what the client gets of it (BrokenStream if it cannot be read).
        Nothing after the upstream's terminal event: neither the client's nor the record's."""
        if self._acc.terminal:
            return Piece()
        skipped = self._parser.skipped
        try:
            events = self._parser.feed(event)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # JSON in a shape its protocol has not (a number where a list goes), which
            # the parser met with an error: the upstream's, as for a whole answer of it.
            raise BrokenStream(
                f"upstream sent an event its protocol cannot carry: {event.data[:200]!r}"
            ) from exc
        if self._parser.skipped > skipped:
            raise BrokenStream(f"upstream sent an event that is not JSON: {event.data[:200]!r}")
        return self._translate(events, event)

    def finish(self) -> Piece:
        """The upstream's bytes ended: the rest, and an error if its stream was cut short."""
        piece = self._translate(self._parser.finish(), None)
        if self._ended:
            return piece
        return piece + self.fail("Upstream ended the stream before its end")

    def fail(self, message: str) -> Piece:
        """The client protocol's error frames, ending its stream (nothing once it ended)."""
        if self._ended:
            return Piece()
        self._ended = True
        if self._renderer is not None:  # it numbers and closes the stream it rendered
            error = {"type": "error", "message": message, "error_type": "api_error"}
            data = b"".join(self._renderer.feed(error))
        elif (sequence := getattr(self._parser, "sequence", None)) is not None:
            data = self._stream_error(message, sequence_number=sequence + 1)  # Responses
        else:
            data = self._stream_error(message)
        return Piece(data, data.count(b"\n\n"))

    def response(self) -> dict | None:
        """The answer so far as an IR response; None while the upstream has said nothing."""
        return self._acc.result() if self._acc.events else None

    def _translate(self, events: list[dict], source: sse.Event | None) -> Piece:
        if not events and source is None:
            return Piece()
        first_token = terminal = False
        text: list[str] = []
        for event in events:
            self._acc.feed(event)
            if event["type"] == "block_delta":
                if not self._tokens:
                    first_token = self._tokens = True
                if "text" in event["delta"]:
                    text.append(event["delta"]["text"])
            elif event["type"] == "stop":
                terminal = True
        if self._renderer is not None:
            data = b"".join(frame for event in events for frame in self._renderer.feed(event))
            count = data.count(b"\n\n")  # our frames end in one blank line, with none inside
        elif (
            source is None
            or (source.data is not None and wire.blank(source))
            or (
                self._hide_usage  # the first event's type first: a generator costs
                and events
                and events[0]["type"] == "usage"
                and all(e["type"] == "usage" for e in events)
            )
        ):
            data, count = b"", 0
        else:
            data, count = source.raw, int(source.data is not None)
        self._ended = self._ended or terminal or self._acc.error is not None
        return Piece(data, count, "".join(text) if data else "", first_token, terminal)
