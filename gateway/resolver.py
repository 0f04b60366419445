"""Name lookups for the worker's sockets: gevent's thread resolver, with two changes.

gevent looks every name up in a pool thread, an IP address too (every connection to
``127.0.0.1`` a thread's round trip), and waits for the thread's wake-up, which has
been seen lost (``offloop``). Here an address is answered at once, by the system's
``getaddrinfo`` told not to look anything up (``AI_NUMERICHOST``: it never blocks),
and a name is looked up in the pool through ``offloop.run``, whose wait survives a lost
wake-up.

``install()`` makes it the hub's resolver, unless the operator chose one
(``GEVENT_RESOLVER``); it must run before the hub first resolves a name.
"""

from __future__ import annotations

import _socket
import os
from typing import Any

import gevent
from gevent.resolver.thread import Resolver as ThreadResolver

from gateway import offloop


def install() -> None:
    """Make ``Resolver`` the resolver of every hub that has not made its own yet."""
    if "GEVENT_RESOLVER" not in os.environ:
        gevent.config.resolver = Resolver


class Resolver(ThreadResolver):
    """gevent's thread resolver: an address without a thread, a name with a safe wait."""

    def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list:
        args = (host, port, family, type, proto, flags)
        try:
            return _socket.getaddrinfo(*args[:5], flags | _socket.AI_NUMERICHOST)
        except _socket.gaierror:  # a name (or a lookup that fails either way)
            pass
        return self._looked_up(_socket.getaddrinfo, args)

    def gethostbyname(self, *args: Any) -> Any:
        return self._looked_up(_socket.gethostbyname, args)

    def gethostbyname_ex(self, *args: Any) -> Any:
        return self._looked_up(_socket.gethostbyname_ex, args)

    def gethostbyaddr(self, *args: Any, **kwargs: Any) -> Any:
        return self._looked_up(_socket.gethostbyaddr, args, kwargs)

    def getnameinfo(self, *args: Any, **kwargs: Any) -> Any:
        return self._looked_up(_socket.getnameinfo, args, kwargs)

    def _looked_up(self, lookup: Any, args: tuple, kwargs: dict | None = None) -> Any:
        if not offloop.available():  # another native thread: it may block itself
            return lookup(*args, **(kwargs or {}))
        return offloop.run(_call, (lookup, args, kwargs or {}), "a name lookup")


def _call(lookup: Any, args: tuple, kwargs: dict) -> Any:
    return lookup(*args, **kwargs)
