"""Name lookups: an address answered without the pool, a name whose wake-up is lost."""

from __future__ import annotations

import _socket
import socket

import gevent
import gevent.socket
import pytest
from gevent import monkey

from gateway import offloop
from gateway.resolver import Resolver
from tests.loopwatch import lost_wakeups

_native_ident = monkey.get_original("_thread", "get_ident")


@pytest.fixture
def pool_tasks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What is handed to the hub's thread pool from now on (``offloop.run``'s ``what``)."""
    real = offloop.run
    tasks: list[str] = []

    def run(work, args, what, cancel=None):  # type: ignore[no-untyped-def]
        tasks.append(what)
        return real(work, args, what, cancel)

    monkeypatch.setattr(offloop, "run", run)
    return tasks


def test_this_process_resolves_as_a_worker_does() -> None:
    assert isinstance(gevent.get_hub().resolver, Resolver)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.1.2.3"])
def test_an_address_is_answered_without_the_pool(
    host: str, pool_tasks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered on the caller's own thread: no thread's round trip, no wake-up to lose."""
    real, threads = _socket.getaddrinfo, []

    def getaddrinfo(*args):  # type: ignore[no-untyped-def]
        threads.append(_native_ident())
        return real(*args)

    monkeypatch.setattr(_socket, "getaddrinfo", getaddrinfo)
    found = gevent.socket.getaddrinfo(host, 8080, 0, socket.SOCK_STREAM)
    monkeypatch.undo()
    assert [info[4][:2] for info in found] == [(host, 8080)]
    assert found == socket.getaddrinfo(host, 8080, 0, socket.SOCK_STREAM)  # the stdlib's shape
    assert threads == [_native_ident()] and pool_tasks == []


def test_a_name_is_looked_up_in_the_pool(pool_tasks: list[str]) -> None:
    found = gevent.socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert {info[4][0] for info in found} <= {"127.0.0.1", "::1"} and found
    assert pool_tasks == ["a name lookup"]
    # A name that does not resolve fails as the system's lookup does (.invalid never
    # resolves: RFC 6761), raised in the caller.
    with pytest.raises(socket.gaierror):
        gevent.socket.getaddrinfo("nowhere.invalid", 80)


def test_a_lookup_whose_wake_up_is_lost_costs_a_look_not_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hub never hears that the lookup's thread finished; the wait looks, and goes on
    (gevent's own thread resolver waits for ever: seen, with this test, by resolving
    through it)."""
    with lost_wakeups() as held:
        found = gevent.socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert found == socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert held, "the pool's wake-up was not held back: this test shows nothing"
    assert "a name lookup ended without waking the loop" in caplog.text


def test_the_other_lookups_go_through_the_pool_too(pool_tasks: list[str]) -> None:
    resolver = gevent.get_hub().resolver
    assert resolver.gethostbyname("localhost") == _socket.gethostbyname("localhost")
    assert resolver.getnameinfo(("127.0.0.1", 80), 0) == _socket.getnameinfo(("127.0.0.1", 80), 0)
    assert pool_tasks == ["a name lookup"] * 2
