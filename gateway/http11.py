"""HTTP/1.1 message heads for the upstream wire: a URL's route, a request's head
written, an answer's head read. Pure: bytes and file-like readers in, values out; the
sockets are ``connections``'.

What urllib3 and http.client did with heads, the way they did it, and cheaper:

- a URL becomes a route: its origin (with the environment's proxy, if one), the request
  target (percent-encoded where urllib3 encoded it; the whole URL for a forward proxy)
  and the Host header (an internationalised name IDNA-encoded);
- a request's head: header names and values checked as http.client checks them (a line
  break or a character outside Latin-1 is refused), Host and Content-Length its own;
- an answer's status line and header lines read within http.client's limits (65,536
  bytes a line, 100 lines; at most ``MAX_INTERIM`` 1xx answers before it); plain
  ``Name: value`` lines split here, anything else (a folded line, say) read by the
  email parser as http.client read it; and its framing (RFC 9112, 6.3): chunked, of a
  known length, or ended by the connection's close, and whether the connection is kept.

A head that is not HTTP/1.x raises ``BadAnswer``; a URL or header that cannot be sent,
``InvalidRequest``.
"""

from __future__ import annotations

import base64
import email.parser
import http.client
import re
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

MAX_LINE = 65536  # http.client's: a longer status or header line is refused
MAX_HEADERS = 100  # http.client's: more header lines are refused
MAX_INTERIM = 10  # 1xx answers before the answer; more are refused
USER_AGENT = "llm-gateway"  # sent when the caller's client named none
DEFAULT_PORTS = {"http": 80, "https": 443}
# What a request target keeps as it is (RFC 3986's reserved and unreserved characters,
# and "%" of escapes already made); anything else is percent-encoded (UTF-8), as
# urllib3 encodes it.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~-._"


class BadAnswer(OSError):
    """What came back is not an HTTP/1.x answer's head."""


class InvalidRequest(ValueError):
    """A URL or a header that cannot be sent."""


class Route(NamedTuple):
    """Where one URL's requests go: the pool's key, and what the request line names."""

    key: tuple[str, str, int, str | None]  # scheme, host, port, proxy URL
    target: str  # the request target: a path, or the whole URL to a forward proxy
    host: str  # the Host header
    proxy_headers: tuple[tuple[str, str], ...]  # sent to a forward proxy with each request


def route(url: str, proxy: str | None) -> Route:
    """The route of ``url``, through ``proxy`` if one (an ``http(s)://`` URL) is given."""
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname
    if scheme not in DEFAULT_PORTS or not host:
        raise InvalidRequest(f"cannot send to {url!r}: not an http(s) URL with a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # an internationalised name
    except (ValueError, UnicodeError) as exc:
        raise InvalidRequest(f"cannot send to {url!r}: {exc}") from exc
    named = bracketed(host)
    host_header = named if port == DEFAULT_PORTS[scheme] else f"{named}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = quote(target, safe=_TARGET_SAFE)
    forwarded: tuple[tuple[str, str], ...] = ()
    if proxy is not None:
        if "://" not in proxy:
            proxy = f"http://{proxy}"  # as requests reads HTTPS_PROXY=host:port
        proxy_parts = urlsplit(proxy)
        if proxy_parts.scheme not in DEFAULT_PORTS or not proxy_parts.hostname:
            raise InvalidRequest(f"cannot use the proxy {proxy!r}: not an http(s) URL")
        if scheme == "http":  # sent whole to the proxy, which forwards it
            target = f"http://{host_header}{target}"
            forwarded = proxy_auth(proxy)
    return Route((scheme, host, port, proxy), target, host_header, forwarded)


def bracketed(host: str) -> str:
    """A host as a URL or a Host header names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def proxy_auth(proxy: str) -> tuple[tuple[str, str], ...]:
    """The proxy's credentials, given in its URL as requests takes them."""
    parts = urlsplit(proxy)
    if not parts.username:
        return ()
    basic = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return (("Proxy-Authorization", "Basic " + base64.b64encode(basic).decode()),)


# http.client's own checks of what may be written in a header line.
_legal_header_name = http.client._is_legal_header_name  # type: ignore[attr-defined]
_illegal_header_value = http.client._is_illegal_header_value  # type: ignore[attr-defined]
# Headers the head writes itself; a caller's own are dropped.
_OWN = frozenset({"host", "content-length", "transfer-encoding"})


def request_head(method: str, way: Route, headers: dict[str, str], body: bytes | None) -> bytes:
    """A request's head: its line, Host, the headers in order, User-Agent unless given,
    and Content-Length (0 for a POST without a body, none for a GET without one).
    Raises ``InvalidRequest`` for a header http.client would refuse to write."""
    lines = [f"{method} {way.target} HTTP/1.1\r\nHost: {way.host}".encode("latin-1")]
    agent = False
    for name, value in (*headers.items(), *way.proxy_headers):
        lower = name.lower()
        if lower in _OWN:
            continue
        agent = agent or lower == "user-agent"
        try:
            line = name.encode("ascii"), value.encode("latin-1")
        except (UnicodeEncodeError, AttributeError) as exc:
            raise InvalidRequest(f"cannot send the header {name!r}: {exc}") from exc
        if not _legal_header_name(line[0]):
            raise InvalidRequest(f"invalid header name {name!r}")
        if _illegal_header_value(line[1]):
            raise InvalidRequest(f"invalid header value for {name!r}")
        lines.append(line[0] + b": " + line[1])
    if not agent:
        lines.append(b"User-Agent: " + USER_AGENT.encode())
    if body is not None or method == "POST":
        lines.append(b"Content-Length: %d" % len(body or b""))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class Headers:
    """An answer's header lines in order; names looked up in any case, as
    ``HTTPHeaderDict`` does (the values of a repeated name joined with ", ")."""

    __slots__ = ("_index", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        index: dict[str, str] = {}
        for name, value in items:
            lower = name.lower()
            held = index.get(lower)
            index[lower] = value if held is None else f"{held}, {value}"
        self._index = index

    def get(self, name: str, default: Any = None) -> Any:
        return self._index.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# A header line as the email parser would read it into exactly (name, value) and nothing
# else: a name of visible characters but ":", a value of visible ASCII, spaces and tabs
# (its leading ones dropped, trailing ones kept, as compat32 does), and no line break
# the parser would split on (a lone CR, NEL, VT, FF...).
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*([\t\x20-\x7e]*)\r?\n")


def read_headers(fp: Any) -> Headers:
    """The header lines up to the blank one, as the email parser reads them (what
    http.client and urllib3 read them through), without it for plain lines."""
    lines = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise BadAnswer("a header line longer than 65536 bytes")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise BadAnswer(f"more than {MAX_HEADERS} header lines")
        if line in (b"\r\n", b"\n", b""):
            break
    fields = []
    for line in lines[:-1]:
        found = _HEADER_LINE.fullmatch(line)
        if found is None:
            text = b"".join(lines).decode("iso-8859-1")
            return Headers(email.parser.Parser().parsestr(text, headersonly=True).items())
        name, value = found.groups()
        fields.append((name.decode("ascii"), value.decode("ascii")))
    return Headers(fields)


class Head(NamedTuple):
    """An answer's status and headers, and how its body is framed."""

    status: int
    headers: Headers
    chunked: bool
    length: int | None  # None: the body ends when the connection does (or chunked)
    closes: bool  # the connection is not to be used again after this answer


def read_head(fp: Any, method: str) -> Head:
    """The status line and headers of the answer (past any 1xx), and its framing
    (RFC 9112, 6.3). Raises ``BadAnswer`` for what is not HTTP/1.x, ``OSError`` if the
    connection closed before the status line."""
    for _ in range(MAX_INTERIM + 1):
        line = fp.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionResetError("the upstream closed the connection without answering")
        if len(line) > MAX_LINE:
            raise BadAnswer("a status line longer than 65536 bytes")
        # Read as http.client reads it: "HTTP/1.x", a status of three digits, a reason.
        version, code, *_ = [*line.split(None, 2), b"", b""]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise BadAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
        status = int(code)
        headers = read_headers(fp)
        if not 100 <= status < 200 or status == 101:
            break  # 1xx (100 Continue, 103 Early Hints): the answer is still to come
    else:
        raise BadAnswer(f"more than {MAX_INTERIM} interim (1xx) answers")
    closes = "close" in (headers.get("Connection") or "").lower()
    if version == b"HTTP/1.0":  # closes unless it says it keeps the connection
        closes = closes or (
            "keep-alive" not in (headers.get("Connection") or "").lower()
            and "Keep-Alive" not in headers
        )
    if method == "HEAD" or status in (204, 304) or status < 200:
        return Head(status, headers, False, 0, closes)
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
        return Head(status, headers, chunked, None, closes or not chunked)
    length = headers.get("Content-Length")
    if length is None:
        return Head(status, headers, False, None, True)
    sizes = {size.strip() for size in length.split(",")}
    if len(sizes) != 1 or not ((size := sizes.pop()).isascii() and size.isdigit()):
        raise BadAnswer(f"an invalid Content-Length: {length!r}")
    return Head(status, headers, False, int(size), closes)


# The OS's own poll, not gevent's: asked with no timeout it never blocks, and gevent's
