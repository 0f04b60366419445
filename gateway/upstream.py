"""The wire to providers: where to send, how to authenticate, how to read. The only importer of requests.

``endpoint`` gives the URL and auth headers of an operation per provider type. One
``requests.Session`` per worker with a pool big enough for many concurrent streams, no
automatic retries (failover is ``routing``'s job), no cookies (one session serves every
user). Bodies are read with ``raw.read1`` so bytes arrive as the upstream sends them,
chunked or close-delimited; a ``Response`` reads them as SSE events (up to the first one
before it answers) or as one JSON answer. Every failure becomes an ``UpstreamError`` that
says whether another try could help.
"""

from __future__ import annotations

import functools
import http.cookiejar
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3.exceptions
from flask import Flask
from requests.adapters import HTTPAdapter

from gateway import sse
from gateway.adapters import PROVIDER_PROTOCOLS
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES

T = TypeVar("T")

MAX_ERROR_BODY = 256 * 1024
MAX_BODY = 256 * 1024 * 1024  # a non-streaming answer bigger than this is a lie
READ_SIZE = 64 * 1024
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


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie, request):  # type: ignore[no-untyped-def]
        return False


class Upstream:
    """The worker's HTTP client for providers."""

    def __init__(self) -> None:
        self.session: requests.Session | None = None
        self._timeout: tuple[float, float] | None = None  # connect, read

    def init_app(self, app: Flask) -> None:
        """Build the session from the app's settings."""
        self._timeout = (float(app.config["CONNECT_TIMEOUT"]), float(app.config["READ_TIMEOUT"]))
        pool = int(app.config["UPSTREAM_POOL_SIZE"])
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=32, pool_maxsize=pool, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.cookies.set_policy(_NoCookies())
        # Proxy settings come from the environment (HTTPS_PROXY, NO_PROXY...) as usual,
        # but are resolved once per upstream host, not re-read on every call.
        session.trust_env = False
        self.session = session

    def post(self, url: str, headers: dict[str, str], body: bytes, *, stream: bool) -> Response:
        """Send a request; return once the status line and headers are in."""
        headers = {"Content-Type": "application/json", **headers}
        if stream:
            # Compression would make the upstream (or us) buffer tokens.
            headers["Accept-Encoding"] = "identity"
        return self._send("POST", url, headers, body)

    def get(self, url: str, headers: dict[str, str]) -> Response:
        """A GET (provider tests, remote model lists)."""
        return self._send("GET", url, headers, None)

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Response:
        assert self.session is not None, "upstream.init_app was not called"
        try:
            resp = self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                stream=True,
                timeout=self._timeout,
                allow_redirects=False,
                proxies=_proxies_for(*_origin(url)),
            )
        except requests.ConnectTimeout as exc:
            raise UpstreamError("timeout", f"connect timed out: {exc}") from exc
        except requests.ReadTimeout as exc:
            raise UpstreamError("timeout", "no response headers before the read timeout") from exc
        except requests.ConnectionError as exc:
            raise UpstreamError(_connection_kind(exc), str(exc)) from exc
        except requests.RequestException as exc:
            raise UpstreamError("invalid", str(exc)) from exc
        response = Response(resp)
        if resp.status_code >= 400:
            content = response.read(MAX_ERROR_BODY, truncate=True)
            response.close()
            raise UpstreamError(
                "http",
                f"upstream answered {resp.status_code}",
                status=resp.status_code,
                content=content,
                content_type=resp.headers.get("Content-Type"),
                request_id=response.request_id,
            )
        return response


class Response:
    """An upstream answer whose body has not been read yet."""

    def __init__(self, resp: requests.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers = resp.headers

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def request_id(self) -> str | None:
        """The provider's id of this request (``REQUEST_ID_HEADERS``), if it sent one."""
        return next(filter(None, map(self.headers.get, REQUEST_ID_HEADERS)), None)

    def chunks(self) -> Iterator[bytes]:
        """Body bytes as they arrive; raises UpstreamError if the read fails."""
        raw = self._resp.raw
        while True:
            try:
                data = raw.read1(READ_SIZE, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise UpstreamError(
                    "timeout", "upstream went silent past the read timeout"
                ) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise UpstreamError("reset", f"upstream connection broke: {exc}") from exc
            if not data:
                return
            yield data

    def events(self, accepts: Callable[[str], bool]) -> Iterator[sse.Event]:
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
        chunks = self.chunks()
        for chunk in chunks:
            first.extend(decoder.feed(chunk))
            if any(event.data is not None for event in first):
                return _events(first, decoder, chunks)
        raise UpstreamError("protocol", "upstream ended the stream before its first event")

    def answer(self, parse: Callable[[Any], T]) -> tuple[bytes, T]:
        """The whole body and ``parse`` of its JSON; ``protocol`` if either fails."""
        content = self.read()
        try:
            return content, parse(json.loads(content))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("protocol", f"upstream sent an unusable answer: {exc!r}") from exc

    def read(self, limit: int = MAX_BODY, *, truncate: bool = False) -> bytes:
        """The whole body; past ``limit`` bytes, cut it short or refuse it."""
        parts, size = [], 0
        for chunk in self.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                if truncate:
                    return b"".join(parts)[:limit]
                raise UpstreamError("protocol", f"upstream body larger than {limit} bytes")
        return b"".join(parts)

    def close(self) -> None:
        """Drop the connection (it cannot be reused mid-body)."""
        self._resp.close()


def _events(
    first: list[sse.Event], decoder: sse.Decoder, chunks: Iterator[bytes]
) -> Iterator[sse.Event]:
    yield from first
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


@functools.lru_cache(maxsize=512)
def _proxies_for(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxy for this origin (honouring NO_PROXY), looked up once."""
    return requests.utils.get_environ_proxies(f"{scheme}://{netloc}/")


def _connection_kind(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Read timed out" in text:
        return "timeout"
    if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ProtocolError):
        return "reset"
    return "connect"


upstream = Upstream()
