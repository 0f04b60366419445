"""gunicorn's side of a request, made cheaper for a worker that serves many.

Each piece stands in for gunicorn's own and answers as it would (``install`` puts them
in its place, in a worker after its fork): a response's headers go out with its first
body bytes, in one send where stock gunicorn makes two (``OneSend``), and a stream's
later bytes may skip gunicorn's write path (``framing``: see gateway/downstream.py);
the Date header's string is kept for its second; the base environ is built once per
worker; the trusted-proxy check is kept per peer address; settings are read once
(``SettledConfig``).

Imported by gunicorn's master with ``worker``, before gevent patches anything: nothing
from the gateway is imported here but ``sockets``, which imports nothing.
"""

from __future__ import annotations

import ssl
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gunicorn import util
from gunicorn.http import message, wsgi

from gateway.sockets import send_all

# Seconds a response write may wait for a client that reads nothing (CLIENT_WRITE_TIMEOUT,
# set when the app is loaded): then the client is dropped (``GatewayWorker.handle_request``).
write_timeout: float | None = None

# Each handler greenlet's current response, for ``framing`` (keyed by the greenlet: a
# response holds its socket, and a value that holds its key would keep it forever).
_responses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def framing() -> Callable[[bytes], bytes] | None:
    """How the response this handler greenlet is sending frames body bytes that its app
    writes to the socket itself.

    Only once its headers are out, and only for a body of no stated length: chunked
    (HTTP/1.1), or ended by the close (HTTP/1.0, as nginx proxies by default). None
    otherwise, over TLS (a write that would block there is no plain EAGAIN), or outside
    this worker: the body's bytes then go through gunicorn.
    """
    resp = _responses.get(gevent.getcurrent())
    if resp is None or not resp.headers_sent or resp.response_length is not None:
        return None
    if isinstance(resp.sock, ssl.SSLSocket):  # gevent's, once the worker has patched
        return None
    return resp.frame


class OneSend(wsgi.Response):
    """gunicorn's response, whose headers go out with its first body bytes.

    Stock gunicorn sends the headers, then each body piece: two sends (two syscalls,
    two wake-ups of the peer) for every JSON answer and for a stream's first event.
    Here ``write`` holds the headers back and the body piece takes them along; if
    ``write`` ends with no body to send (an empty piece, a body-less status), the
    headers go out alone, as before.
    """

    _head = b""
    _holding = False

    def __init__(self, req, sock, cfg):  # type: ignore[no-untyped-def]
        super().__init__(req, sock, cfg)
        _responses[gevent.getcurrent()] = self

    def frame(self, data: bytes) -> bytes:
        """``data`` as this body puts it on the wire, counted as sent (the access log's size)."""
        self.sent += len(data)
        return b"%X\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        head = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True
        if self._holding:
            self._head = head
        else:
            util.write(self.sock, head)

    def write(self, arg):  # type: ignore[no-untyped-def]
        with self._bounded():
            self._holding = True
            try:
                super().write(arg)
            finally:
                self._holding = False
                if self._head:  # nothing took them along
                    head, self._head = self._head, b""
                    util.write(self.sock, head)

    def close(self):  # type: ignore[no-untyped-def]
        with self._bounded():  # a chunked body's last chunk is a write too
            super().close()

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        """This response's writes wait at most CLIENT_WRITE_TIMEOUT for a client that
        reads nothing, unless the socket has a timeout already (a stream's body sets it)."""
        if write_timeout is None or self.sock.gettimeout() is not None:
            yield
            return
        self.sock.settimeout(write_timeout)
        try:
            yield
        finally:
            self.sock.settimeout(None)

    def _emit_body(self, data):  # type: ignore[no-untyped-def]
        head, self._head = self._head, b""
        if not head:
            return super()._emit_body(data)
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        send_all(self.sock, head + data)


_gunicorn_http_date = util.http_date
_dated: tuple[int, str] = (0, "")


def _http_date(timestamp: float | None = None) -> str:
    """gunicorn's ``util.http_date``, the string of the current second kept."""
    global _dated
    if timestamp is not None:
        return _gunicorn_http_date(timestamp)
    second = int(time.time())
    if _dated[0] != second:
        _dated = (second, _gunicorn_http_date(second))
    return _dated[1]


class _LiveErrors(wsgi.WSGIErrorsWrapper):
    """``wsgi.errors`` that finds gunicorn's error log streams when written to, so one
    can serve every request: a reopened log (USR1) is followed."""

    def __init__(self, cfg: Any) -> None:  # no streams kept: see ``streams``
        self._cfg = cfg

    @property
    def streams(self) -> list[Any]:  # type: ignore[override]
        return wsgi.WSGIErrorsWrapper(self._cfg).streams


class _Environ:
    """gunicorn's ``base_environ``, built once per worker and copied for each request.

    Stock gunicorn builds it anew (and its ``wsgi.errors`` wrapper, which asks logging
    for the error log's handlers), about 6.6 µs a request; nothing in it changes in a
    worker.
    """

    def __init__(self) -> None:
        self._base: dict[str, Any] | None = None

    def __call__(self, cfg: Any) -> dict[str, Any]:
        if self._base is None:
            self._base = {**_gunicorn_base_environ(cfg), "wsgi.errors": _LiveErrors(cfg)}
        return self._base.copy()


_gunicorn_base_environ = wsgi.base_environ
_gunicorn_peer_trusted = message.HeaderPolicy._peer_is_trusted_proxy
_trusted_peers: dict[str, bool] = {}


def _peer_is_trusted_proxy(self: message.HeaderPolicy) -> bool:
    """gunicorn's ``forwarded_allow_ips`` check, its answer kept per peer address.

    Stock gunicorn parses the peer's address and walks the allowed networks for every
    request (about 8 µs); a worker's settings do not change, so neither does the answer
    for an address. At most 4,096 addresses are kept; past that the check runs anew.
    """
    peer = self.peer_addr
    if not isinstance(peer, tuple):
        return True  # a UNIX socket: gunicorn trusts it
    trusted = _trusted_peers.get(peer[0])
    if trusted is None:
        trusted = _gunicorn_peer_trusted(self)
        if len(_trusted_peers) < 4096:
            _trusted_peers[peer[0]] = trusted
    return trusted


class SettledConfig:
    """A worker's gunicorn settings, each read once.

    gunicorn reads its settings through ``Config.__getattr__`` (a lookup and a
    ``get()``, about 0.75 µs; ``is_ssl`` twice that), 24 times a request. A worker's
    settings never change once it is forked (a reload forks new workers), so each value
    is kept as a plain attribute the first time it is read.
    """

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        setattr(self, name, value)
        return value


def install() -> None:
    """Put these in gunicorn's place, in a worker after its fork."""
    # gunicorn builds each response from this name (wsgi.create).
    wsgi.Response = OneSend
    # gunicorn formats the Date header anew for every response (about 2 µs); to the
    # second, as the header is, one string serves a second's responses.
    util.http_date = _http_date
    wsgi.base_environ = _Environ()
    message.HeaderPolicy._peer_is_trusted_proxy = _peer_is_trusted_proxy  # type: ignore[method-assign]
