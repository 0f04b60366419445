"""Writing a whole buffer to a socket, one system call when it fits; a look at whether
one has bytes waiting.

gevent's ``sendall`` asks the socket for its send buffer's size before every write (a
``getsockopt``: a system call on each JSON answer and each upstream request). ``send_all``
calls ``send`` instead, again for what one did not take, waiting for room in gevent;
like ``sendall`` it gives up once the socket's timeout has passed since the first call,
not at each one. For gevent's sockets (plain or TLS), whose ``send`` takes a timeout.
``readable`` looks with the system's ``poll`` (not gevent's: a look must not switch
greenlets; not ``select``, which refuses a descriptor past 1023).
Imports nothing of the gateway: gunicorn's master imports ``gateway.worker``, which
uses it.
"""

from __future__ import annotations

import select
import socket
import time

from gevent import monkey

_poll = monkey.get_original("select", "poll")


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Whether bytes (or the end) wait on ``sock``, after up to ``timeout`` seconds of
    this thread (0: a look, one system call)."""
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``; raise as ``send`` does (a reset), TimeoutError once the
    socket's timeout has passed with some of it unsent."""
    sent = sock.send(data)
    if sent == len(data):
        return
    timeout = sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    view = memoryview(data)
    while sent < len(data):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        sent += sock.send(view[sent:], 0, left)  # gevent's send takes its own timeout
