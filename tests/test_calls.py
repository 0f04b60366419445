"""A worker's calls: the drain policy when a client leaves, stopping them all, and the
greenlets kept to finish streams.

Stand-in calls (a producer that runs until stopped) take the place of real ones, so
what is checked is the policy itself: cancel at once, or drain bounded by
DRAIN_TIMEOUT and by MAX_DRAINS slots that come back when a call ends. The same rules
through gunicorn are in tests/test_disconnects.py. Last, how a real call's ``stop``
reaches the greenlet producing it: only while that greenlet still reads.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import gevent
import gevent.event

from gateway.call import Call, _Stopped
from gateway.calls import Calls, Finishers
from gateway.config import DEFAULTS
from gateway.downstream import Pace
from gateway.ending import CANCEL, DRAIN_TIMEOUT, MAX_DRAINS, SHUTDOWN, End, Ending


class StandIn:
    """A call whose producer runs until it is stopped, and remembers how."""

    def __init__(self) -> None:
        self.ended: End | None = None
        self._stopped = gevent.event.Event()
        self.exchange = SimpleNamespace(status="aborted")  # what calls counts in /metrics
        self.ending = Ending(time.monotonic)

    def produce(self) -> bool:
        self._stopped.wait()
        return True  # over here (not handed to the relay)

    def stop(self, end: End) -> None:
        if self.ended is None:
            self.ended = end
            self._stopped.set()


def calls_with(**settings: object) -> Calls:
    calls = Calls()
    calls.init_app(SimpleNamespace(config={**DEFAULTS, **settings}))
    return calls


def start(calls: Calls) -> StandIn:
    call = StandIn()
    calls._active.add(call)  # as open() does, without a real upstream
    calls._spawn(calls._run, call)
    gevent.sleep(0)
    return call


def test_cancel_mode_stops_a_call_as_soon_as_its_client_leaves() -> None:
    calls = calls_with(ON_DISCONNECT="cancel")
    call = start(calls)
    calls._client_left(call, "connection reset")
    assert call.ended.kind == CANCEL
    assert calls.wait(timeout=1) and calls.active == 0


def test_drains_are_bounded_by_time_and_by_slots_that_come_back() -> None:
    calls = calls_with(MAX_DRAINS=1, DRAIN_TIMEOUT=0.2)
    first, second = start(calls), start(calls)
    calls._client_left(first, "connection closed")
    calls._client_left(second, "connection closed")
    assert first.ended is None  # draining, in the one slot
    assert second.ended.kind == MAX_DRAINS  # no slot left: closed at once
    assert calls.wait(timeout=2)
    assert first.ended.kind == DRAIN_TIMEOUT
    # The slot came back with the first call's end: the next departure drains again.
    third = start(calls)
    calls._client_left(third, "connection closed")
    gevent.sleep(0.05)
    assert third.ended is None
    third.stop(End.shutdown())
    assert calls.wait(timeout=1)


def test_a_call_that_ends_while_draining_gives_its_slot_back_and_its_timer_is_gone() -> None:
    calls = calls_with(MAX_DRAINS=1, DRAIN_TIMEOUT=60)
    call = start(calls)
    calls._client_left(call, "connection closed")
    call.stop(End.shutdown())  # the upstream ended by itself, say
    assert calls.wait(timeout=1), "the drain timer outlived its call"
    other = start(calls)
    calls._client_left(other, "connection closed")
    assert other.ended is None
    other.stop(End.shutdown())
    assert calls.wait(timeout=1)


def test_stop_all_stops_every_call_for_shutdown() -> None:
    calls = calls_with()
    started = [start(calls) for _ in range(3)]
    assert calls.active == 3
    assert calls.stop_all() == 3
    assert calls.wait(timeout=1) and calls.active == 0
    assert {call.ended.kind for call in started} == {SHUTDOWN}


# -- a stop and the greenlet that produces the call -------------------------------------


def real_call() -> Call:
    """A Call with no upstream: what ``stop`` does to its producer is all that is used."""
    plan = SimpleNamespace(exchange=SimpleNamespace(stream=True))
    settings = SimpleNamespace(pace=Pace(heartbeat=5.0, probe_interval=0.05, write_timeout=5.0))
    return Call(plan, settings, None, lambda call, how: None, lambda call: None)


def producing(call: Call, ready_to_finish: gevent.event.Event, seen: list[str]) -> gevent.Greenlet:
    """A producer that reads until ``ready_to_finish``, then finishes, which waits a little
    (as a stream's finish waits for its client's copy)."""

    def produce() -> None:
        call._producer, call._reading = gevent.getcurrent(), True
        try:
            ready_to_finish.wait()
            seen.append("read")
            call._reading = False  # Call.finish begins
            gevent.sleep(0.05)
            seen.append("finished")
        except _Stopped as stopped:
            seen.append(f"stopped: {stopped.end.kind}")

    greenlet = gevent.spawn(produce)
    gevent.sleep(0)
    return greenlet


def test_a_stop_is_thrown_into_a_producer_that_is_reading() -> None:
    call, seen = real_call(), []
    producer = producing(call, gevent.event.Event(), seen)
    call.stop(End.cancel("connection reset"))
    producer.join(timeout=1)
    assert seen == [f"stopped: {CANCEL}"]


def test_a_stop_asked_while_reading_spares_a_finish_begun_before_it_arrived() -> None:
    """The producer's read returned before the stop reached it (its wake-up was due first,
    in the same turn of the loop): the stop, thrown later, must not cut its finish short,
    which would lose the record. It hurries the finish instead."""
    call, seen, ready = real_call(), [], gevent.event.Event()
    producer = producing(call, ready, seen)
    ready.set()  # the producer's wake-up is due ...
    call.stop(End.shutdown())  # ... before the stop's
    producer.join(timeout=1)
    assert seen == ["read", "finished"]
    assert call.down._body_done.is_set()  # hurried: its finish waits for no client's copy


# -- the finishers: greenlets kept for the next stream's finish ------------------------


def test_a_finisher_is_kept_and_finishes_the_next_call_too() -> None:
    ran: list = []
    pool = Finishers(lambda call: ran.append((call, gevent.getcurrent())))
    pool.run("a")
    gevent.sleep(0)
    assert pool.free == 1
    pool.run("b")
    assert pool.free == 0  # handed on: not free until it is done
    gevent.sleep(0)
    assert [call for call, _ in ran] == ["a", "b"]
    assert ran[0][1] is ran[1][1] is not gevent.getcurrent()
    assert pool.free == 1


def test_a_finish_that_waits_does_not_hold_up_the_next() -> None:
    free, ran = gevent.event.Event(), []

    def finish(call: str) -> None:
        if call == "slow":
            free.wait()
        ran.append(call)

    pool = Finishers(finish)
    pool.run("slow")
    gevent.sleep(0)
    pool.run("next")
    gevent.sleep(0.01)
    assert ran == ["next"]
    free.set()
    gevent.sleep(0.01)
    assert ran == ["next", "slow"] and pool.free == 2


def test_no_more_finishers_are_kept_than_keep() -> None:
    free = gevent.event.Event()
    pool = Finishers(lambda call: free.wait())
    for i in range(Finishers.KEEP + 3):
        pool.run(i)
    gevent.sleep(0)
    assert pool.free == 0
    free.set()
    gevent.sleep(0.01)
    assert pool.free == Finishers.KEEP


def test_a_finish_that_raises_is_logged_and_its_finisher_is_kept(caplog) -> None:  # type: ignore[no-untyped-def]
    ran: list = []

    def finish(call: str) -> None:
        ran.append(gevent.getcurrent())
        if call == "bug":
            raise ZeroDivisionError

    pool = Finishers(finish)
    with caplog.at_level(logging.ERROR, logger="gateway.calls"):
        pool.run("bug")
        gevent.sleep(0)
    assert "finishing a call failed" in caplog.text and "ZeroDivisionError" in caplog.text
    pool.run("next")
    gevent.sleep(0)
    assert len(ran) == 2 and ran[0] is ran[1]


def one_kept() -> tuple[Finishers, list, gevent.Greenlet]:
    """Finishers that note (call, greenlet) of each finish, one finish done: its finisher
    kept."""
    ran: list = []
    pool = Finishers(lambda call: ran.append((call, gevent.getcurrent())))
    pool.run("first")
    gevent.sleep(0)
    return pool, ran, ran[0][1]


def test_a_finish_asked_for_by_the_hub_runs_after_its_callback() -> None:
    pool, ran, _ = one_kept()

    def from_the_hub() -> None:
        pool.run("from the hub")  # a relay's pump, ending its stream, asks from the hub
        ran.append(("callback ends", None))

    timer = gevent.get_hub().loop.timer(0)
    timer.start(from_the_hub)
    gevent.sleep(0.05)
    timer.close()
    assert [call for call, _ in ran] == ["first", "callback ends", "from the hub"]
    assert ran[2][1] is ran[0][1]


def test_a_kept_finisher_that_is_killed_is_handed_no_call() -> None:
    pool, ran, kept = one_kept()
    kept.kill()
    assert pool.free == 0
    pool.run("next")
    gevent.sleep(0)
    assert [call for call, _ in ran] == ["first", "next"] and ran[1][1] is not kept


def test_a_call_handed_to_a_finisher_killed_meanwhile_is_finished_by_another() -> None:
    pool, ran, kept = one_kept()
    kept.kill(block=False)  # lands before the hand-over asked for next
    pool.run("next")
    gevent.sleep(0.01)
    assert [call for call, _ in ran] == ["first", "next"] and ran[1][1] is not kept
    assert kept.dead and kept.successful()  # it ended as killed (GreenletExit), nothing else
