"""How a call ended, and the one rule that turns that into its final status (SPEC rules 3-7).

A call notes what happened, and when, in an ``Ending``: the upstream's answer came whole
(its terminal event, or the whole JSON body), the client left, and what ended the call
(an ``End``): the upstream's own end, no upstream answering at all, the upstream failing
mid-answer, a stop by the gateway (cancel or a drain bound once the client left, the
call deadline, shutdown), or a bug. The first end counts, and nothing that happened
after it changes anything. A departure is known only once probes confirm it, later than
it happened: it is noted with the time the FIN or reset was seen, and ordered by that
time. ``verdict`` turns an ``Ending`` into the status and error the record gets. Pure
code: no I/O, and the clock is the caller's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

COMPLETED, FAILED, ABORTED = "completed", "failed", "aborted"

# What can end a call.
UPSTREAM_END = "upstream_end"  # the upstream's bytes ended
UNANSWERED = "unanswered"  # no upstream answered: every candidate failed, or one refused
BROKE = "broke"  # the upstream failed mid-answer: a reset, a stall, an error event
CANCEL = "cancel"  # the client left and ON_DISCONNECT=cancel closed the upstream
MAX_DRAINS = "max_drains"  # the client left with MAX_DRAINS drains running: closed
DRAIN_TIMEOUT = "drain_timeout"  # the client left and the drain ran out of time: closed
DEADLINE = "deadline"  # the call ran past CALL_TIMEOUT
SHUTDOWN = "shutdown"  # the worker stopped it at graceful_timeout
GATEWAY_ERROR = "gateway_error"  # a bug in the gateway
DRAIN_BOUNDS = frozenset({CANCEL, MAX_DRAINS, DRAIN_TIMEOUT})

LEFT = "client disconnected"
NO_TERMINAL = "upstream ended the stream without its terminal event"


@dataclass(frozen=True, slots=True)
class End:
    """What ended a call, and the reason its record gives."""

    kind: str
    reason: str | None = None

    @classmethod
    def cancel(cls, how: str) -> End:
        """The client left (``how``) and the upstream was closed at once."""
        return cls(CANCEL, f"{LEFT} ({how}); upstream cancelled (ON_DISCONNECT=cancel)")

    @classmethod
    def max_drains(cls, how: str, cap: int) -> End:
        """The client left while ``cap`` drains were running: no drain for this one."""
        return cls(
            MAX_DRAINS,
            f"{LEFT} ({how}); {cap} drains already running (MAX_DRAINS), upstream closed",
        )

    @classmethod
    def drain_timeout(cls, how: str, seconds: float) -> End:
        """The client left and the drain outlived DRAIN_TIMEOUT."""
        return cls(
            DRAIN_TIMEOUT,
            f"{LEFT} ({how}); drain exceeded DRAIN_TIMEOUT ({seconds:g} s), upstream closed",
        )

    @classmethod
    def deadline(cls) -> End:
        """The call ran past CALL_TIMEOUT."""
        return cls(DEADLINE, "call exceeded CALL_TIMEOUT")

    @classmethod
    def shutdown(cls) -> End:
        """The worker stopped the call at shutdown."""
        return cls(SHUTDOWN, "gateway shutdown")


class Ending:
    """The facts of one call's end, each with the time it happened (``clock``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.answered_at: float | None = None  # the upstream's answer came whole
        self.left_at: float | None = None  # the client left
        self.end: End | None = None
        self.ended_at: float | None = None

    @property
    def answered(self) -> bool:
        """The upstream's answer came whole before the call ended."""
        return self.answered_at is not None

    @property
    def left_first(self) -> bool:
        """The client left before the answer was whole (and before the end)."""
        return self.left_at is not None and (
            self.answered_at is None or self.left_at < self.answered_at
        )

    def answer(self) -> None:
        """The upstream's terminal event (or whole JSON answer) arrived."""
        if self.end is None and self.answered_at is None:
            self.answered_at = self._clock()

    def leave(self, at: float | None = None) -> None:
        """The client left, at ``at`` (when its FIN or reset was seen; default now)."""
        at = self._clock() if at is None else at
        if self.left_at is None and (self.ended_at is None or at < self.ended_at):
            self.left_at = at

    def close(self, end: End) -> None:
        """The call ended; the first end counts."""
        if self.end is None:
            self.end, self.ended_at = end, self._clock()

    def hinges_on(self, at: float) -> bool:
        """Whether a departure at ``at``, not known yet, would change the verdict."""
        left = copy.copy(self)
        left.leave(at)
        return verdict(left) != verdict(self)


def verdict(ending: Ending) -> tuple[str, str | None]:
    """The final status and error of a call, from how it ended."""
    end = ending.end or End(GATEWAY_ERROR, "gateway error: the call ended without a reason")
    if end.kind == GATEWAY_ERROR:  # rule 2: finalised even then, and nothing vouched for
        return FAILED, end.reason
    if ending.answered:  # rule 3: the answer was whole; what ended the call then cut nothing
        if ending.left_first:
            return ABORTED, f"{LEFT}; the upstream was read to its end"
        return COMPLETED, None
    if end.kind == SHUTDOWN:  # rule 7: whoever was connected
        return FAILED, end.reason
    if end.kind == UNANSWERED:  # rule 5: there is no answer to abort
        return FAILED, end.reason
    if end.kind in DRAIN_BOUNDS:  # rule 3: past the bound the upstream is closed; say so
        return ABORTED, end.reason
    reason = end.reason or NO_TERMINAL  # the upstream broke, ended early, or ran too long
    if ending.left_first:  # rules 3 and 4: the client left first
        return ABORTED, f"{LEFT}; then {reason}"
    return FAILED, reason  # rule 6
