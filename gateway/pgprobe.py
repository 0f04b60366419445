"""Whether PostgreSQL is there at all: an outage told from a refusal, for a start.

``flask prepare`` asks when its migration cannot reach the database: a server that
does not answer (or answers only to say it is not serving) is an outage, and the
gateway starts from its snapshot file (SPEC rule 8); a server that answers and
refuses (a wrong password, no such database) stops the start.
"""

from __future__ import annotations

import getpass
import socket
import ssl
import struct

from gateway.db import database

# The first message of PostgreSQL's protocol a client may send (SSLRequest): the server
# answers it with one byte ('S' or 'N') before it asks for anything.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def server_answers(timeout: float = 2.0) -> bool:
    """Whether the PostgreSQL server answers at all (TCP, or its Unix socket).

    Tells an outage (nothing there, nothing reachable, or a server that hangs) from a
    server that is there and refuses what it was asked (a wrong password, a database that
    does not exist), which psycopg's connection errors do not: both come without a
    SQLSTATE, and the server's words are in its own language. A connection alone is not
    an answer: the system of a hung server (a stopped process, a paused VM) still takes
    it. So the probe asks for the protocol's first reply, which comes before any sign-in.
    A server that answers only to say it takes no connections now (shutting down,
    starting up, in crash recovery: SQLSTATE class 57P, in its reply to the sign-in's
    first message) is away as well: it is not refusing this gateway, it is not serving.
    """
    params = database.obj.connect_params
    host, port = params.get("host") or "/var/run/postgresql", params.get("port") or 5432
    unix = host.startswith("/")
    try:
        if unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
        with sock:
            if unix:
                sock.connect(f"{host}/.s.PGSQL.{port}")
            sock.sendall(_SSL_REQUEST)
            reply = sock.recv(1)
            if reply not in (b"N", b"S"):
                return bool(reply)
            return not _not_serving(sock, reply == b"S", params)
    except OSError:  # socket.timeout too
        return False


def _not_serving(sock: socket.socket, tls: bool, params: dict) -> bool:
    """Whether the server, asked to sign in, says it takes no connections now (57P...).

    ``sock`` has had the SSLRequest's answer (``tls``: it wants TLS, spoken here without
    checking its certificate: nothing but the error's code is read). Anything but an
    error of class 57P (a request for a password, another error, no answer) is a server
    that serves."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            sock = context.wrap_socket(sock)
        except ssl.SSLError:  # it answered, in a TLS this probe cannot speak
            return False
    user = params.get("user") or getpass.getuser()
    name = database.obj.database or user
    body = struct.pack("!i", 196608) + b"".join(  # protocol 3.0
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in (("user", user), ("database", name))
    )
    sock.sendall(struct.pack("!i", len(body) + 5) + body + b"\0")
    head = _read(sock, 5)
    if len(head) < 5 or head[:1] != b"E":
        return False
    fields = _read(sock, struct.unpack("!i", head[1:])[0] - 4)
    for field in fields.split(b"\0"):
        if field[:1] == b"C":  # the SQLSTATE
            return field[1:].startswith(b"57P")
    return False


def _read(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes (fewer only if the server closes first)."""
    data, size = b"", min(size, 65536)  # an error's fields are a few hundred bytes
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return data
