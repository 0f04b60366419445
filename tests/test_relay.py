"""The relay: pumps run in order, in the worker's one relay greenlet or in the hub's
callback that readied them, never in a request's greenlet that readied them.

What a pump does for a call (reading without waiting, translating, ending it) is in
tests/test_upstream.py (the watched reads) and, through gunicorn, tests/test_server.py
and tests/test_disconnects.py.
"""

from __future__ import annotations

import logging

import gevent
import gevent.event
import pytest

from gateway.relay import Relay


def _from_the_hub(fn) -> None:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a callback of the hub (as a watch's is), and let the loop turn."""
    timer = gevent.get_hub().loop.timer(0)
    timer.start(fn)
    gevent.sleep(0.05)
    timer.close()


def test_pumps_run_in_order_in_one_greenlet_that_is_not_their_callers() -> None:
    relay, ran = Relay(), []
    relay.ready(lambda: ran.append(("a", gevent.getcurrent())))
    relay.ready(lambda: ran.append(("b", gevent.getcurrent())))
    assert ran == []  # the caller goes on: ready never runs a pump in place
    gevent.sleep(0)
    assert [name for name, _ in ran] == ["a", "b"]
    assert ran[0][1] is ran[1][1] is not gevent.getcurrent()


def test_a_pump_that_raises_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay, ran = Relay(), []
    relay.ready(lambda: 1 / 0)
    relay.ready(lambda: ran.append("next"))
    with caplog.at_level(logging.ERROR, logger="gateway.relay"):
        gevent.sleep(0)
    assert ran == ["next"]
    assert "a pump raised" in caplog.text and "ZeroDivisionError" in caplog.text


def test_a_pump_readied_while_another_waits_runs_after_it() -> None:
    """A pump that has to wait (a lock held elsewhere) keeps the relay's greenlet: what
    is readied meanwhile is queued, not started beside it, and runs once it returns."""
    relay, ran, free = Relay(), [], gevent.event.Event()

    def slow() -> None:
        free.wait()
        ran.append("slow")

    relay.ready(slow)
    gevent.sleep(0)
    relay.ready(lambda: ran.append("next"))
    gevent.sleep(0.01)
    assert ran == []
    free.set()
    gevent.sleep(0.01)
    assert ran == ["slow", "next"]


def test_a_relay_whose_greenlet_ended_starts_another() -> None:
    relay, ran = Relay(), []
    relay.ready(lambda: None)
    gevent.sleep(0)
    first = relay._greenlet
    first.kill()
    relay.ready(lambda: ran.append(gevent.getcurrent()))
    gevent.sleep(0)
    assert ran and ran[0] is not first and not ran[0].dead


def test_a_pump_the_hub_readies_while_the_relay_waits_runs_in_the_hub_itself() -> None:
    """As a watch wakes the greenlet waiting on it: within that callback, with no round
    through the loop's callbacks and no switch to the relay's greenlet."""
    relay, ran = Relay(), []
    relay.ready(lambda: None)
    gevent.sleep(0)  # the relay's greenlet now waits for pumps
    waiting = relay._greenlet

    def from_the_hub() -> None:
        relay.ready(lambda: ran.append(("pumped", gevent.getcurrent())))
        ran.append(("callback ends", gevent.getcurrent()))

    _from_the_hub(from_the_hub)
    hub = gevent.get_hub()
    assert ran == [("pumped", hub), ("callback ends", hub)]
    assert relay._greenlet is waiting and not waiting.dead  # and it still waits


def test_a_pump_the_hub_readies_behind_queued_ones_runs_after_them_in_the_relay() -> None:
    relay, ran = Relay(), []
    relay.ready(lambda: None)
    gevent.sleep(0)

    def first() -> None:  # in the hub; what it readies is queued for the relay's greenlet
        ran.append(("first", gevent.getcurrent()))
        relay.ready(lambda: ran.append(("queued", gevent.getcurrent())))

    def from_the_hub() -> None:
        relay.ready(first)
        relay.ready(lambda: ran.append(("hub's", gevent.getcurrent())))  # must not overtake

    _from_the_hub(from_the_hub)
    assert ran == [
        ("first", gevent.get_hub()),
        ("queued", relay._greenlet),
        ("hub's", relay._greenlet),
    ]


def test_a_pump_readied_by_a_pump_in_the_hub_runs_after_it_not_inside_it() -> None:
    relay, ran = Relay(), []
    relay.ready(lambda: None)
    gevent.sleep(0)

    def outer() -> None:
        relay.ready(lambda: ran.append(("inner", gevent.getcurrent())))  # a turn used up
        ran.append(("outer ends", gevent.getcurrent()))

    _from_the_hub(lambda: relay.ready(outer))
    assert ran == [("outer ends", gevent.get_hub()), ("inner", relay._greenlet)]


def test_a_pump_that_waits_in_the_hub_raises_is_logged_and_the_relay_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pump must never wait; in the hub a wait raises at once (gevent's
    BlockingSwitchOutError) where in a greenlet it would hold up every stream."""
    relay, ran = Relay(), []
    relay.ready(lambda: None)
    gevent.sleep(0)

    def waits() -> None:
        ran.append("before")
        gevent.sleep(0.001)
        ran.append("after")

    with caplog.at_level(logging.ERROR, logger="gateway.relay"):
        _from_the_hub(lambda: relay.ready(waits))
    assert ran == ["before"]
    assert "a pump raised" in caplog.text and "BlockingSwitchOutError" in caplog.text
    _from_the_hub(lambda: relay.ready(lambda: ran.append("next")))
    assert ran == ["before", "next"]
