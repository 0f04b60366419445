"""Server-sent events at the byte level: an incremental decoder and an encoder.

Pure code (no I/O). The decoder takes bytes exactly as they come off the upstream
socket, in chunks split anywhere, and returns whole events. Lines end in CRLF, CR or
LF (a CR at the end of one chunk may be half of a CRLF finished by the next), as the
WHATWG EventSource grammar says. Every event keeps its ``raw`` bytes, terminating
blank line included, so a relay can forward the stream byte for byte while parsing
it on the side; comment-only blocks (``: keep-alive``) are returned as events too.
An event still unfinished past the decoder's bound raises ``TooLarge``: a peer that
never sends the blank line cannot make the decoder hold its bytes without end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CR, _LF = 0x0D, 0x0A
_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(slots=True)
class Event:
    """One SSE event: its fields, and the exact bytes it arrived as."""

    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""

    @property
    def type(self) -> str:
        """The event type, ``message`` when no ``event:`` field was sent."""
        return self.event or "message"


class TooLarge(ValueError):
    """The event being read has grown past the decoder's bound without ending."""


class Decoder:
    """Feed bytes, get complete events; ``flush()`` at end of stream.

    Joining the ``raw`` of every event returned by ``feed`` and ``flush`` gives back
    the input exactly, so a relay that forwards ``raw`` is byte for byte. ``max_event``
    bounds an event not yet ended: once it holds more bytes than that, the next
    ``feed`` raises ``TooLarge`` (None: no bound).
    """

    def __init__(self, max_event: int | None = None) -> None:
        self._max_event = max_event
        self._buf = bytearray()  # unconsumed bytes: the event being read
        self._line_start = 0  # offset in _buf where the current line begins
        self._pending_cr = False  # a line ended in CR: an LF next belongs to it
        self._event = Event()
        self._data: list[str] | None = None
        self._held: Event | None = None  # complete, but its CR may yet get an LF

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume a chunk; return the events it completed."""
        if not chunk:
            return []
        events: list[Event] = []
        if self._pending_cr:
            # The previous chunk ended in CR; an LF here finishes that CRLF.
            self._pending_cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if self._held is not None:
                    self._held.raw += b"\n"
                else:
                    self._buf += b"\n"
                    self._line_start = len(self._buf)
        if self._held is not None:
            events.append(self._held)
            self._held = None
        if not self._buf and _whole_events(chunk):
            # The common chunk: whole LF-framed events, nothing before them held.
            for block in chunk[:-2].split(b"\n\n"):
                for line in block.split(b"\n"):
                    self._line(line)
                events.append(self._take(block + b"\n\n"))
            return events
        buf = self._buf
        scan_from = len(buf)
        if self._max_event is not None and scan_from > self._max_event:
            # Checked before more comes, so the events the last chunk ended went out.
            raise TooLarge(f"an event still unfinished after {scan_from} bytes")
        buf += chunk
        event_start = 0
        for match in _EOL.finditer(buf, scan_from):
            line = bytes(buf[self._line_start : match.start()])
            self._line_start = match.end()
            at_edge_cr = match.end() == len(buf) and buf[-1] == _CR
            self._pending_cr = at_edge_cr
            if self._line(line):
                event = self._take(bytes(buf[event_start : self._line_start]))
                event_start = self._line_start
                if at_edge_cr:
                    self._held = event  # wait for the next byte: it may be this CR's LF
                else:
                    events.append(event)
        if event_start:
            del buf[:event_start]
            self._line_start -= event_start
        return events

    def flush(self) -> list[Event]:
        """End of stream: return what is left (an unterminated event) as a last event."""
        self._pending_cr = False
        events = [self._held] if self._held is not None else []
        self._held = None
        if self._buf:
            if self._line_start < len(self._buf):
                self._line(bytes(self._buf[self._line_start :]))
            events.append(self._take(bytes(self._buf)))
            self._buf.clear()
            self._line_start = 0
        return events

    def _line(self, raw_line: bytes) -> bool:
        """Apply one line; True when it was the blank line that ends an event."""
        if not raw_line:
            return True
        line = raw_line.decode("utf-8", errors="replace")
        name, sep, value = line.partition(":")
        if not name and sep:
            self._event.comments.append(value[1:] if value.startswith(" ") else value)
            return False
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            if self._data is None:
                self._data = []
            self._data.append(value)
        elif name == "event":
            self._event.event = value
        elif name == "id":
            if "\0" not in value:
                self._event.id = value
        elif name == "retry" and value.isdigit():
            self._event.retry = int(value)
        return False

    def _take(self, raw: bytes) -> Event:
        ev = self._event
        if self._data is not None:
            ev.data = "\n".join(self._data)
        ev.raw = raw
        self._event, self._data = Event(), None
        return ev


def _whole_events(chunk: bytes) -> bool:
    """Whether ``chunk`` is whole events framed by LF alone, with no blank line but the
    one ending each: split on blank lines, it gives the decoder's events and bytes."""
    return (
        chunk.endswith(b"\n\n")
        and chunk[0] != _LF
        and b"\r" not in chunk
        and b"\n\n\n" not in chunk
    )


def encode(data: str, event: str | None = None) -> bytes:
    """Frame one event: optional ``event:`` line, one ``data:`` line per line of data."""
    parts = [f"event: {event}\n"] if event else []
    parts.extend(f"data: {line}\n" for line in data.split("\n"))
    parts.append("\n")
    return "".join(parts).encode()


def comment(text: str = "") -> bytes:
    """A comment block (``: text``) that parsers ignore: a heartbeat or a probe."""
    return f": {text}\n\n".encode()
