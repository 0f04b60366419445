"""The client's side of a call: the queue of its bytes, the response body, the watcher.

The producer (``call.py``) puts the client's pieces here, and never waits for the
client. The response body is a generator gunicorn iterates: it relays the queue, with
a heartbeat comment when the connection is idle, and a failed write ends it. Once the
headers are out (with the first piece), a piece put while the body waits on an empty
queue is written at once by the producer, without blocking (``gunicornhttp.framing``: a
greenlet switch and gunicorn's loop fewer per piece); what the socket does not take
at once is queued, and the body writes the queue itself, several pieces in one send.
A piece is counted as delivered (its SSE events and answer text) once the socket took
it whole; ``delivery`` waits for the client's copy to end and says how much it got
(SPEC rule 11). The watcher notices a hang-up while nothing is being written: a reset,
or a FIN (the hub watches the socket, and a greenlet is spawned only once something
arrives). For a stream a FIN may be a half-close from a client that still reads, so
the watcher notes when it saw the FIN (``fin_at``) and has a probe written (an SSE
comment): a dead peer answers the first write since with a reset, which the
connection's TCP state shows (or, where it cannot be read, a later write fails); a
peer that has drawn none ``TRUST_AFTER`` probe intervals later is only half-closed,
and keeps its stream.
Either way the call is told once, through ``on_gone``, with the moment the FIN or
reset was seen: that, not the confirmation, is when the client left. A busy worker may
wake the watcher late, so the call also ``look``s at the connection's state itself at
the moment that decides its status: when the upstream's answer is whole.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.pool

from gateway import sse
from gateway.gunicornhttp import framing

if TYPE_CHECKING:
    from gateway.adapters.translator import Piece

log = logging.getLogger(__name__)

_END, _GONE, _PROBE = object(), object(), object()
# Probe intervals after the first write following a FIN: a peer that has not reset
# by then is not gone (its round trip is shorter).
TRUST_AFTER = 5
# Longest a call waits to learn whether a FIN was a departure (``settle``): a client
# that nothing could be written to by then is taken at its word.
SETTLE_WAIT = 30.0
# Most bytes of queued pieces the body joins into one write.
JOIN_SIZE = 65536
# The connection's state, the first byte of TCP_INFO (Linux): the peer's FIN is in, or
# its reset (or our own close).
_TCP_CLOSE_WAIT, _TCP_CLOSE = 8, 7


@dataclass(slots=True)
class _Rest:
    """What a write of the producer's left unsent (framed already), for the body to finish."""

    data: bytes
    events: int
    chars: int


@dataclass(frozen=True)
class Pace:
    """How the client side keeps time (HEARTBEAT_INTERVAL, PROBE_INTERVAL, CLIENT_WRITE_TIMEOUT)."""

    heartbeat: float  # idle seconds before a keep-alive comment
    probe_interval: float  # after a FIN on a stream
    write_timeout: float  # a client that stops reading is dropped after this

    @property
    def trust_after(self) -> float:
        """Seconds of writes taken after a FIN that show a half-close, not a departure."""
        return TRUST_AFTER * self.probe_interval


class Downstream:
    """One call's client: what it still has to be sent, and whether it is still there."""

    def __init__(
        self,
        sock: socket.socket | None,
        stream: bool,
        pace: Pace,
        on_gone: Callable[[str, float], None],
        early: bytes | None = None,
    ) -> None:
        self.sock, self.stream, self.pace = sock, stream, pace
        # What may be written before the response starts, to tell a FIN seen then (an
        # interim ``100 Continue``: ON_DISCONNECT=cancel must not wait for the first
        # event to learn that its client left). None: wait for the response.
        self._early = early
        self._started = False  # the body began: the response is the server's to write
        # What the body is to write, in order (a list and an Event: a Queue costs an open
        # stream 2 KB more, and the producer writes most pieces itself).
        self._queue: list[Any] = []
        self._queued = gevent.event.Event()
        self.gone = gevent.event.Event()
        self.events = 0  # SSE events written to the client
        self.chars = 0  # characters of answer text written to the client
        self._body_done = gevent.event.Event()  # the body has ended, or nobody may wait for it
        self.fin_at: float | None = None  # a FIN seen on a stream, not yet told apart
        self._settled = gevent.event.Event()  # ... and now told: gone, or half-closed
        self._wrote: float | None = None  # the first write since the FIN went through
        self._probing = False  # a probe waits in the queue
        self._on_gone = on_gone
        self._readable: Any = None  # the hub's watch on the socket (a libev io watcher)
        self._watchers: gevent.pool.Group | None = None
        self._watcher: gevent.Greenlet | None = None  # once it was readable: tells what came
        self._frame: Callable[[bytes], bytes] | None = None  # once writes may skip gunicorn
        self._parked = False  # the body waits on an empty queue: the producer may write
        self._wrote_at = 0.0  # the latest write: heartbeats are for an idle connection

    def put(self, piece: Piece) -> None:
        """Write a piece to the client, or queue it; never waits. Dropped once it left."""
        if not piece.data or self.gone.is_set():
            return
        if self._parked and not self._queue:
            self._write_now(piece)
        else:
            self._enqueue(piece)

    def _enqueue(self, item: Any) -> None:
        self._queue.append(item)
        self._queued.set()

    def _write_now(self, piece: Piece) -> None:
        """Write a piece from the producer: the body waits, so the socket is free. What
        the socket does not take at once is queued, for the body to finish."""
        data = self._frame(piece.data)
        issued = time.monotonic()
        try:
            sent = self.sock.send(data, 0, 0.0)  # timeout 0: raises rather than waits
        except BlockingIOError:
            sent = 0
        except OSError:  # a reset
            self._write_failed()
            return
        if sent < len(data):
            self._enqueue(_Rest(data[sent:], piece.events, len(piece.text)))
            return
        self.events += piece.events
        self.chars += len(piece.text)
        self._wrote_at = issued
        self._tell(issued)

    def end(self) -> None:
        """Nothing more will come: the body finishes once the queue is sent."""
        self._enqueue(_END)

    def left(self, how: str, at: float | None = None) -> None:
        """The client is gone (since ``at``, default now): stop sending, tell the call (once)."""
        if self.gone.is_set():
            return
        self.gone.set()
        self._enqueue(_GONE)
        self._on_gone(how, time.monotonic() if at is None else at)
        self._settled.set()

    def settle(self) -> None:
        """Wait until a FIN seen is known to be a departure or a half-close (SETTLE_WAIT)."""
        if self.fin_at is not None and not self._settled.wait(SETTLE_WAIT):
            log.warning("downstream: a client that sent a FIN neither reads nor left; gone")
            self.left("connection closed", self.fin_at)

    def look(self) -> None:
        """See a FIN or reset that has arrived, even if the watcher has not woken to it yet."""
        if self.sock is None or self.fin_at is not None or self._settled.is_set():
            return  # nothing to look at, a FIN seen already, or one told apart (or gone)
        state = self._state()
        if state == _TCP_CLOSE:
            self.left("connection reset")
        elif state == _TCP_CLOSE_WAIT:
            self._fin(time.monotonic())

    def _state(self) -> int | None:
        """The connection's TCP state, where the system tells it (Linux)."""
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (OSError, AttributeError):  # not Linux, or no connection left to ask about
            return None

    def delivery(self) -> tuple[int, int]:
        """Wait while the client's copy is being written; (events, characters) it got.

        Ends when the body has written everything, the client left, ``hurry`` was
        called, or a whole write timeout passed with nothing written (a body nobody
        iterates): whichever comes first. At once when the body waits on a queue that
        holds no piece: every piece put was written whole (by the producer, or by the
        body before it went back to wait), and only the end is left to send.
        """
        if self._parked and all(item is _END or item is _GONE for item in self._queue):
            return self.events, self.chars
        patience = self.pace.write_timeout + self.pace.heartbeat
        while not (self._body_done.is_set() or self.gone.is_set()):
            before = (self.events, self.chars)
            gevent.wait([self._body_done, self.gone], timeout=patience, count=1)
            if (self.events, self.chars) == before:
                break
        return self.events, self.chars

    def hurry(self) -> None:
        """End any wait in ``delivery`` or ``settle`` now (shutdown): the record says what
        got there, and a FIN not yet told apart counts as the departure it most likely is."""
        self._body_done.set()
        if self.fin_at is not None and not self._settled.is_set():
            self.left("connection closed", self.fin_at)

    def start_watching(self, group: gevent.pool.Group) -> None:
        """Watch the socket (no socket: nothing to watch).

        Nothing runs until the client sends something: the hub watches the socket for
        reading, and only then does a greenlet of ``group`` look at what came (a FIN, a
        reset, or more bytes). Most calls end with nothing sent, and cost no greenlet.
        """
        if self.sock is not None:
            self._watchers = group
            self._readable = gevent.get_hub().loop.io(self.sock.fileno(), 1)
            self._readable.start(self._woken)

    def stop_watching(self) -> None:
        """Stop watching: with keep-alive, the socket's next bytes are gunicorn's."""
        if self._readable is not None:
            self._readable.close()
            self._readable = None
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None

    def _woken(self) -> None:
        # In the hub, which must not wait: a greenlet reads what came.
        seen = time.monotonic()
        self._readable.close()
        self._readable = None
        self._watcher = self._watchers.spawn(self._watch, seen)
        self._watcher.link_exception(_log_death)

    def _watch(self, seen: float) -> None:
        sock = self.sock
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return  # the client sent more (pipelining): nothing to learn here
        except OSError:
            self.left("connection reset")
            return
        self._fin(seen)
        # Timers wake this greenlet on time however busy the worker is; the body's
        # writes may come late, and after the first the connection's state tells.
        while self.fin_at is not None and not self._settled.is_set():
            if self._early is not None and not self._started:
                self._probe_early()
            elif not self._probing and (self._wrote is None or self._state() is None):
                self._probing = True
                self._enqueue(_PROBE)
            gevent.sleep(self.pace.probe_interval)
            self._tell()

    def _probe_early(self) -> None:
        """Write the early probe, once, before the response has started: a peer that
        closed answers it with a reset, as it would a probe comment."""
        data, self._early = self._early, None
        issued = time.monotonic()
        try:
            self.sock.send(data, 0, 0.0)  # a few bytes on an idle socket: never waits
        except BlockingIOError:
            return
        except OSError:
            self.left("connection closed", self.fin_at)
            return
        self._tell(issued)

    def _tell(self, wrote: float | None = None) -> None:
        """Settle a FIN seen if the writes since tell: one drew a reset (gone), or none
        had a trusted while after the first (half-closed). ``wrote``: a write issued
        then has just gone through."""
        fin = self.fin_at
        if fin is None or self._settled.is_set():
            return
        if self._wrote is None and wrote is not None and wrote >= fin:
            self._wrote = wrote
        state = self._state()
        if state == _TCP_CLOSE:
            self.left("connection closed", fin)
        elif self._wrote is not None:
            # Without the state, only a later write that went through shows no reset came.
            last = time.monotonic() if state is not None else wrote
            if last is not None and last - self._wrote >= self.pace.trust_after:
                self._half_closed()

    def _fin(self, seen: float) -> None:
        """A FIN seen at ``seen``: gone; on a stream, gone or half-closed (the probes tell)."""
        if not self.stream:
            self.left("connection closed", seen)
        elif self.fin_at is None:
            self.fin_at = seen

    def body(self) -> Iterator[bytes]:
        """The streaming response body; a failed write means the client left."""
        self._started = True
        if self.sock is not None:
            self.sock.settimeout(self.pace.write_timeout)
        delivered = False
        self._wrote_at = time.monotonic()  # the first heartbeat is due one interval from now
        try:
            while True:
                item = self._next()
                if item is _END or item is _GONE:
                    delivered = item is _END
                    return
                issued = time.monotonic()
                if item is _PROBE:
                    self._probing = False
                if self._frame is None:
                    data, events, chars = self._unframed(item)
                    yield data
                    # Back here: gunicorn wrote it (a failed write closes this generator),
                    # and the headers with it: from now on the body may write for itself.
                    self.events += events
                    self.chars += chars
                    self._frame = framing() if self.sock is not None else None
                else:
                    self._write(self._framed(item))
                self._wrote_at = issued
                # The write went through: no reset had come back when it was issued.
                # One may have come since (at once, nearby): then the client is gone.
                self._tell(issued)
                if self.gone.is_set():
                    return
        finally:
            self._body_done.set()
            self.stop_watching()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)
            if not delivered:
                self._write_failed()

    def _write_failed(self) -> None:
        """A write failed: the client is gone (after a FIN, this confirms that departure)."""
        fin = self.fin_at
        self.left("write failed" if fin is None else "connection closed", fin)

    def _next(self) -> Any:
        """What to write next: a queued item, or None once the connection idled a heartbeat.

        While this waits on an empty queue, the producer writes its pieces itself.
        """
        self._parked = self._frame is not None
        try:
            while not self._queue:
                self._queued.clear()
                wait = self._wrote_at + self.pace.heartbeat - time.monotonic()
                if wait <= 0 or not self._queued.wait(wait):
                    return None
            return self._queue.pop(0)
        finally:
            self._parked = False

    @staticmethod
    def _unframed(item: Any) -> tuple[bytes, int, int]:
        """What to write for ``item`` (a piece, a probe, None for a heartbeat): its bytes,
        its SSE events and its answer characters."""
        if item is None or item is _PROBE:
            return sse.comment("keep-alive" if item is None else "probe"), 0, 0
        return item.data, item.events, len(item.text)

    def _framed(self, item: Any) -> list[tuple[bytes, int, int]]:
        """What the body writes for ``item``, framed, with the pieces queued behind it."""
        if item is None or item is _PROBE:
            data, _, _ = self._unframed(item)
            return [(self._frame(data), 0, 0)]
        parts, size = [], 0
        while True:
            if isinstance(item, _Rest):
                parts.append((item.data, item.events, item.chars))
            else:
                parts.append((self._frame(item.data), item.events, len(item.text)))
            size += len(parts[-1][0])
            if size >= JOIN_SIZE or not self._queue:
                return parts
            item = self._queue[0]
            if item is _END or item is _GONE or item is _PROBE:
                return parts
            self._queue.pop(0)

    def _write(self, parts: list[tuple[bytes, int, int]]) -> None:
        """Write framed parts at once, each counted as soon as it is written whole; raise
        if the client reads nothing for a write timeout, or is gone."""
        data = memoryview(parts[0][0] if len(parts) == 1 else b"".join(p[0] for p in parts))
        sent = counted = i = 0  # bytes written; bytes of the parts counted; the next part
        while sent < len(data):
            sent += self.sock.send(data[sent:])  # waits for room, up to the write timeout
            while i < len(parts) and counted + len(parts[i][0]) <= sent:
                chunk, events, chars = parts[i]
                counted, i = counted + len(chunk), i + 1
                self.events += events
                self.chars += chars

    def _half_closed(self) -> None:
        """The FIN was a half-close: the client still reads, and has not left."""
        self.fin_at = None
        self._settled.set()


def _log_death(greenlet: gevent.Greenlet) -> None:
    log.error("downstream: watcher died", exc_info=greenlet.exc_info)
