"""A call's client side over a real loopback TCP connection: when the client left.

The gateway's end of each connection is given to a ``Downstream`` and its body is
written the way gunicorn does (``sendall`` each piece; a failed write closes the
body). The client's end is closed with a FIN or a reset, or half-closed, at a known
moment; what is checked is what the call is told and when the client is said to have
left. The same through gunicorn, under load, is in tests/test_server_soak.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator

import gevent
import gevent.pool
import pytest

from gateway import downstream
from gateway.adapters.translator import Piece
from gateway.downstream import Downstream, Pace

PACE = Pace(heartbeat=5.0, probe_interval=0.05, write_timeout=5.0)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the gateway's end, the client's end) of one loopback TCP connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield server, client
    server.close()
    client.close()


class Told:
    """What a Downstream tells its call: how and since when the client is gone."""

    def __init__(self) -> None:
        self.how: str | None = None
        self.at: float | None = None

    def __call__(self, how: str, at: float) -> None:
        assert self.how is None, "told twice"
        self.how, self.at = how, at


def serve(down: Downstream, sock: socket.socket) -> gevent.Greenlet:
    """Write the body as gunicorn does, in a greenlet."""

    def write() -> None:
        body = down.body()
        try:
            for data in body:
                sock.sendall(data)
        except OSError:
            pass
        finally:
            body.close()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)  # the response's end, as far as this test goes

    return gevent.spawn(write)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture(params=["tcp_info", "writes_only"])
def evidence(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The connection's TCP state readable (Linux), or not: then only writes tell."""
    if request.param == "writes_only":
        monkeypatch.setattr(Downstream, "_state", lambda self: None)
    return request.param


def test_a_fin_on_a_stream_is_a_departure_from_when_it_was_seen(pair, evidence) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    told = Told()
    down = Downstream(server, True, PACE, told)
    serve(down, server)
    down.put(Piece(b"data: 1\n\n"))
    assert client.recv(100) == b"data: 1\n\n"
    down.start_watching(gevent.pool.Group())
    closed = time.monotonic()
    client.close()  # a FIN; the probes confirm it is not a half-close
    assert down.gone.wait(2)
    assert told.how == "connection closed"
    assert closed <= told.at == down.fin_at < closed + 0.05  # seen, not confirmed


def test_the_first_probe_confirms_a_departure_without_waiting_for_the_next(pair) -> None:  # type: ignore[no-untyped-def]
    # The reset a dead peer answers the first probe with shows in the connection's
    # state at once (on loopback): no second write a probe interval later is needed.
    server, client = pair
    down = Downstream(server, True, Pace(5.0, probe_interval=2.0, write_timeout=5.0), Told())
    serve(down, server)
    down.start_watching(gevent.pool.Group())
    client.close()
    assert down.gone.wait(0.5)


def test_a_reset_is_a_departure_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    told = Told()
    down = Downstream(server, True, PACE, told)
    down.start_watching(gevent.pool.Group())
    gevent.sleep(0.01)
    reset(client)
    assert down.gone.wait(1) and told.how == "connection reset"
    assert down.fin_at is None


def test_a_half_closing_client_that_reads_is_not_gone(pair, evidence) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    told = Told()
    down = Downstream(server, True, PACE, told)
    serve(down, server)
    down.start_watching(gevent.pool.Group())
    client.shutdown(socket.SHUT_WR)  # a FIN, but it keeps reading
    gevent.sleep(PACE.trust_after + 0.2)  # probes taken all along
    assert down.fin_at is None and not down.gone.is_set()
    down.settle()  # nothing left to wait for
    down.look()  # the FIN is still there, but told apart already
    assert down.fin_at is None
    down.put(Piece(b"data: 2\n\n"))
    down.end()
    received = b""
    while data := client.recv(100):
        received += data
    assert received.endswith(b"data: 2\n\n") and b": probe" in received
    assert told.how is None


def test_look_sees_a_fin_before_the_watcher_wakes(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    down = Downstream(server, True, PACE, Told())  # no watcher at all
    down.look()
    assert down.fin_at is None
    client.close()
    gevent.sleep(0.01)
    before = time.monotonic()
    down.look()
    assert down.fin_at is not None and down.fin_at >= before and not down.gone.is_set()


def test_look_on_a_json_call_a_fin_is_gone_and_a_reset_too(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    told = Told()
    down = Downstream(server, False, PACE, told)
    reset(client)
    gevent.sleep(0.01)
    down.look()
    assert down.gone.is_set() and told.how == "connection reset"


def test_settle_takes_a_silent_fin_at_its_word_after_a_bound(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A FIN seen and nothing written since (no body to probe with): after SETTLE_WAIT
    # the client is taken as gone, from when its FIN was seen.
    monkeypatch.setattr(downstream, "SETTLE_WAIT", 0.2)
    server, client = pair
    told = Told()
    down = Downstream(server, True, PACE, told)
    down.start_watching(gevent.pool.Group())
    client.close()
    gevent.sleep(0.05)
    assert down.fin_at is not None and not down.gone.is_set()
    started = time.monotonic()
    down.settle()
    assert 0.15 < time.monotonic() - started < 1
    assert down.gone.is_set() and told.at == down.fin_at


def test_hurry_at_shutdown_ends_a_settle_and_takes_the_fin_as_the_departure(pair) -> None:  # type: ignore[no-untyped-def]
    # The worker's deadline must not wait SETTLE_WAIT for a FIN to be told apart: the
    # record is written now, and the client counts as gone since its FIN.
    server, client = pair
    told = Told()
    down = Downstream(server, True, PACE, told)  # no body: nothing would ever confirm it
    down.start_watching(gevent.pool.Group())
    client.close()
    gevent.sleep(0.05)
    assert down.fin_at is not None and not down.gone.is_set()
    settling = gevent.spawn(down.settle)
    gevent.sleep(0.05)
    down.hurry()
    settling.join(timeout=1)
    assert settling.dead  # it returned long before SETTLE_WAIT
    assert down.gone.is_set() and told.how == "connection closed" and told.at == down.fin_at


@pytest.fixture
def unframed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the first piece is out, the producer writes pieces itself, as in a gunicorn
    worker (``gunicornhttp.framing``; here with no chunked framing, as ``serve`` writes)."""
    monkeypatch.setattr(downstream, "framing", lambda: lambda data: data)


def test_delivery_is_told_at_once_once_every_piece_went_out_whole(pair, unframed) -> None:  # type: ignore[no-untyped-def]
    """The body waits on an empty queue and the producer wrote the last piece itself:
    what the client got is known, and the call's finish need not wait for the body to
    take the end from the queue (a greenlet switch there and back)."""
    server, _client = pair
    down = Downstream(server, True, PACE, Told())
    serve(down, server)
    down.put(Piece(b"data: a\n\n", 1, "a"))  # the body writes this one, with the headers
    gevent.sleep(0.05)  # the body waits on an empty queue now
    down.put(Piece(b"data: bc\n\n", 1, "bc"))  # written by the producer, whole
    down.end()
    assert down.delivery() == (2, 3)
    assert not down._body_done.is_set()  # the body has not run since: nothing was waited for


BIG = "x" * 8_000_000  # more than the socket's buffers take while the client reads none


def read_all(sock: socket.socket) -> gevent.Greenlet:
    def read() -> None:
        while sock.recv(1 << 20):
            pass

    return gevent.spawn(read)


@pytest.mark.parametrize("asked", ["at once", "while the body writes"])
def test_delivery_waits_for_a_piece_the_socket_took_only_part_of(pair, unframed, asked) -> None:  # type: ignore[no-untyped-def]
    """The producer's write of a big piece leaves the rest queued; the body takes it
    and writes it, waiting for the client. Asked for before the body took it, or while
    the body writes it, delivery waits for the whole piece to be out."""
    server, client = pair
    down = Downstream(server, True, PACE, Told())
    serve(down, server)
    down.put(Piece(b"data: a\n\n", 1, "a"))
    gevent.sleep(0.05)
    down.put(Piece(b"data: " + BIG.encode() + b"\n\n", 1, BIG))
    down.end()
    if asked == "at once":
        read_all(client)  # it runs once delivery waits
        assert down.delivery() == (2, 1 + len(BIG))
        return
    delivery = gevent.spawn(down.delivery)
    gevent.sleep(0.2)
    assert not delivery.ready()  # the body is still writing the rest of the big piece
    read_all(client)
    assert delivery.get(timeout=5) == (2, 1 + len(BIG))


def test_delivery_waits_for_a_body_that_has_not_written_its_first_piece(pair, unframed) -> None:  # type: ignore[no-untyped-def]
    server, _client = pair
    down = Downstream(server, True, PACE, Told())
    down.put(Piece(b"data: a\n\n", 1, "a"))
    down.end()
    delivery = gevent.spawn(down.delivery)
    gevent.sleep(0.1)
    assert not delivery.ready()  # nobody iterates the body yet: nothing is written
    serve(down, server)
    assert delivery.get(timeout=5) == (1, 1)
