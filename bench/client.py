"""A minimal HTTP/1.1 client for the benchmark: prebuilt request bytes, kept-alive sockets.

Lean on purpose, so that the client's own cost (it shares the machine) is small and the
same for every target. It reads ``Content-Length`` and chunked bodies (the end of a
chunked body is its ``0\r\n\r\n``; no trailers). Every answer must be a whole 2xx: anything else
stops the run (``BadAnswer``), since a figure made of 429s or errors measures nothing.
"""

from __future__ import annotations

import json
import socket
import time

PROMPT = [{"role": "user", "content": "Say something short about latency budgets."}]
LAST_PIECE = b"tok19"  # every model the benchmark asks for answers 20 pieces


def request(model: str, stream: bool, key: str, messages: list[dict] = PROMPT) -> bytes:
    """A chat completion request, complete with its headers."""
    body = json.dumps({"model": model, "messages": messages, "stream": stream}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class BadAnswer(RuntimeError):
    """An answer that is not a whole 2xx: the run stops, it measures nothing."""


class Connection:
    """One kept-alive connection; times the first body byte and the end of each answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, req: bytes, whole: bool = True) -> tuple[float, float]:
        """Send ``req``; seconds to the first body byte and to the end (or the first byte)."""
        started = time.perf_counter()
        self.sock.sendall(req)
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head, body = data[:end], data[end + 4 :]
        if not head.startswith(b"HTTP/1.1 2"):  # a 429 or a 5xx must not pass for a figure
            raise BadAnswer(f"not a 2xx answer, the run is void: {data[:300]!r}")
        length = _content_length(head)
        while not body:
            body += self._recv()
        first = time.perf_counter()
        if not whole:
            return first - started, first - started
        while not (len(body) >= length if length is not None else body.endswith(b"0\r\n\r\n")):
            body += self._recv()
        if LAST_PIECE not in body:
            raise BadAnswer(f"incomplete answer: {body[-300:]!r}")
        return first - started, time.perf_counter() - started

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed")
        return data

    def close(self) -> None:
        self.sock.close()


def _content_length(head: bytes) -> int | None:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return None
