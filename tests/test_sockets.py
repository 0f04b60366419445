"""``send_all``: every byte, in order, however little each ``send`` takes."""

from __future__ import annotations

import socket

import gevent

from gateway.sockets import send_all


class Trickle:
    """A socket that takes at most ``n`` bytes a send."""

    def __init__(self, n: int) -> None:
        self.n, self.got, self.sends = n, b"", 0

    def send(self, data: bytes | memoryview) -> int:
        self.sends += 1
        taken = bytes(data[: self.n])
        self.got += taken
        return len(taken)


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
