"""Kept-alive HTTP/1.1 connections to upstreams: made, checked, pooled, and one request
and its answer's head over each; ``upstream`` reads the bodies and owns the rest.

Our own, not urllib3's and http.client's: their layers (a pool manager, a connection
pool, urllib3's and http.client's request and response objects, the email package's
header parsing, a ``Timeout`` cloned twice) cost about 220 µs of CPU a request here,
against about 60 µs for the same bytes written and read directly: a sixth of a JSON
call's worker CPU (issue 11). What they did that a gateway needs is here:

- a pool of idle connections per origin (scheme, host, port, and the proxy on the
  way), at most ``maxsize`` kept, any number open; a connection is checked before reuse
  (nothing to read on it: the server has not closed it) and dropped, never reused,
  after an answer that said it closes, that ended with the connection, or that was not
  read to its end;
- the connect in a helper greenlet of its own (``_connecting``): the resolver and the
  TLS handshake are the deepest a call's producer would go, and a greenlet keeps every
  page of stack it ever touched (an open stream's producer held 4 KB more for it);
- TLS verified against certifi's CA bundle, with SNI and ALPN ``http/1.1``;
- the environment's proxies (``requests`` reads them, honouring ``NO_PROXY``): an
  ``http://`` URL through a proxy is sent whole to it, an ``https://`` one through a
  ``CONNECT`` tunnel (over TLS to an ``https://`` proxy, with urllib3's ``SSLTransport``);
- a request's head and body in one write; the heads themselves (written and read) are
  ``http11``'s.

Errors come out as ``ConnectError`` (no connection: refused, unknown host, TLS, the
proxy), ``TimeoutError``, or ``OSError`` (a reset); ``upstream`` names them.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import gevent
import gevent.pool
import gevent.socket
import gevent.ssl
from gevent import monkey

from gateway.http11 import DEFAULT_PORTS, BadAnswer, Route, bracketed, proxy_auth, read_head
from gateway.sockets import send_all

T = TypeVar("T")


class ConnectError(OSError):
    """No connection to the upstream (or through its proxy) could be made."""


# The OS's own poll, not gevent's: asked with no timeout it never blocks, and gevent's
# goes through the hub to say the same (about 3% of a call's CPU, issue 11).
_poll = monkey.get_original("select", "poll")


class Connection:
    """One connection to an origin (through its proxy, if any)."""

    __slots__ = ("key", "sock")

    def __init__(self, key: tuple, sock: Any) -> None:
        self.key = key
        self.sock = sock

    def usable(self) -> bool:
        """False once the server closed it (or sent bytes nobody asked for)."""
        poll = _poll()
        poll.register(self.sock, select.POLLIN)
        return not poll.poll(0)

    def send(self, data: bytes) -> None:
        if isinstance(self.sock, socket.socket):
            send_all(self.sock, data)
        else:  # TLS in TLS: urllib3's SSLTransport, which is no socket
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class Pools:
    """Idle connections per origin; at most ``origins`` origins remembered."""

    def __init__(self, maxsize: int, origins: int, connect_timeout: float, read_timeout: float):
        self.maxsize = maxsize
        self.origins = origins
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.context = gevent.ssl.create_default_context(cafile=certifi.where())
        self.context.set_alpn_protocols(["http/1.1"])
        self._idle: dict[tuple, list[Connection]] = {}

    def take(self, way: Route) -> Connection:
        """An idle connection of the route's origin that is still open, or a new one."""
        idle = self._idle.get(way.key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        helper = _connecting.spawn(_outcome, self._connect, way)
        try:
            sock, error = helper.get()
        finally:
            if not helper.dead:
                helper.kill(block=False)
        if error is not None:
            raise error
        return Connection(way.key, sock)

    def give_back(self, conn: Connection) -> None:
        """Keep an answered connection for the next request, or close it if enough are."""
        idle = self._idle.get(conn.key)
        if idle is None:
            if len(self._idle) >= self.origins:  # forget the origin remembered longest
                for dropped in self._idle.pop(next(iter(self._idle))):
                    dropped.close()
            idle = self._idle[conn.key] = []
        if len(idle) < self.maxsize:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def _connect(self, way: Route) -> Any:
        scheme, host, port, proxy = way.key
        to = urlsplit(proxy) if proxy else None
        address = (to.hostname, to.port or DEFAULT_PORTS[to.scheme]) if to else (host, port)
        try:
            sock = gevent.socket.create_connection(address, timeout=self.connect_timeout)
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if to is not None and to.scheme == "https":
                sock = self.context.wrap_socket(sock, server_hostname=to.hostname)
            if to is not None and scheme == "https":
                self._tunnel(sock, way, proxy)
            if scheme == "https":
                sock = self._secure(sock, host)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.read_timeout)
        return sock

    def _tunnel(self, sock: Any, way: Route, proxy: str) -> None:
        """Ask the proxy for a tunnel to the origin (``CONNECT``)."""
        authority = f"{bracketed(way.key[1])}:{way.key[2]}"
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in proxy_auth(proxy))
        sock.sendall(head.encode("latin-1") + b"\r\n")
        fp = sock.makefile("rb", buffering=0)  # no byte of the origin's read ahead
        try:
            answer = read_head(_Lines(fp), "CONNECT")
        except TimeoutError:
            raise
        except (BadAnswer, OSError) as exc:
            raise ConnectError(f"the proxy {proxy} did not open a tunnel: {exc}") from exc
        finally:
            fp.close()  # else the socket would stay open after its close
        if answer.status != 200:
            raise ConnectError(f"the proxy {proxy} refused a tunnel: {answer.status}")

    def _secure(self, sock: Any, host: str) -> Any:
        try:
            if isinstance(sock, gevent.ssl.SSLSocket):  # through an https:// proxy
                from urllib3.util.ssltransport import SSLTransport

                return SSLTransport(sock, self.context, server_hostname=host)
            return self.context.wrap_socket(sock, server_hostname=host)
        except TimeoutError:
            raise
        except (OSError, ValueError) as exc:  # ssl.SSLError and CertificateError are
            raise ConnectError(f"TLS with {host} failed: {exc}") from exc


class _Lines:
    """An unbuffered file read a line at a time, a byte a read: the proxy's answer to
    ``CONNECT`` must not take the first bytes of what comes through the tunnel."""

    __slots__ = ("_fp",)

    def __init__(self, fp: Any) -> None:
        self._fp = fp

    def readline(self, limit: int) -> bytes:
        line = bytearray()
        while len(line) < limit and not line.endswith(b"\n"):
            byte = self._fp.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)


_connecting = gevent.pool.Group()


def _outcome(fn: Callable[..., T], *args: Any) -> tuple[T | None, BaseException | None]:
    try:
        return fn(*args), None
    except BaseException as exc:  # given back to the caller, which raises it
        return None, exc
