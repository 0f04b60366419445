"""``send_all``: every byte, in order, however little each ``send`` takes."""

from __future__ import annotations

import contextlib
import socket
import time

import gevent
import pytest

from gateway.sockets import send_all


class Trickle:
    """A socket that takes at most ``n`` bytes a send."""

    def __init__(self, n: int) -> None:
        self.n, self.got, self.sends = n, b"", 0

    def send(self, data: bytes | memoryview, flags: int = 0, timeout: float | None = None) -> int:
        self.sends += 1
        taken = bytes(data[: self.n])
        self.got += taken
        return len(taken)

    def gettimeout(self) -> float | None:
        return None


def test_one_send_when_it_fits() -> None:
    sock = Trickle(1000)
    send_all(sock, b"x" * 1000)  # type: ignore[arg-type]
    assert (sock.got, sock.sends) == (b"x" * 1000, 1)


def test_what_a_send_left_is_sent_next() -> None:
    data = bytes(range(256)) * 4
    sock = Trickle(7)
    send_all(sock, data)  # type: ignore[arg-type]
    assert sock.got == data
    assert sock.sends == -(-len(data) // 7)


def test_a_full_buffer_waits_for_the_reader() -> None:
    """A real pair whose buffers are far smaller than the data: the writer waits in
    gevent while the reader drains, and the reader gets it all."""
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = b"".join(i.to_bytes(4, "big") for i in range(250_000))  # 1 MB
    got = bytearray()

    def read() -> None:
        while len(got) < len(data):
            got.extend(reader.recv(65536))

    readers = gevent.spawn(read)
    send_all(writer, data)
    readers.join(timeout=10)
    writer.close()
    reader.close()
    assert bytes(got) == data


def test_a_slow_reader_is_given_the_sockets_timeout_in_all() -> None:
    """Once the socket's timeout has passed since the first write, it gives up, however
    many writes each went through in time: the deadline is the whole write's, as
    sendall's, not each send's."""
    writer, reader = socket.socketpair()
    writer.settimeout(0.5)
    data = b"x" * 4_000_000  # far more than the socket buffers hold
    got = 0

    def drain_now_and_then() -> None:  # each wait of the writer is shorter than 0.5 s
        nonlocal got
        reader.setblocking(False)
        while True:
            gevent.sleep(0.2)
            with contextlib.suppress(BlockingIOError):
                while chunk := reader.recv(1 << 20):
                    got += len(chunk)

    drainer = gevent.spawn(drain_now_and_then)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        send_all(writer, data)
    took = time.monotonic() - started
    drainer.kill()
    writer.close()
    reader.close()
    assert 0 < got < len(data)
    assert 0.45 < took < 1.5
