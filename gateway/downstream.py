"""The client's side of a call: the queue of its bytes, the response body, the watcher.

The producer (``call.py``) puts the client's pieces here and never touches the socket.
The response body is a generator gunicorn iterates: it only relays the queue, with
a heartbeat comment when the queue is idle, and a failed write ends it. A piece is
counted as delivered (its SSE events and answer text) once gunicorn comes back for the
next one, that is once its write succeeded; ``delivery`` waits for the client's copy to
end and says how much it got (SPEC rule 11). The watcher
greenlet notices a hang-up while nothing is being written: a reset, or a FIN. For a
stream a FIN may be a half-close from a client that still reads, so the watcher
probes instead (SSE comments: a dead peer fails the second write, a live one skips
them). Either way the call is told once, through ``on_gone``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import gevent.socket

from gateway import sse

if TYPE_CHECKING:
    from gateway.adapters.translator import Piece

log = logging.getLogger(__name__)

_END, _GONE, _PROBE = object(), object(), object()


@dataclass(frozen=True)
class Pace:
    """How the client side keeps time (HEARTBEAT_INTERVAL, PROBE_INTERVAL, CLIENT_WRITE_TIMEOUT)."""

    heartbeat: float  # idle seconds before a keep-alive comment
    probe_interval: float  # after a FIN on a stream
    write_timeout: float  # a client that stops reading is dropped after this


class Downstream:
    """One call's client: what it still has to be sent, and whether it is still there."""

    def __init__(
        self, sock: socket.socket | None, stream: bool, pace: Pace, on_gone: Callable[[str], None]
    ) -> None:
        self.sock, self.stream, self.pace = sock, stream, pace
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.gone = gevent.event.Event()
        self.events = 0  # SSE events written to the client
        self.chars = 0  # characters of answer text written to the client
        self._settled = gevent.event.Event()  # the body has ended, or nobody may wait for it
        self._on_gone = on_gone
        self._watcher: gevent.Greenlet | None = None

    def put(self, piece: Piece) -> None:
        """Queue a piece for the client; dropped once it has left."""
        if piece.data and not self.gone.is_set():
            self.queue.put(piece)

    def end(self) -> None:
        """Nothing more will come: the body finishes once the queue is sent."""
        self.queue.put(_END)

    def left(self, how: str) -> None:
        """The client is gone: stop sending, and tell the call (once)."""
        if self.gone.is_set():
            return
        self.gone.set()
        self.queue.put(_GONE)
        self._on_gone(how)

    def delivery(self) -> tuple[int, int]:
        """Wait while the client's copy is being written; (events, characters) it got.

        Ends when the body has written everything, the client left, ``hurry`` was
        called, or a whole write timeout passed with nothing written (a body nobody
        iterates): whichever comes first.
        """
        patience = self.pace.write_timeout + self.pace.heartbeat
        while not (self._settled.is_set() or self.gone.is_set()):
            before = (self.events, self.chars)
            gevent.wait([self._settled, self.gone], timeout=patience, count=1)
            if (self.events, self.chars) == before:
                break
        return self.events, self.chars

    def hurry(self) -> None:
        """Stop any wait in ``delivery`` now (shutdown): the record says what got there."""
        self._settled.set()

    def start_watching(self, group: gevent.pool.Group) -> None:
        """Watch the socket from a greenlet of ``group`` (no socket: nothing to watch)."""
        if self.sock is not None:
            self._watcher = group.spawn(self._watch)
            self._watcher.link_exception(_log_death)

    def stop_watching(self) -> None:
        """Kill the watcher: with keep-alive, the socket's next bytes are gunicorn's."""
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None

    def _watch(self) -> None:
        sock = self.sock
        try:
            gevent.socket.wait_read(sock.fileno())
            if sock.recv(1, socket.MSG_PEEK):
                return  # the client sent more (pipelining): nothing to learn here
            reset = False
        except OSError:
            reset = True
        if self.stream and not reset:
            while not self.gone.is_set():
                self.queue.put(_PROBE)
                gevent.sleep(self.pace.probe_interval)
            return
        self.left("connection reset" if reset else "connection closed")

    def body(self) -> Iterator[bytes]:
        """The streaming response body; a failed write means the client left."""
        if self.sock is not None:
            self.sock.settimeout(self.pace.write_timeout)
        delivered = False
        try:
            while True:
                try:
                    item = self.queue.get(timeout=self.pace.heartbeat)
                except gevent.queue.Empty:
                    yield sse.comment("keep-alive")
                    continue
                if item is _END or item is _GONE:
                    delivered = item is _END
                    return
                if item is _PROBE:
                    yield sse.comment("probe")
                    continue
                yield item.data
                # Back here: gunicorn wrote it (a failed write closes this generator).
                self.events += item.events
                self.chars += len(item.text)
        finally:
            self._settled.set()
            self.stop_watching()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)
            if not delivered:
                self.left("write failed")


def _log_death(greenlet: gevent.Greenlet) -> None:
    log.error("downstream: watcher died", exc_info=greenlet.exc_info)
