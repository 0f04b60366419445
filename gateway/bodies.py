"""An upstream answer's body, read as it arrives: ``Reads``, one ``next()`` a read.

Straight from the connection's buffered reader with ``read1``, so bytes come as the
upstream sends them: chunked (``chunked``), of a known length, or up to the
connection's close; gzip or deflate decoded (``decoding``). A chunked body's reads are
timed by one ``_Watchdog`` timer, not a gevent ``Timeout`` each; a body can instead be
watched by the hub and read without waiting (``watch``, ``ready``: the relay's way).
Once whole, the connection goes back to its pool (``connections``). Its user is
``upstream``'s ``Response``; a read that fails raises ``UpstreamError`` (``failures``).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
import gevent.ssl

from gateway.chunked import Chunked
from gateway.connections import Connection, Pools
from gateway.decoding import DECODERS, Decoding
from gateway.failures import UpstreamError, read_failed
from gateway.http11 import Head

READ_SIZE = 64 * 1024


class Reads:
    """A body's bytes as they arrive, one ``next()`` a read (b"" once the body is whole).

    Raises ``UpstreamError`` if a read fails. Read straight from the answer's buffered
    reader: chunked (``Chunked``), of a known length, or up to the connection's close;
    gzip or deflate decoded (``Decoding``) where the upstream encoded it. Once the body
    is whole, its connection goes back to the pool (unless the answer said it closes);
    a body not read to its end takes its connection with it (``close``).

    An object and plain method calls, not a stack of generators: a stream's producer
    waits in ``next`` for most of its life, and gevent keeps a copy of a waiting
    greenlet's C stack, where each generator resumed on the way down is a frame of the
    interpreter's (about 600 bytes each; four were, for an open stream).
    """

    __slots__ = (
        "_body",
        "_conn",
        "_decoding",
        "_fp",
        "_fresh",
        "_left",
        "_pools",
        "_raw",
        "_read",
        "_readable",
        "_ready",
        "_reuse",
        "_seconds",
        "_sock",
        "_tls",
        "_watchdog",
        "_woken",
    )

    def __init__(self, conn: Connection | None, head: Head, fp: Any, pools: Pools | None) -> None:
        self._conn, self._fp, self._pools = conn, fp, pools
        self._reuse = not head.closes
        self._watchdog: _Watchdog | None = None
        self._readable: Any = None  # the hub's watch on the socket, once ``watch``ed
        self._ready: Callable[[], bytes | None] | None = None  # a read that never waits
        self._fresh = False  # bytes may have come that no read took yet (``_take``)
        self._sock = sock = conn.sock if conn is not None else None
        self._seconds = sock.gettimeout() if sock is not None else None
        coding = head.headers.get("Content-Encoding", "identity").strip().lower()
        self._decoding = Decoding(coding) if coding in DECODERS else None
        if head.chunked:
            # A chunked body's reads are timed by one ``_Watchdog`` in place of the
            # socket's own timeout (a stream's reads wait, and each wait would start a
            # timer).
            self._body = Chunked()
            if self._seconds:
                current = gevent.getcurrent()
                self._watchdog = _Watchdog(
                    self._seconds, lambda: current.throw(TimeoutError("timed out"))
                )
                sock.settimeout(None)
            self._raw: Callable[[], bytes] = self._chunk
            self._ready = self._chunk_ready
        elif head.length is not None:
            self._left = head.length
            self._raw = self._sized
            self._ready = self._sized_ready
        else:
            self._raw = self._until_close
        self._read = self._raw
        if self._decoding is not None:  # read through the decoder, always waiting
            self._read, self._ready = self._decoded, None

    def next(self) -> bytes:
        """The next bytes of the body, waiting for them; b"" once it is whole."""
        try:
            return self._read()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, (OSError, ValueError)):
                raise read_failed(exc) from exc
            raise

    def close(self) -> None:
        """No more reads; a connection not back in its pool (mid-body) is dropped."""
        self.stop()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._fp.close()
            conn.close()

    def watch(self, woken: Callable[[], None]) -> bool:
        """Read without waiting from now on (``ready``), if this body can be: chunked or
        of a known length, over a socket of gevent's (plain or TLS) that the hub can
        watch. ``woken`` is called, in the hub, when bytes may have come after ``expect``,
        or when none came for the read timeout (``ready`` then raises it).
        """
        sock = getattr(self, "_sock", None)
        if (
            self._ready is None
            or self._read is _ended
            or not isinstance(sock, gevent.socket.socket)
        ):
            return False
        self._woken = woken
        self._fresh = True  # the reader's buffer may hold bytes already
        self._tls = isinstance(sock, gevent.ssl.SSLSocket)
        if self._watchdog is not None:  # a chunked body's: its timer goes on
            self._watchdog.expire = self._expired
        elif self._seconds:  # a sized body's reads waited with the socket's own timeout
            self._watchdog = _Watchdog(self._seconds, self._expired)
        sock.settimeout(0.0)  # a read that would wait raises now
        self._readable = gevent.get_hub().loop.io(sock.fileno(), 1)
        self._read = self._watched
        return True

    def release(self, within: float) -> None:
        """Read to the body's end without waiting, for ``within`` seconds at most, then
        close (``Response.release``); only once ``watch`` said yes."""
        assert self._readable is not None, "release a watched body"
        timer = gevent.get_hub().loop.timer(within)

        def done() -> None:
            timer.close()
            self.close()  # nothing if the body ended: its connection is back in the pool

        def woken() -> None:  # in the hub, in place of the watcher's
            try:
                while data := self.ready():
                    pass
            except UpstreamError:
                data = b""
            if data is None:
                self.expect()
            else:
                done()

        self._woken = woken
        timer.start(done)
        woken()

    def expect(self) -> None:
        """Have ``woken`` called once the socket is readable (or the read timeout passed)."""
        if self._watchdog is not None:
            self._watchdog.since = time.monotonic()
        self._readable.start(self._readable_now)

    def unexpect(self) -> None:
        """No call of ``woken`` for the latest ``expect``."""
        if self._readable is not None:
            self._readable.stop()
        if self._watchdog is not None:
            self._watchdog.since = None

    def ready(self) -> bytes | None:
        """The next bytes of the body if some have come, without waiting: None if none
        have, b"" once it is whole. Only once ``watch`` said yes; raises as ``next``."""
        try:
            return self._ready()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None  # TLS: a record not whole yet
        except BaseException as exc:
            self.stop()
            if isinstance(exc, (OSError, ValueError)):
                raise read_failed(exc) from exc
            raise

    def stop(self) -> None:
        """No more reads: the watchdog's timer goes, the socket's own timeout is back."""
        if self._read is _ended:
            return  # once: the connection may be another request's by now
        self._read = self._ready = _ended
        # The socket's timeout was changed only for a watchdog's reads or a watched body.
        retimed = self._watchdog is not None or self._readable is not None
        if self._readable is not None:
            self._readable.close()
            self._readable = None
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        if retimed:
            self._sock.settimeout(self._seconds)

    def _readable_now(self) -> None:
        # In the hub: one wake-up per expect.
        self._readable.stop()
        self._fresh = True
        if self._watchdog is not None:
            self._watchdog.since = None
        self._woken()

    def _expired(self) -> None:
        # In the hub: no byte for the read timeout. The next ``ready`` raises it.
        self._readable.stop()
        self._ready = _timed_out
        self._woken()

    def _watched(self) -> bytes:
        raise RuntimeError("a watched body is read with ready(), never waiting")

    def _chunk(self) -> bytes:
        body, fp, watchdog = self._body, self._fp, self._watchdog
        while not body.done:
            if watchdog is not None:
                watchdog.since = time.monotonic()
            # Wait in the reader's own buffer: read1 would make its READ_SIZE bytes object
            # before it waits, and an open stream waits most of its life.
            fp.peek(1)
            data = fp.read1(READ_SIZE)
            if watchdog is not None:
                watchdog.since = None
            if not data:
                body.ended()
                break
            if data := body.feed(data):
                return data
        self._whole()
        return b""

    def _chunk_ready(self) -> bytes | None:
        body = self._body
        while not body.done:
            data = self._take(READ_SIZE)
            if data is None:
                return None
            if not data:
                body.ended()  # raises: closed before the last chunk
            elif data := body.feed(data):
                return data
        self._whole()
        return b""

    def _sized_ready(self) -> bytes | None:
        if not self._left:
            self._whole()
            return b""
        data = self._take(min(READ_SIZE, self._left))
        if not data:
            if data is None:
                return None
            raise ValueError(f"the connection closed {self._left} bytes before the body's end")
        self._left -= len(data)
        return data

    def _take(self, size: int) -> bytes | None:
        """What has come, without waiting: None if nothing has, b"" if the upstream closed.

        A read that took something leaves nothing behind (the reader's buffer is
        emptied, and TLS is asked for decrypted bytes it holds), so the next read waits
        for the hub to say the socket is readable rather than ask it (a system call a
        piece). A read that finds nothing then asks whether the upstream closed: a
        plain socket's reader says b"" for both (TLS raises for nothing yet).
        """
        if not self._fresh:
            return None
        data = self._fp.read1(size)
        if data:
            self._fresh = self._tls and self._sock.pending() > 0
            return data
        self._fresh = False
        if self._tls:
            return b""
        try:
            return b"" if not self._sock.recv(1, socket.MSG_PEEK) else None
        except BlockingIOError:
            return None

    def _sized(self) -> bytes:
        if not self._left:
            self._whole()
            return b""
        data = self._fp.read1(min(READ_SIZE, self._left))
        if not data:
            raise ValueError(f"the connection closed {self._left} bytes before the body's end")
        self._left -= len(data)
        return data

    def _until_close(self) -> bytes:
        data = self._fp.read1(READ_SIZE)
        if not data:
            self._whole()  # the answer said it closes: the connection goes with it
        return data

    def _whole(self) -> None:
        """The body is read: the connection goes back to its pool, unless it closes."""
        self.stop()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._fp.close()
        if self._reuse:
            self._pools.give_back(conn)  # type: ignore[union-attr]
        else:
            conn.close()

    def _decoded(self) -> bytes:
        decoding = self._decoding
        while data := self._raw():
            if data := decoding.feed(data):  # type: ignore[union-attr]
                return data
        return decoding.flush()  # type: ignore[union-attr]


def _ended() -> bytes:
    return b""


def _timed_out() -> bytes:
    raise TimeoutError("timed out")


class _Watchdog:
    """A read timeout for one body's reads, kept by one timer (issue 11).

    gevent's socket starts and closes a ``Timeout`` (a timer) for each read that waits:
    4% of a stream's worker CPU. Here the socket waits without one; a read marks when
    it began (``since``), and a single timer checks, when it fires, how long the read in
    progress has waited. Past ``seconds``, it calls ``expire``, in the hub: for a
    greenlet's reads, a throw of ``TimeoutError`` (the socket's own) into the greenlet,
    as gevent's ``Timeout`` does (a read waits in the hub, so nothing else can be
    running that greenlet then); for a watched body, a wake-up whose read raises it.
    Otherwise the timer is set again, for when that read (or, between reads, a read
    starting now) would time out.
    """

    __slots__ = ("_seconds", "_timer", "expire", "since")

    def __init__(self, seconds: float, expire: Callable[[], None]) -> None:
        self.expire = expire  # called in the hub
        self._seconds = seconds
        self._timer: Any = None
        self.since: float | None = None  # when the read in progress began
        self._arm(seconds)

    def _arm(self, after: float) -> None:
        self._timer = gevent.get_hub().loop.timer(after)
        self._timer.start(self._fire)

    def _fire(self) -> None:
        self._timer.close()
        since = self.since
        left = self._seconds if since is None else since + self._seconds - time.monotonic()
        if left > 0:
            self._arm(left)
        else:
            self._timer = None
            self.expire()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
