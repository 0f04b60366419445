"""The wire to providers: where to send, how to authenticate, how to read; the only owner
of upstream HTTP.

``endpoint`` gives the URL and auth headers of an operation per provider type. The
connections are ``connections``' and their heads ``http11``'s (our own HTTP/1.1
client: pools of kept-alive connections per origin, big enough for many concurrent
streams), with no automatic retries (failover is ``routing``'s job), no redirects, TLS
verified against certifi's CA bundle, and no cookies; requests is kept for what it does
once per upstream host, reading the proxy settings of the environment. Bodies are read
with ``read1`` so bytes arrive as the upstream sends them, chunked, sized or
close-delimited; a ``Response`` reads them as SSE events (up to the first one before it
answers) or as one JSON answer. Every failure becomes an ``UpstreamError`` that says
whether another try could help.
"""

from __future__ import annotations

import functools
import io
import socket
import ssl
import time
import zlib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import gevent
import gevent.socket
import gevent.ssl
import requests.utils
from flask import Flask

from gateway import http11, jsoncodec, sse
from gateway.adapters import PROVIDER_PROTOCOLS, wire
from gateway.chunked import Chunked
from gateway.connections import Connection, Pools
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.http11 import Head, Route

T = TypeVar("T")

MAX_ERROR_BODY = 256 * 1024
MAX_BODY = 256 * 1024 * 1024  # a non-streaming answer bigger than this is a lie
# Nor can one event of a stream be bigger than a whole answer. Unbounded, an upstream
# that never ends its event (a 200 event-stream of something else) fills the worker.
MAX_EVENT = MAX_BODY
READ_SIZE = 64 * 1024
# A stream's reader buffer: an open stream waits most of its life, holding it, and an
# event is a few hundred bytes. 8 KB (io's default, which a JSON answer keeps) cost an
# open stream about 2.7 KB more of touched memory (issue 11).
STREAM_READ_BUFFER = 1024
# A stream's opening events held back before its answer opens (``Response.events``):
# past this many, or an event arriving this many seconds after the first held one,
# opens it. An upstream slow to its first content (Anthropic pings meanwhile), or one
# that sends keep-alives and pings without end, has the client's status and headers
# (and the events held) go out then, as they did before anything was held: a client or
# proxy timing out an idle connection sees bytes, and what is held stays small.
HELD_EVENTS = 64
HELD_SECONDS = 5.0
NUM_POOLS = 32  # upstream hosts kept open at once; and URLs whose pool is remembered
# API versions sent when a provider row names none: the versions the adapters speak.
ANTHROPIC_VERSION = "2023-06-01"
AZURE_API_VERSION = "2024-10-21"

_PATHS = {OPENAI_CHAT: "chat/completions", ANTHROPIC: "messages", OPENAI_RESPONSES: "responses"}
# Where providers put the id their support desk and usage exports know a request by:
# OpenAI (and most compatible servers), Anthropic, Azure, Azure's other services, Bedrock.
REQUEST_ID_HEADERS = (
    "x-request-id",
    "request-id",
    "apim-request-id",
    "x-ms-request-id",
    "x-amzn-requestid",
)


def endpoint(
    provider_type: str,
    base_url: str,
    api_key: str | None,
    api_version: str | None,
    remote_model: str,
    operation: str,
) -> tuple[str, dict[str, str]]:
    """URL and auth headers for ``operation``: ``chat``, ``embeddings`` or ``models``."""
    base = base_url.rstrip("/")
    protocol = PROVIDER_PROTOCOLS[provider_type]
    path = _PATHS[protocol] if operation == "chat" else operation
    headers: dict[str, str] = {}
    if provider_type == "azure":
        if api_key:
            headers["api-key"] = api_key
        query = urlencode({"api-version": api_version or AZURE_API_VERSION})
        resource = base.split("/openai", 1)[0]
        if operation == "models":
            return f"{resource}/openai/models?{query}", headers
        # Deployment URL: {resource}/openai/deployments/{deployment}/{path}?api-version=
        if "/deployments/" not in base:
            base = f"{resource}/openai/deployments/{quote(remote_model, safe='')}"
        return f"{base}/{path}?{query}", headers
    if provider_type == "anthropic":
        # Accept a base URL given with or without its trailing /v1.
        base = base.removesuffix("/v1")
        if api_key:
            headers["x-api-key"] = api_key
        headers["anthropic-version"] = api_version or ANTHROPIC_VERSION
        return f"{base}/v1/{path}", headers
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return f"{base}/{path}", headers


class UpstreamError(Exception):
    """One failed try at an upstream.

    ``kind`` is ``connect``, ``timeout``, ``reset``, ``http``, ``protocol`` (the
    upstream answered 2xx with something unusable) or ``invalid`` (we could not
    even send it); ``retriable`` says whether failing over may help.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        content: bytes = b"",
        content_type: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.content = content
        self.content_type = content_type
        self.request_id = request_id  # the provider's, when it answered at all

    @property
    def retriable(self) -> bool:
        """Connection trouble, timeouts, 429 and 5xx are worth another try (SPEC)."""
        if self.kind == "http":
            return self.status is not None and (self.status == 429 or self.status >= 500)
        return self.kind in ("connect", "timeout", "reset", "protocol")

    def describe(self) -> str:
        """A one-line account for records and logs."""
        if self.kind == "http":
            text = self.content[:500].decode("utf-8", errors="replace")
            return f"HTTP {self.status}: {text}"
        return f"{self.kind}: {self.message}"


class Upstream:
    """The worker's HTTP client for providers."""

    def __init__(self) -> None:
        self._pools: Pools | None = None
        self._routes: dict[str, Route] = {}  # URL -> its route, at most NUM_POOLS

    def init_app(self, app: Flask) -> None:
        """Build the connection pools from the app's settings."""
        if self._pools is not None:
            self._pools.close()
        self._pools = Pools(
            maxsize=int(app.config["UPSTREAM_POOL_SIZE"]),  # past it, open more and close them
            origins=NUM_POOLS,
            connect_timeout=float(app.config["CONNECT_TIMEOUT"]),
            read_timeout=float(app.config["READ_TIMEOUT"]),
        )
        self._routes = {}

    def post(self, url: str, headers: dict[str, str], body: bytes, *, stream: bool) -> Response:
        """Send a request; return once the status line and headers are in."""
        # Compression would make the upstream (or us) buffer tokens.
        encoding = "identity" if stream else "gzip, deflate"
        headers = {"Content-Type": "application/json", "Accept-Encoding": encoding, **headers}
        buffer = STREAM_READ_BUFFER if stream else io.DEFAULT_BUFFER_SIZE
        return self._send("POST", url, headers, body, buffer)

    def get(self, url: str, headers: dict[str, str]) -> Response:
        """A GET (provider tests, remote model lists)."""
        return self._send("GET", url, {"Accept-Encoding": "gzip, deflate", **headers}, None)

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        read_buffer: int = io.DEFAULT_BUFFER_SIZE,
    ) -> Response:
        assert self._pools is not None, "upstream.init_app was not called"
        try:
            way = self._route(url)
            head = http11.request_head(method, way, {"Accept": "*/*", **headers}, body)
        except http11.InvalidRequest as exc:
            raise UpstreamError("invalid", str(exc)) from exc
        try:
            conn = self._pools.take(way)
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"connect timed out: {exc}") from exc
        except OSError as exc:  # refused, unknown host, TLS, the proxy
            raise UpstreamError("connect", str(exc)) from exc
        try:
            conn.send(head + body if body else head)
            # The answer's own reader: what it reads ahead stays with this answer.
            fp = conn.sock.makefile("rb", buffering=read_buffer)
            try:
                answer = http11.read_head(fp, method)
            except BaseException:
                fp.close()
                raise
        except BaseException as exc:
            conn.close()
            if _timed_out_error(exc):
                raise UpstreamError(
                    "timeout", "no response headers before the read timeout"
                ) from exc
            if isinstance(exc, OSError):  # dropped before or in its head, or not HTTP
                raise UpstreamError("reset", str(exc) or type(exc).__name__) from exc
            raise
        response = Response(conn, answer, fp, self._pools)
        if answer.status >= 400:
            content = response.read(MAX_ERROR_BODY, truncate=True)
            response.close()
            raise UpstreamError(
                "http",
                f"upstream answered {answer.status}",
                status=answer.status,
                content=content,
                content_type=answer.headers.get("Content-Type"),
                request_id=response.request_id,
            )
        return response

    def _route(self, url: str) -> Route:
        """Where ``url`` goes: its origin, directly or through the proxy the environment
        names for it. Worked out once per URL (at most ``NUM_POOLS`` are remembered)."""
        way = self._routes.get(url)
        if way is not None:
            return way
        scheme, netloc = _origin(url)
        proxies = _proxies_for(scheme, netloc)
        way = http11.route(url, proxies.get(scheme) or proxies.get("all"))
        if len(self._routes) >= NUM_POOLS:
            self._routes.clear()
        self._routes[url] = way
        return way


class Response:
    """An upstream answer whose body has not been read yet."""

    __slots__ = ("_held", "_reads", "headers", "status")

    def __init__(self, conn: Connection, head: Head, fp: Any, pools: Pools) -> None:
        self.status = head.status
        self.headers = head.headers
        self._held: tuple | None = (conn, head, fp, pools)  # until the body is read
        self._reads: _Reads | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def request_id(self) -> str | None:
        """The provider's id of this request (``REQUEST_ID_HEADERS``), if it sent one."""
        return next(filter(None, map(self.headers.get, REQUEST_ID_HEADERS)), None)

    def body(self) -> _Reads:
        """The body's reads (one reader: a body is read once). Made by the greenlet
        that reads it: a chunked body's read timeout is thrown into that greenlet."""
        if self._reads is None:
            assert self._held is not None, "the answer was closed"
            self._reads = _Reads(*self._held)
            self._held = None
        return self._reads

    def events(
        self,
        accepts: Callable[[str], bool],
        refusal: Callable[[sse.Event], str | None] = lambda event: None,
        preface: Callable[[sse.Event], bool] = wire.blank,
    ) -> Events:
        """The body as SSE events, read up to the first one that opens the answer before
        returning: past keep-alives of blank data, and past what ``preface`` says opens
        the stream with nothing a client could use (Anthropic's ``message_start``, ``ping``),
        at most ``HELD_EVENTS`` of them and for at most ``HELD_SECONDS``.

        Before that event nothing is answered yet, so a body of the wrong type (``accepts``
        says no: an upstream answering JSON to a streaming request), one that carries
        garbage or only comments, or one whose first such event is an error (``refusal``
        says what it said, as for a JSON answer that is one), fails here as ``protocol``
        and can be failed over.
        """
        if not accepts(self.content_type):
            text = self.read(4096, truncate=True).decode("utf-8", "replace")
            raise UpstreamError(
                "protocol",
                f"upstream answered {self.content_type} to a streaming request: {text}",
            )
        decoder = sse.Decoder(MAX_EVENT)
        first: list[sse.Event] = []
        seen = 0  # of ``first``: the events found to be no opening
        held_until = None  # past it (HELD_SECONDS after the first held event), none is held
        reads = self.body()
        try:
            while data := reads.next():
                first.extend(decoder.feed(data))
                for opening in first[seen:]:
                    if held_until is None:
                        held_until = time.monotonic() + HELD_SECONDS
                    if seen < HELD_EVENTS and preface(opening) and time.monotonic() < held_until:
                        seen += 1
                        continue
                    if said := refusal(opening):
                        raise UpstreamError("protocol", said)
                    return Events(first, decoder, reads)
        except sse.TooLarge as exc:
            raise _too_large(exc) from exc
        raise UpstreamError("protocol", "upstream ended the stream before its first event")

    def answer(self, parse: Callable[[Any], T]) -> tuple[bytes, T]:
        """The whole body and ``parse`` of its JSON; ``protocol`` if either fails."""
        content = self.read()
        try:
            return content, parse(jsoncodec.read(content))
        except wire.ErrorAnswer as exc:  # says what the upstream said, in its own words
            raise UpstreamError("protocol", str(exc)) from exc
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than ``json`` reads, not the gateway's fault.
            raise UpstreamError("protocol", f"upstream sent an unusable answer: {exc!r}") from exc

    def read(self, limit: int = MAX_BODY, *, truncate: bool = False) -> bytes:
        """The whole body; past ``limit`` bytes, cut it short or refuse it."""
        parts, size = [], 0
        reads = self.body()
        while data := reads.next():
            parts.append(data)
            size += len(data)
            if size > limit:
                if truncate:
                    return b"".join(parts)[:limit]
                raise UpstreamError("protocol", f"upstream body larger than {limit} bytes")
        return b"".join(parts)

    def release(self, within: float) -> None:
        """The answer is whole (a stream's terminal event came), its body not yet ended:
        give it ``within`` seconds to end, read without waiting (the hub watches), and the
        connection goes back to the pool; past that, or if a read fails, it is dropped.
        What comes meanwhile is nobody's. Only a watched body (``Events.watch``); the
        response is no longer this one's to close."""
        reads, self._reads = self._reads, None
        assert reads is not None, "the body was never read"
        reads.release(within)

    def close(self) -> None:
        """Drop the connection if it is mid-body (a body read to its end went back to the
        pool already)."""
        if self._reads is not None:
            self._reads.close()
        elif self._held is not None:
            conn, _, fp, _ = self._held
            self._held = None
            fp.close()
            conn.close()


class Events:
    """A stream's SSE events as they arrive: ``take`` waits for the next read's.

    Plain method calls, not generators: see ``_Reads``.
    """

    __slots__ = ("_decoder", "_first", "_reads")

    def __init__(self, first: list[sse.Event], decoder: sse.Decoder, reads: _Reads) -> None:
        self._first = first  # the events read before the answer began
        self._decoder: sse.Decoder | None = decoder
        self._reads = reads

    def take(self) -> list[sse.Event]:
        """The events of the next read that completes any; [] once the stream has ended.

        Raises ``UpstreamError`` if the read fails.
        """
        return self._events(self._reads.next)  # type: ignore[return-value]

    def ready(self) -> list[sse.Event] | None:
        """``take`` without waiting: the events of what has come, None if nothing has
        (``expect`` says when something may have), [] once the stream has ended.

        Only once ``watch`` said yes. Raises ``UpstreamError`` if a read fails.
        """
        return self._events(self._reads.ready)

    def _events(self, read: Callable[[], bytes | None]) -> list[sse.Event] | None:
        """The events of the reads up to one that completes any; None if a read found
        nothing yet (``ready``'s reads only), [] once the stream has ended."""
        if self._first:
            # Not kept for the rest of the stream (a KB of an open stream's memory).
            first, self._first = self._first, []
            return first
        decoder = self._decoder
        if decoder is None:
            return []
        try:
            while data := read():
                if events := decoder.feed(data):
                    return events
        except sse.TooLarge as exc:
            raise _too_large(exc) from exc
        if data is None:
            return None
        self._decoder = None
        return decoder.flush()

    def watch(self, woken: Callable[[], None]) -> bool:
        """Read without waiting from now on, if this body can be (``_Reads.watch``)."""
        return self._reads.watch(woken)

    def expect(self) -> None:
        """Call ``woken`` once more bytes may have come (or none came in time)."""
        self._reads.expect()

    def unexpect(self) -> None:
        """``woken`` is not to be called for the latest ``expect`` after all."""
        self._reads.unexpect()


def _too_large(exc: sse.TooLarge) -> UpstreamError:
    return UpstreamError("protocol", f"upstream sent {exc} (the bound is {MAX_EVENT})")


class _Reads:
    """A body's bytes as they arrive, one ``next()`` a read (b"" once the body is whole).

    Raises ``UpstreamError`` if a read fails. Read straight from the answer's buffered
    reader: chunked (``Chunked``), of a known length, or up to the connection's close;
    gzip or deflate decoded (``_Decoding``) where the upstream encoded it. Once the body
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
        self._decoding = _Decoding(coding) if coding in _DECODERS else None
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
                raise _read_failed(exc) from exc
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
                raise _read_failed(exc) from exc
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


def _read_failed(exc: BaseException) -> UpstreamError:
    """What a failed read of the body means: a read timeout, or a broken connection."""
    if _timed_out_error(exc):
        return UpstreamError("timeout", "upstream went silent past the read timeout")
    return UpstreamError("reset", f"upstream connection broke: {exc}")


def _timed_out_error(exc: BaseException) -> bool:
    # gevent's TLS socket says it timed out with an SSLError
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, ssl.SSLError) and "operation timed out" in str(exc)
    )


# The codings a body is decoded from, and zlib's window bits for each.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Decoding:
    """A gzip or deflate body decoded as it arrives, as urllib3 decodes one: gzip's
    members one after another, and deflate in zlib's wrapping or, failing that, raw
    (servers send both). Bytes it cannot decode raise ``ValueError``."""

    __slots__ = ("_first", "_kept", "_spent", "_wbits", "_zlib")

    def __init__(self, coding: str) -> None:
        self._wbits = _DECODERS[coding]
        self._zlib = zlib.decompressobj(self._wbits)
        self._first = self._wbits == zlib.MAX_WBITS  # deflate, and nothing decoded yet
        self._kept = b""  # deflate's bytes until one decodes, for a second try as raw
        self._spent = False  # what follows the last whole gzip member is not read

    def feed(self, data: bytes) -> bytes:
        try:
            if self._first:
                self._kept += data
                out = self._zlib.decompress(data)
                if out:
                    self._first, self._kept = False, b""
                return out
            if self._spent:
                return b""
            out = self._zlib.decompress(data)
            while self._wbits > zlib.MAX_WBITS and self._zlib.eof and self._zlib.unused_data:
                rest = self._zlib.unused_data  # another gzip member
                self._zlib = zlib.decompressobj(self._wbits)
                try:
                    out += self._zlib.decompress(rest)
                except zlib.error:  # garbage after a whole member: ignored, as gzip does
                    self._spent = True
                    break
            return out
        except zlib.error as exc:
            if self._first:  # deflate without zlib's wrapping
                self._first, self._wbits = False, -zlib.MAX_WBITS
                self._zlib = zlib.decompressobj(self._wbits)
                kept, self._kept = self._kept, b""
                return self.feed(kept)
            raise ValueError(f"the body could not be decoded: {exc}") from exc

    def flush(self) -> bytes:
        return b"" if self._spent else self._zlib.flush()


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


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


@functools.lru_cache(maxsize=512)
def _proxies_for(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxy for this origin (honouring NO_PROXY), looked up once."""
    return requests.utils.get_environ_proxies(f"{scheme}://{netloc}/")


upstream = Upstream()
