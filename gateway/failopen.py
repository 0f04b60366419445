"""Failing open: how the limiter asks a store that may be away, and what it owes one that was.

Every operation of the limiter (``limiter``) goes through one ``Guard`` per worker: when
the store (Redis, the instance store) is away, slower than ``REDIS_TIMEOUT`` or
restarting, the operation allows instead (its caller's fallback), is counted in /metrics,
and a warning is logged at most once a minute; the store is asked again
``REDIS_RETRY_AFTER`` seconds later, so limits hold again as soon as it answers. What a
call gives back (its slot, its request id) and the store did not take is owed: kept, and
sent again before the store's next operation and in the background until a reply says
the store has it (``Guard.owe``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent

from gateway import metrics
from gateway.ratelimit import HARMLESS, StoreDown

# Logged as the limiter, as before it was split: the logs and their readers know that name.
log = logging.getLogger("gateway.limiter")

T = TypeVar("T")
WARN_EVERY = 60.0  # seconds between two warnings that the store is away
# Slots and claims of calls in flight refreshed in one round trip: about 2 ms of Redis's
# time, which nothing else gets meanwhile (this worker's other scripts wait for it too).
KEEP_BATCH = 100
OWED_MAX = 100_000  # such operations kept for the store at most; past it the oldest go
UNSENT = object()  # ``guarded``'s fallback where the caller must know the store failed


class Guard:
    """One worker's view of whether its store answers, and the give-backs it owes it.

    ``background(fn, what)`` runs ``fn`` in the limiter's group (None outside gevent).
    """

    def __init__(
        self,
        store: Any,
        store_name: str,
        retry_after: float,
        background: Callable[[Callable[[], None], str], gevent.Greenlet | None],
    ) -> None:
        self.store = store
        self.store_name = store_name  # for warnings: "Redis", "the instance store"
        self.retry_after = retry_after
        self._background = background
        self.fail_opens = 0
        self.down_until = 0.0  # (time.monotonic) the store is not asked before then
        self._warned_at = -math.inf
        self._unwarned = 0
        self.owed: list[tuple[str, tuple]] = []  # HARMLESS ones the store did not take
        self._paying = False  # ``_pay`` is sending them
        self._payer: gevent.Greenlet | None = None  # sends them while none are sent

    def guarded(self, operation: str, fallback: T, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, or ``fallback`` (failed open, counted as ``operation``) when the
        store is away or fails."""
        if self.down_until > time.monotonic():
            self._failed_open(operation, None)
            return fallback
        try:
            if self.owed:
                self._pay(1)  # first: a slot given back may be what this call needs
            result = fn(*args)
        except StoreDown as exc:
            self.down_until = time.monotonic() + self.retry_after
            self._failed_open(operation, exc)
            return fallback
        if self.down_until:
            self.down_until = 0.0
            log.warning("limiter: %s answers again; limits hold again", self.store_name)
        if self.owed:  # lost in this round trip (a closed connection)
            try:
                self._pay(1)
            except StoreDown as exc:
                self.down_until = time.monotonic() + self.retry_after
                self._failed_open("finish", exc)
        return result

    def posts_lost(self, count: int, again: list[tuple[str, tuple]], exc: Exception) -> None:
        """Finished calls' operations, sent without waiting, failed or went unanswered;
        ``again``: those of them that are harmless to send again (the store's ``on_lost``)."""
        self._failed_open("finish", exc)
        self.owe(again)

    def send_or_owe(
        self,
        operation: str,
        fn: Callable[..., Any],
        args: tuple,
        owed: list[tuple[str, tuple]],
        unsent: Callable[[], None] | None = None,
    ) -> None:
        """``fn(*args)``; if the store did not take it, keep what of it must reach the
        store (``owed``, HARMLESS operations) for when it answers. ``unsent``: called if
        it was not sent at all because the store was known away (the limiter brings a
        spend back from the records then); one whose send failed may have run."""
        # Redis known away: then ``guarded`` does not try (asked only with ``unsent``: a
        # finished call's charge comes here on every call's path)
        away = unsent is not None and self.down_until > time.monotonic()
        if self.guarded(operation, UNSENT, fn, *args) is UNSENT:
            self.owe([op for op in owed if op[0] in HARMLESS])
            if away and unsent is not None:
                unsent()

    def owe(self, operations: list[tuple[str, tuple]]) -> None:
        """Keep slots and request ids to give back before the store's next operation.

        The store may not have taken the give-back (it was away, or the connection it
        was posted on failed), and it may yet run the call's admission or claim: one
        written to a Redis that stalled or froze waits in its socket and runs when it
        resumes, after the worker gave up on it. Either way nobody else would give them
        back, and the key's calls or the request id's repeats were refused (429, 409)
        until their ``INFLIGHT_TTL`` ran out, with nothing in flight. They are sent
        again until a reply says the store has them: first thing in this worker's next
        operation, and every ``REDIS_RETRY_AFTER`` seconds meanwhile (``_pay_later``: a
        slot this worker's late admission holds refuses the calls other workers admit).
        """
        self.owed += operations
        if len(self.owed) > OWED_MAX:
            dropped = len(self.owed) - OWED_MAX
            del self.owed[:dropped]
            log.warning("limiter: %d give-back(s) for Redis dropped (%d kept)", dropped, OWED_MAX)
        idle = self._payer is None or self._payer.dead
        if operations and idle:
            self._payer = self._background(self._pay_later, "giving back")

    def _pay_later(self) -> None:
        """Send what is owed as soon as the store answers, whatever calls come."""
        while self.owed:
            gevent.sleep(max(0.0, self.down_until - time.monotonic()))
            try:
                self._pay()
            except StoreDown:
                self.down_until = time.monotonic() + self.retry_after
            if self.owed:
                gevent.sleep(self.retry_after)

    def _pay(self, rounds: float = math.inf) -> None:
        """Send the owed give-backs, KEEP_BATCH a round trip, in at most ``rounds`` round
        trips (a call pays one, the background the rest); StoreDown (they stay owed) if
        the store fails. Nothing while another greenlet is paying."""
        if self._paying:
            return
        self._paying = True
        try:
            while self.owed and rounds > 0:
                rounds -= 1
                batch = self.owed[:KEEP_BATCH]
                self.store.run_all(batch)
                del self.owed[: len(batch)]  # what others owe meanwhile is appended
        finally:
            self._paying = False

    def _failed_open(self, operation: str, exc: Exception | None) -> None:
        self.fail_opens += 1
        self._unwarned += 1
        metrics.limiter_failed_open(operation)
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "limiter: %s unavailable (%s): %d operation(s) allowed without limits "
                "since the last warning; trying again every %.1f s",
                self.store_name,
                exc or "still failing",
                self._unwarned,
                self.retry_after,
            )
            self._warned_at, self._unwarned = now, 0
