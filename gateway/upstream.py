"""The wire to providers: where to send, how to authenticate, how to read; the only owner
of upstream HTTP.

``endpoint`` gives the URL and auth headers of an operation per provider type. One
urllib3 ``PoolManager`` per worker (and one ``ProxyManager`` per proxy the environment
names) with a pool big enough for many concurrent streams, no automatic retries
(failover is ``routing``'s job), no redirects, TLS verified against certifi's CA bundle
as requests would, and no cookies. urllib3 directly, not a ``requests.Session``: the
Session's per-call preparing, settings merging and response building cost more CPU
than the rest of the wire (issue 11); requests is kept for what it does once per
upstream host, reading the proxy settings. Bodies are read with ``read1`` so bytes
arrive as the upstream sends them, chunked or close-delimited; a ``Response`` reads
them as SSE events (up to the first one before it answers) or as one JSON answer.
Every failure becomes an ``UpstreamError`` that says whether another try could help.
"""

from __future__ import annotations

import email.parser
import functools
import http.client
import io
import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode, urlsplit

import certifi
import gevent
import gevent.pool
import gevent.socket
import gevent.ssl
import requests.utils
import urllib3
import urllib3.exceptions
from flask import Flask
from gevent import monkey
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import SKIP_HEADER, parse_url

from gateway import jsoncodec, sse
from gateway.adapters import PROVIDER_PROTOCOLS
from gateway.chunked import Chunked
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.sockets import send_all

T = TypeVar("T")

MAX_ERROR_BODY = 256 * 1024
MAX_BODY = 256 * 1024 * 1024  # a non-streaming answer bigger than this is a lie
READ_SIZE = 64 * 1024
# A stream's reader buffer: an open stream waits most of its life, holding it, and an
# event is a few hundred bytes. 8 KB (io's default, which a JSON answer keeps) cost an
# open stream about 2.7 KB more of touched memory (issue 11).
STREAM_READ_BUFFER = 1024
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
        self._direct: urllib3.PoolManager | None = None
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._options: dict[str, Any] = {}
        self._routes: dict[str, tuple[HTTPConnectionPool, str]] = {}  # URL -> pool, path

    def init_app(self, app: Flask) -> None:
        """Build the connection pools from the app's settings."""
        http.client.parse_headers = parse_headers  # every message it builds is the same
        self._options = {
            "num_pools": NUM_POOLS,
            "maxsize": int(app.config["UPSTREAM_POOL_SIZE"]),
            "block": False,  # past maxsize, open more and close them after
            "retries": False,  # failover is routing's, and sees every error as it is
            "timeout": urllib3.Timeout(
                connect=float(app.config["CONNECT_TIMEOUT"]), read=float(app.config["READ_TIMEOUT"])
            ),
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": certifi.where(),
        }
        self._direct = urllib3.PoolManager(**self._options)
        self._direct.pool_classes_by_scheme = _POOLS
        self._proxied = {}
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
        headers = {"Accept": "*/*", **headers}
        try:
            sender, target = self._route(url)
            resp = sender.urlopen(
                method,
                target,
                body=body,
                headers=headers,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=True,
                read_buffer=read_buffer,  # for our pools' _make_request
            )
        except urllib3.exceptions.NewConnectionError as exc:  # refused, unknown host
            raise UpstreamError("connect", str(exc)) from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise UpstreamError("timeout", f"connect timed out: {exc}") from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise UpstreamError("timeout", "no response headers before the read timeout") from exc
        except urllib3.exceptions.ProtocolError as exc:  # dropped before or in its headers
            raise UpstreamError("reset", str(exc)) from exc
        except ValueError as exc:  # a URL or header that cannot be sent (LocationValueError)
            raise UpstreamError("invalid", str(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # TLS, the proxy, the pool
            raise UpstreamError("connect", str(exc)) from exc
        response = Response(resp)
        if resp.status >= 400:
            content = response.read(MAX_ERROR_BODY, truncate=True)
            response.close()
            raise UpstreamError(
                "http",
                f"upstream answered {resp.status}",
                status=resp.status,
                content=content,
                content_type=resp.headers.get("Content-Type"),
                request_id=response.request_id,
            )
        return response

    def _route(self, url: str) -> tuple[urllib3.PoolManager | HTTPConnectionPool, str]:
        """Who sends to ``url``, and what it is given: the origin's pool and the path, or a
        proxy's manager and the whole URL.

        A direct URL's pool is remembered, so a call does not parse its URL and build
        the manager's pool key again, as ``PoolManager.urlopen`` does each time (a few
        percent of a call's CPU, issue 11). At most ``NUM_POOLS`` URLs are: past that
        they are forgotten, and a pool neither remembers is dropped, as the manager's own.
        """
        route = self._routes.get(url)
        if route is not None:
            return route
        manager = self._manager(url)
        if manager is not self._direct:
            return manager, url
        parsed = parse_url(url)
        pool = manager.connection_from_host(parsed.host, parsed.port, parsed.scheme)
        if len(self._routes) >= NUM_POOLS:
            self._routes.clear()
        self._routes[url] = route = (pool, parsed.request_uri)
        return route

    def _manager(self, url: str) -> urllib3.PoolManager:
        """The pools for ``url``: direct, or through the proxy the environment names."""
        assert self._direct is not None, "upstream.init_app was not called"
        scheme, netloc = _origin(url)
        proxies = _proxies_for(scheme, netloc)
        proxy = proxies.get(scheme) or proxies.get("all")
        if not proxy:
            return self._direct
        manager = self._proxied.get(proxy)
        if manager is None:
            auth = urlsplit(proxy)
            headers = {}
            if auth.username:  # requests' way: credentials in the proxy's URL
                basic = f"{unquote(auth.username)}:{unquote(auth.password or '')}"
                headers = urllib3.make_headers(proxy_basic_auth=basic)
            manager = urllib3.ProxyManager(proxy, proxy_headers=headers, **self._options)
            manager.pool_classes_by_scheme = _POOLS
            self._proxied[proxy] = manager
        return manager


# The OS's own poll, not gevent's: asked with no timeout it never blocks, and gevent's
# goes through the hub to say the same (about 3% of a call's CPU, issue 11).
_poll = monkey.get_original("select", "poll")


class _Checked:
    """A kept-alive connection checked before reuse as urllib3 checks it, more cheaply."""

    sock: Any

    @property
    def is_connected(self) -> bool:
        """False once the server closed it (or sent bytes nobody asked for): not reused."""
        if self.sock is None:
            return False
        poll = _poll()
        poll.register(self.sock, select.POLLIN)
        return not poll.poll(0)


# http.client's own checks of what may be written in a header line.
_legal_header_name = http.client._is_legal_header_name  # type: ignore[attr-defined]
_illegal_header_value = http.client._is_illegal_header_value  # type: ignore[attr-defined]


class _OneWrite:
    """A connection whose request goes out in one write, head and body together.

    urllib3 writes a request's head (http.client's ``endheaders``), then its body: two
    system calls and two wake-ups of the upstream, each through gevent's ``sendall``
    and the ``getsockopt`` it makes first. Here a body of bytes takes the head along,
    through ``sockets.send_all``; and the head's header lines are written directly.
    """

    sock: Any
    _head: bytes | None = None  # b"" while a request with a body is being written

    def request(self, method, url, body=None, headers=None, **kwargs):  # type: ignore[no-untyped-def]
        self._head = b"" if isinstance(body, bytes) and body else None
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)  # type: ignore[misc]
        finally:
            self._head = None

    def putheader(self, header, *values):  # type: ignore[no-untyped-def]
        """A header line of text, checked and written as http.client does, in a third of
        the time: urllib3's look for its skip marker and http.client's general case
        (several values, bytes, numbers) cost about 2.5 µs a header. Anything else, and
        anything refused, goes through them."""
        if len(values) == 1:
            value = values[0]
            if type(header) is str and type(value) is str and value != SKIP_HEADER:
                name = header.encode("ascii")
                if _legal_header_name(name):
                    data = value.encode("latin-1")
                    if not _illegal_header_value(data):
                        self._buffer.append(name + b": " + data)  # type: ignore[attr-defined]
                        return
        super().putheader(header, *values)  # type: ignore[misc]  # refuses, or the rest

    def send(self, data):  # type: ignore[no-untyped-def]
        head = self._head
        if head == b"":  # the head: it waits for the body
            self._head = data
            return
        if head:
            self._head, data = None, head + data
        if isinstance(data, bytes) and isinstance(self.sock, socket.socket):
            send_all(self.sock, data)
        else:  # no socket yet (http.client connects first), or urllib3's TLS-in-TLS one
            super().send(data)  # type: ignore[misc]


# A header line as the email parser would read it into exactly (name, value) and nothing
# else: a name of visible characters but ":", a value of visible ASCII, spaces and tabs
# (its leading ones dropped, trailing ones kept, as compat32 does), and no line break
# the parser would split on (a lone CR, NEL, VT, FF...).
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*([\t\x20-\x7e]*)\r?\n")


def parse_headers(fp: Any, _class: type = http.client.HTTPMessage) -> Any:
    """``http.client.parse_headers``, without the email parser where it is not needed.

    http.client reads a response's header lines, then has the email package parse
    them: a feed parser, a policy and a buffered line splitter, about 4% of a JSON
    call's CPU (issue 11). A block of plain ``Name: value`` lines (what providers send)
    is built into the same message here, each header stored as the parser would store
    it; anything else (a folded line, a byte the parser would split a line on, a
    multipart or message type whose body it would parse) goes to the email parser.
    """
    lines = http.client._read_headers(fp)
    fields = []
    for line in lines[:-1]:  # the last is the blank line (or nothing: the end)
        found = _HEADER_LINE.fullmatch(line)
        if found is None:
            break
        fields.append(found.groups())
    else:
        msg = _class()
        for name, value in fields:
            msg.set_raw(name.decode("ascii"), value.decode("ascii"))
        if msg.get_content_maintype() not in ("multipart", "message"):
            msg.set_payload("")
            return msg
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=_class).parsestr(text)


class _SizedReads:
    """A connection whose next response reads through a buffer of ``read_buffer`` bytes
    (http.client's takes io's default); the pool sets it for each request."""

    read_buffer = io.DEFAULT_BUFFER_SIZE

    def response_class(self, sock, *args, **kwargs):  # type: ignore[no-untyped-def]
        return http.client.HTTPResponse(_Sized(sock, self.read_buffer), *args, **kwargs)


class _Sized:
    """A socket as http.client's response opens it: its file, buffered as asked."""

    __slots__ = ("buffering", "sock")

    def __init__(self, sock: socket.socket, buffering: int) -> None:
        self.sock, self.buffering = sock, buffering

    def makefile(self, mode: str) -> Any:
        return self.sock.makefile(mode, buffering=self.buffering)


class _ShallowConnect:
    """A connection that connects (resolves, connects, TLS) in a greenlet of its own.

    The way to a new connection (the resolver's thread pool, the TLS handshake) is the
    deepest a call's producer ever goes, and a greenlet keeps every page of Python
    frames it ever touched: a stream's producer held a second 4 KB page for its whole
    life for it (issue 11). The helper's pages go when it ends. Its outcome comes back
    as a value and is raised here: a failed connect is the caller's to report, not the
    hub's; and a caller stopped meanwhile stops the connect.
    """

    def connect(self) -> None:
        helper = _connecting.spawn(_outcome, super().connect)  # type: ignore[misc]
        try:
            _, error = helper.get()
        finally:
            if not helper.dead:
                helper.kill(block=False)
        if error is not None:
            raise error


_connecting = gevent.pool.Group()


def _outcome(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except BaseException as exc:  # given back to the caller, which raises it
        return None, exc


class _HTTPConnection(_Checked, _OneWrite, _SizedReads, _ShallowConnect, HTTPConnection):
    pass


class _HTTPSConnection(_Checked, _OneWrite, _SizedReads, _ShallowConnect, HTTPSConnection):
    pass


class _Sizing:
    """A pool that hands each request's ``read_buffer`` to the connection it uses."""

    def _make_request(self, conn, *args, read_buffer=io.DEFAULT_BUFFER_SIZE, **kwargs):  # type: ignore[no-untyped-def]
        conn.read_buffer = read_buffer
        return super()._make_request(conn, *args, **kwargs)  # type: ignore[misc]


class _HTTPPool(_Sizing, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_Sizing, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class Response:
    """An upstream answer whose body has not been read yet."""

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self._reads: _Reads | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def request_id(self) -> str | None:
        """The provider's id of this request (``REQUEST_ID_HEADERS``), if it sent one."""
        return next(filter(None, map(self.headers.get, REQUEST_ID_HEADERS)), None)

    def body(self) -> _Reads:
        """The body's reads (one reader: a body is read once)."""
        if self._reads is None:
            self._reads = _Reads(self._resp)
        return self._reads

    def events(self, accepts: Callable[[str], bool]) -> Events:
        """The body as SSE events, read up to the first one with data before returning.

        Before that event nothing is answered yet, so a body of the wrong type (``accepts``
        says no: an upstream answering JSON to a streaming request), or one that carries
        garbage or only comments, fails here as ``protocol`` and can be failed over.
        """
        if not accepts(self.content_type):
            text = self.read(4096, truncate=True).decode("utf-8", "replace")
            raise UpstreamError(
                "protocol",
                f"upstream answered {self.content_type} to a streaming request: {text}",
            )
        decoder = sse.Decoder()
        first: list[sse.Event] = []
        reads = self.body()
        while data := reads.next():
            first.extend(decoder.feed(data))
            if any(event.data is not None for event in first):
                return Events(first, decoder, reads)
        raise UpstreamError("protocol", "upstream ended the stream before its first event")

    def answer(self, parse: Callable[[Any], T]) -> tuple[bytes, T]:
        """The whole body and ``parse`` of its JSON; ``protocol`` if either fails."""
        content = self.read()
        try:
            return content, parse(jsoncodec.read(content))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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

    def close(self) -> None:
        """Drop the connection if it is mid-body (a body read to its end went back to the
        pool already), and give its pool slot back."""
        if self._reads is not None:
            self._reads.stop()
        self._resp.close()
        self._resp.release_conn()


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
        while data := read():
            if events := decoder.feed(data):
                return events
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


class _Reads:
    """A body's bytes as they arrive, one ``next()`` a read (b"" once the body is whole).

    Raises ``UpstreamError`` if a read fails. Chunked or of a known length, the body is
    read straight from the connection's buffered reader, as http.client would read it,
    without its and urllib3's layers of calls per read (issue 11); once it is whole, the
    connection goes back to its pool, as urllib3 hands it back. Else (encoded, or
    delimited by the connection's close) urllib3 reads it.

    An object and plain method calls, not a stack of generators: a stream's producer
    waits in ``next`` for most of its life, and gevent keeps a copy of a waiting
    greenlet's C stack, where each generator resumed on the way down is a frame of the
    interpreter's (about 600 bytes each; four were, for an open stream).
    """

    __slots__ = (
        "_body",
        "_fp",
        "_fresh",
        "_left",
        "_message",
        "_read",
        "_readable",
        "_ready",
        "_resp",
        "_seconds",
        "_sock",
        "_tls",
        "_watchdog",
        "_woken",
    )

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp
        self._watchdog: _Watchdog | None = None
        self._readable: Any = None  # the hub's watch on the socket, once ``watch``ed
        self._ready: Callable[[], bytes | None] | None = None  # a read that never waits
        self._fresh = False  # bytes may have come that no read took yet (``_take``)
        message = self._message = _plain(resp)
        if message is None:
            self._read: Callable[[], bytes] = self._decoded
            return
        self._fp = message.fp
        self._sock = sock = getattr(resp.connection, "sock", None)
        self._seconds = sock.gettimeout() if sock is not None else None
        if not message.chunked:
            self._left = message.length
            self._read = self._sized
            self._ready = self._sized_ready
            return
        # A chunked body's reads are timed by one ``_Watchdog`` in place of the socket's
        # own timeout (a stream's reads wait, and each wait would start a timer).
        self._body = Chunked()
        if self._seconds:
            current = gevent.getcurrent()
            self._watchdog = _Watchdog(
                self._seconds, lambda: current.throw(TimeoutError("timed out"))
            )
            sock.settimeout(None)
        self._read = self._chunk
        self._ready = self._chunk_ready

    def next(self) -> bytes:
        """The next bytes of the body, waiting for them; b"" once it is whole."""
        try:
            return self._read()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, ValueError)):
                raise _read_failed(exc) from exc
            raise

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
            if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, ValueError)):
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

    def _whole(self) -> None:
        """The body is read: the connection goes back to its pool."""
        self.stop()
        self._message.close()
        self._resp.release_conn()

    def _decoded(self) -> bytes:
        return self._resp.read1(READ_SIZE, decode_content=True)


def _ended() -> bytes:
    return b""


def _timed_out() -> bytes:
    raise TimeoutError("timed out")


def _read_failed(exc: BaseException) -> UpstreamError:
    """What a failed read of the body means: a read timeout, or a broken connection."""
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) or (
        # gevent's TLS socket says it timed out with an SSLError, as urllib3 knows
        isinstance(exc, ssl.SSLError) and "read operation timed out" in str(exc)
    ):
        return UpstreamError("timeout", "upstream went silent past the read timeout")
    return UpstreamError("reset", f"upstream connection broke: {exc}")


def _plain(resp: urllib3.BaseHTTPResponse) -> http.client.HTTPResponse | None:
    """The http.client response under ``resp`` (not read from yet: a Response reads its
    body once) if its body is ours to read: not encoded, chunked or of a known length;
    else None, and urllib3 reads it."""
    message = getattr(resp, "_fp", None)  # urllib3 2's own name for it
    if not isinstance(message, http.client.HTTPResponse) or message.fp is None:
        return None
    if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    if not message.chunked and message.length is None:
        return None  # delimited by the connection's close: urllib3 knows that case
    return message


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
