"""Auto-pipelining: who waits, who shares a round trip, who gets which replies.

The exchange here is a fake that takes a while (a gevent sleep) and answers each command
with a value of its own, so every caller's replies can be told apart; Redis itself is in
``test_ratelimit.py``.
"""

from __future__ import annotations

import gevent
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipelining import Pipeline, Stopped


class Fake:
    """An exchange that answers ``("add", n)`` with ``n + 1`` after ``delay`` seconds, and
    fails the exchanges numbered in ``fail`` (from 0)."""

    def __init__(self, delay: float = 0.01, fail: frozenset[int] = frozenset()) -> None:
        self.delay = delay
        self.fail = fail
        self.sent: list[list] = []  # each exchange's commands

    def __call__(self, commands: list) -> list:
        number = len(self.sent)
        self.sent.append(list(commands))
        gevent.sleep(self.delay)
        if number in self.fail:
            raise ConnectionError("gone")
        return [n + 1 for _, n in commands]


def commands(caller: int, count: int) -> list[tuple[str, int]]:
    return [("add", caller * 100 + i) for i in range(count)]


def test_a_caller_alone_goes_out_at_once() -> None:
    fake = Fake(delay=0)
    pipeline = Pipeline(fake)
    assert pipeline.exchange(commands(1, 2)) == [101, 102]
    assert pipeline.exchange(commands(2, 1)) == [201]
    assert fake.sent == [commands(1, 2), commands(2, 1)] and pipeline.batches == 0


def test_callers_that_come_meanwhile_share_the_next_round_trip() -> None:
    fake = Fake()
    pipeline = Pipeline(fake)
    first = gevent.spawn(pipeline.exchange, commands(0, 1))
    gevent.sleep(0)  # its round trip is in flight
    others = [gevent.spawn(pipeline.exchange, commands(i, i % 3 + 1)) for i in range(1, 21)]
    gevent.joinall([first, *others], raise_error=True)
    assert first.value == [1]
    for i, greenlet in enumerate(others, start=1):
        assert greenlet.value == [n + 1 for _, n in commands(i, i % 3 + 1)]
    together = [c for i in range(1, 21) for c in commands(i, i % 3 + 1)]
    assert fake.sent == [commands(0, 1), together]  # two round trips for 21 callers
    assert pipeline.batches == 1
    assert pipeline.exchange(commands(9, 1)) == [901]  # idle again: at once


def test_a_failed_round_trip_reaches_everyone_it_carried() -> None:
    pipeline = Pipeline(Fake(fail=frozenset({1})))  # the batch's round trip fails
    first = gevent.spawn(pipeline.exchange, commands(0, 1))
    gevent.sleep(0)
    waiting = [gevent.spawn(pipeline.exchange, commands(i, 1)) for i in range(1, 6)]
    gevent.joinall([first, *waiting])
    assert first.value == [1]
    assert all(isinstance(g.exception, ConnectionError) for g in waiting)
    assert pipeline.exchange(commands(7, 1)) == [701]


def test_a_caller_that_stops_waiting_leaves_the_others_their_replies() -> None:
    pipeline = Pipeline(Fake())
    first = gevent.spawn(pipeline.exchange, commands(0, 1))
    gevent.sleep(0)
    waiting = [gevent.spawn(pipeline.exchange, commands(i, 2)) for i in range(1, 6)]
    gevent.sleep(0)
    waiting[2].kill()  # a call stopped (its deadline, a shutdown) while it waited
    gevent.joinall([first, *waiting])
    for i, greenlet in enumerate(waiting, start=1):
        if i != 3:
            assert greenlet.value == [n + 1 for _, n in commands(i, 2)]


def test_a_stopped_sender_leaves_nobody_waiting() -> None:
    fake = Fake(delay=0.05)
    pipeline = Pipeline(fake)
    first = gevent.spawn(pipeline.exchange, commands(0, 1))
    gevent.sleep(0)
    waiting = [gevent.spawn(pipeline.exchange, commands(i, 1)) for i in range(1, 4)]
    first.join()
    gevent.sleep(0.01)  # the sender's round trip is in flight
    late = gevent.spawn(pipeline.exchange, commands(4, 1))  # waits for the next one
    gevent.sleep(0)
    pipeline._senders.kill()
    gevent.joinall([*waiting, late], timeout=1)
    assert all(isinstance(g.exception, Stopped) for g in [*waiting, late])
    assert pipeline.exchange(commands(5, 1)) == [501]  # not stuck busy


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4)),  # loop turns to wait, commands
        min_size=1,
        max_size=30,
    ),
    delay=st.sampled_from([0.0, 0.001, 0.003]),
)
def test_whatever_the_arrivals_each_caller_gets_its_own_replies(
    arrivals: list[tuple[int, int]], delay: float
) -> None:
    fake = Fake(delay)
    pipeline = Pipeline(fake)

    def caller(i: int, turns: int, count: int) -> list:
        for _ in range(turns):
            gevent.sleep(0)
        return pipeline.exchange(commands(i, count))

    callers = [gevent.spawn(caller, i, t, n) for i, (t, n) in enumerate(arrivals)]
    gevent.joinall(callers, raise_error=True)
    for i, (greenlet, (_, count)) in enumerate(zip(callers, arrivals, strict=True)):
        assert greenlet.value == [n + 1 for _, n in commands(i, count)]
    sent = sorted(c for batch in fake.sent for c in batch)
    assert sent == sorted(c for i, (_, n) in enumerate(arrivals) for c in commands(i, n))
    assert len(fake.sent) <= len(arrivals)  # never more round trips than callers
    assert not pipeline._busy and not pipeline._waiting  # idle once all are answered
