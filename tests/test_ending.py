"""The final-status rule over every ordering of what can happen to a call (SPEC rules 3-7).

Orderings are generated (itertools): any subset of the terminal event, the client
leaving, an upstream failure (mid-answer, or no upstream answering at all), a drain bound
(cancel, DRAIN_TIMEOUT, MAX_DRAINS), the call deadline, shutdown, the upstream's own end
and a gateway bug, in every order the gateway can see them. Each ordering is fed to an
``Ending`` and its verdict is checked against ``TABLE``, written out by hand below with
the SPEC rule behind each row. An ordering's row is found without the code under test:
what ended the call is the first ending event (the upstream's end if none), and the row
depends only on what came before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from gateway.ending import (
    ABORTED,
    BROKE,
    CANCEL,
    COMPLETED,
    DEADLINE,
    DRAIN_TIMEOUT,
    FAILED,
    GATEWAY_ERROR,
    MAX_DRAINS,
    SHUTDOWN,
    UNANSWERED,
    UPSTREAM_END,
    End,
    Ending,
    verdict,
)

ANSWER, LEAVE = "answer", "leave"  # the terminal event; the client leaving
BROKE_REASON = "upstream failed mid-stream: reset: upstream connection broke"
UNANSWERED_REASON = "All upstream providers failed (2 attempts) [p: HTTP 500: x; p: HTTP 500: x]"
BUG_REASON = "gateway error: KeyError('x')"
ENDS = {
    UPSTREAM_END: End(UPSTREAM_END),
    BROKE: End(BROKE, BROKE_REASON),
    UNANSWERED: End(UNANSWERED, UNANSWERED_REASON),
    CANCEL: End.cancel("connection reset"),
    MAX_DRAINS: End.max_drains("connection reset", 200),
    DRAIN_TIMEOUT: End.drain_timeout("connection reset", 300.0),
    DEADLINE: End.deadline(),
    SHUTDOWN: End.shutdown(),
    GATEWAY_ERROR: End(GATEWAY_ERROR, BUG_REASON),
}
BOUNDS = (CANCEL, MAX_DRAINS, DRAIN_TIMEOUT)
READ_TO_END = (ABORTED, "client disconnected; the upstream was read to its end")

# (what ended the call, the answer was whole before that, the client left before the
# answer was whole and before the end) -> (status, error).
TABLE: dict[tuple[str, bool, bool], tuple[str, str | None]] = {
    # Rule 3, last sentence: the terminal event came before any disconnect, so the answer
    # is whole and the call completed; whatever ends it afterwards (the upstream's own
    # end, a reset before EOF, a stop, shutdown) cuts nothing off.
    **{(end, True, False): (COMPLETED, None) for end in ENDS if end != GATEWAY_ERROR},
    # Rules 3 and 4: the client left first and the upstream was still read to its end
    # (to its terminal event): aborted, with the whole answer.
    **{(end, True, True): READ_TO_END for end in ENDS if end != GATEWAY_ERROR},
    # Rule 6: the upstream broke off mid-answer (or ended without its terminal event, or
    # ran past CALL_TIMEOUT, a hard bound on one upstream call) with the client there.
    (UPSTREAM_END, False, False): (FAILED, "upstream ended the stream without its terminal event"),
    (BROKE, False, False): (FAILED, BROKE_REASON),
    (DEADLINE, False, False): (FAILED, "call exceeded CALL_TIMEOUT"),
    # Rule 3: the client left first, so aborted; what happened to the upstream after that
    # is said after it.
    (UPSTREAM_END, False, True): (
        ABORTED,
        "client disconnected; then upstream ended the stream without its terminal event",
    ),
    (BROKE, False, True): (ABORTED, f"client disconnected; then {BROKE_REASON}"),
    (DEADLINE, False, True): (ABORTED, "client disconnected; then call exceeded CALL_TIMEOUT"),
    # Rule 3: past the drain bound (DRAIN_TIMEOUT, MAX_DRAINS), or at once with
    # ON_DISCONNECT=cancel, the upstream is closed and the record says so.
    (CANCEL, False, True): (
        ABORTED,
        "client disconnected (connection reset); upstream cancelled (ON_DISCONNECT=cancel)",
    ),
    (MAX_DRAINS, False, True): (
        ABORTED,
        "client disconnected (connection reset); 200 drains already running (MAX_DRAINS), "
        "upstream closed",
    ),
    (DRAIN_TIMEOUT, False, True): (
        ABORTED,
        "client disconnected (connection reset); drain exceeded DRAIN_TIMEOUT (300 s), "
        "upstream closed",
    ),
    # Rule 5: every candidate failed before the first byte: failed with the attempts,
    # whether or not the client was still waiting (there is no answer to abort).
    (UNANSWERED, False, False): (FAILED, UNANSWERED_REASON),
    (UNANSWERED, False, True): (FAILED, UNANSWERED_REASON),
    # Rule 7: what still runs at graceful_timeout is failed, "gateway shutdown",
    # whoever was connected.
    (SHUTDOWN, False, False): (FAILED, "gateway shutdown"),
    (SHUTDOWN, False, True): (FAILED, "gateway shutdown"),
    # Rule 2: a bug in the gateway still finalises the call, and it cannot vouch for
    # anything it recorded: failed, saying so.
    **{(GATEWAY_ERROR, a, b): (FAILED, BUG_REASON) for a in (False, True) for b in (False, True)},
}


def orderings() -> Iterator[tuple[str, ...]]:
    """Every sequence of distinct events the gateway can see for one call."""
    slots = [
        (ANSWER,),
        (LEAVE,),
        (UPSTREAM_END, BROKE, UNANSWERED),  # at most one way for the upstream to end
        BOUNDS,  # at most one drain bound
        (DEADLINE,),
        (SHUTDOWN,),
        (GATEWAY_ERROR,),
    ]
    for chosen in itertools.product(*[(None, *slot) for slot in slots]):
        events = [e for e in chosen if e is not None]
        for order in itertools.permutations(events):
            if _possible(order):
                yield order


def _possible(order: tuple[str, ...]) -> bool:
    # A drain bound follows the client leaving; no upstream answering rules out an answer.
    bound = next((e for e in order if e in BOUNDS), None)
    if bound and (LEAVE not in order or order.index(LEAVE) > order.index(bound)):
        return False
    return not (UNANSWERED in order and ANSWER in order)


def row_of(order: tuple[str, ...]) -> tuple[str, bool, bool]:
    """The TABLE key of an ordering, read off it directly."""
    events = [*order, UPSTREAM_END] if not any(e in ENDS for e in order) else list(order)
    end_at = next(i for i, e in enumerate(events) if e in ENDS)
    before = events[:end_at]
    answered = ANSWER in before
    left_first = LEAVE in before and (not answered or before.index(LEAVE) < before.index(ANSWER))
    return events[end_at], answered, left_first


def replay(order: tuple[str, ...], late: int = 0) -> Ending:
    """Feed an ordering to an Ending as a call would, event ``i`` happening at time ``i``;
    the upstream's end if nothing ended it.

    The client's leaving is noted ``late`` events after it happened, with the time it
    happened: a departure is confirmed by later probes (``downstream.py``).
    """
    clock = [0.0]
    ending = Ending(lambda: clock[0])
    notes = list(enumerate(order))
    if LEAVE in order:
        left = order.index(LEAVE)
        notes.insert(left + late, notes.pop(left))
    for at, event in notes:
        if event == LEAVE:
            ending.leave(at)
            continue
        clock[0] = at
        if event == ANSWER:
            ending.answer()
        else:
            ending.close(ENDS[event])
    clock[0] = len(order)
    ending.close(ENDS[UPSTREAM_END])  # every call ends; only a first end counts
    return ending


def test_every_ordering_gets_the_status_its_spec_rule_gives() -> None:
    seen: set[tuple[str, bool, bool]] = set()
    count = 0
    for order in orderings():
        key = row_of(order)
        assert verdict(replay(order)) == TABLE[key], f"{order} ({key})"
        seen.add(key)
        count += 1
    assert count > 10_000  # the generator really is exhaustive, not a handful
    assert seen == set(TABLE) - _unreachable(), "a TABLE row no ordering reaches"


def test_a_departure_counts_from_when_it_was_seen_however_late_it_is_confirmed() -> None:
    # A FIN seen before the terminal event is confirmed only by a later probe, after the
    # answer (or the end) was noted: the status is still the one of the order they
    # happened in. A drain bound follows the confirmation, so it is noted after it.
    count = 0
    for order in orderings():
        if LEAVE not in order:
            continue
        left = order.index(LEAVE)
        bound = next((i for i, e in enumerate(order) if e in BOUNDS), len(order) + 1)
        for late in range(1, bound - left):
            assert verdict(replay(order, late)) == TABLE[row_of(order)], f"{order} late {late}"
            count += 1
    assert count > 10_000


def test_whether_an_unconfirmed_departure_would_change_the_verdict() -> None:
    clock = [1.0]
    ending = Ending(lambda: clock[0])
    ending.answer()
    ending.close(ENDS[UPSTREAM_END])
    assert ending.hinges_on(0.5)  # a FIN seen before the answer: aborted, if it was one
    assert not ending.hinges_on(1.0) and not ending.hinges_on(2.0)
    assert verdict(ending) == (COMPLETED, None)  # asking changed nothing
    ending.leave(0.5)
    assert verdict(ending) == READ_TO_END
    unanswered = Ending(lambda: clock[0])
    unanswered.close(ENDS[UNANSWERED])
    assert not unanswered.hinges_on(0.5)  # failed whoever was there


def _unreachable() -> set[tuple[str, bool, bool]]:
    # A drain bound follows the client's departure, so with no answer the client left
    # first; and there is no answer when no upstream answered.
    bounds = {(bound, False, False) for bound in BOUNDS}
    return bounds | {(UNANSWERED, True, left) for left in (False, True)}


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # The cases the server tests drive, spelled out.
        ((ANSWER,), (COMPLETED, None)),
        ((LEAVE, ANSWER), READ_TO_END),
        ((ANSWER, LEAVE), (COMPLETED, None)),
        ((LEAVE, CANCEL, ANSWER), (ABORTED, ENDS[CANCEL].reason)),
        ((BROKE,), (FAILED, BROKE_REASON)),
        ((LEAVE, SHUTDOWN), (FAILED, "gateway shutdown")),
        ((ANSWER, SHUTDOWN), (COMPLETED, None)),
        ((), (FAILED, "upstream ended the stream without its terminal event")),
    ],
)
def test_examples(order: tuple[str, ...], expected: tuple[str, str | None]) -> None:
    assert verdict(replay(order)) == expected


def test_a_call_that_never_noted_its_end_is_failed_not_left_pending() -> None:
    assert verdict(Ending(lambda: 0.0)) == (
        FAILED,
        "gateway error: the call ended without a reason",
    )
