"""The wire to providers: where to send, how to authenticate, how to read; the only owner
of upstream HTTP.

``endpoint`` gives the URL and auth headers of an operation per provider type. The
connections are ``connections``' and their heads ``http11``'s (our own HTTP/1.1
client: pools of kept-alive connections per origin, big enough for many concurrent
streams), with no automatic retries (failover is ``routing``'s job), no redirects, TLS
verified against certifi's CA bundle, and no cookies; requests is kept for what it does
once per upstream host, reading the proxy settings of the environment. Bodies are read
by ``bodies`` as the upstream sends them, chunked, sized or close-delimited; a
``Response`` reads them as SSE events (up to the first one before it answers) or as one
JSON answer. Every failure becomes an ``UpstreamError`` (``failures``) that says
whether another try could help.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import requests.utils
from flask import Flask

from gateway import http11, jsoncodec, sse
from gateway.adapters import PROVIDER_PROTOCOLS, wire
from gateway.bodies import Reads
from gateway.connections import Connection, Pools
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.failures import UpstreamError, timed_out_error
from gateway.http11 import Head, Route

T = TypeVar("T")

MAX_ERROR_BODY = 256 * 1024
MAX_BODY = 256 * 1024 * 1024  # a non-streaming answer bigger than this is a lie
# Nor can one event of a stream be bigger than a whole answer. Unbounded, an upstream
# that never ends its event (a 200 event-stream of something else) fills the worker.
MAX_EVENT = MAX_BODY
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
            if timed_out_error(exc):
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
        self._reads: Reads | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def request_id(self) -> str | None:
        """The provider's id of this request (``REQUEST_ID_HEADERS``), if it sent one."""
        return next(filter(None, map(self.headers.get, REQUEST_ID_HEADERS)), None)

    def body(self) -> Reads:
        """The body's reads (one reader: a body is read once). Made by the greenlet
        that reads it: a chunked body's read timeout is thrown into that greenlet."""
        if self._reads is None:
            assert self._held is not None, "the answer was closed"
            self._reads = Reads(*self._held)
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

    Plain method calls, not generators: see ``Reads``.
    """

    __slots__ = ("_decoder", "_first", "_reads")

    def __init__(self, first: list[sse.Event], decoder: sse.Decoder, reads: Reads) -> None:
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
        """Read without waiting from now on, if this body can be (``Reads.watch``)."""
        return self._reads.watch(woken)

    def expect(self) -> None:
        """Call ``woken`` once more bytes may have come (or none came in time)."""
        self._reads.expect()

    def unexpect(self) -> None:
        """``woken`` is not to be called for the latest ``expect`` after all."""
        self._reads.unexpect()


def _too_large(exc: sse.TooLarge) -> UpstreamError:
    return UpstreamError("protocol", f"upstream sent {exc} (the bound is {MAX_EVENT})")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


@functools.lru_cache(maxsize=512)
def _proxies_for(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxy for this origin (honouring NO_PROXY), looked up once."""
    return requests.utils.get_environ_proxies(f"{scheme}://{netloc}/")


upstream = Upstream()
