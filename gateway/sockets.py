"""Writing a whole buffer to a socket, one system call when it fits.

gevent's ``sendall`` asks the socket for its send buffer's size before every write (a
``getsockopt``: a system call on each JSON answer and each upstream request, 2-3% of a
worker's CPU). ``send_all`` loops on ``send`` instead, which under gevent waits for room
cooperatively, each wait bounded by the socket's timeout. Imports nothing: gunicorn's
master imports ``gateway.worker``, which uses it.
"""

from __future__ import annotations

import socket


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``; raise as ``send`` does (a reset, a write timeout)."""
    sent = sock.send(data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(data):
            sent += sock.send(view[sent:])
