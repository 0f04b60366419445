"""Calls in flight: the maxConcurrent slots and request-id claims one worker holds.

A call takes one of its key's slots (``enter``, or in its admission: ``hold``) and may
claim its request id (``claim``); it gives both back once it is over (``leave``,
``settle``; or in the one write of ``Limiter.finish``, which asks ``released`` and
``settled`` for the operations). The store keeps each for ``INFLIGHT_TTL`` seconds: the
worker extends all it holds every third of that (``keep``), so a killed worker's lapse
within it, and takes again what the store lost while their calls still run. Store keys
are the limiter's to name; every store operation goes through its ``failopen.Guard``.
"""

from __future__ import annotations

import time

import gevent

from gateway.buckets import Claim
from gateway.failopen import KEEP_BATCH, Guard

UNLIMITED = 2**31 - 1  # a slot taken again for a call already running: no limit refuses it


class InFlight:
    """One worker's slots and claims of calls in flight, and the keeper of both."""

    def __init__(self) -> None:
        self._slots: set[tuple[str, str]] = set()  # (key, call uid) held by this worker
        # (claim key, call uid): when (time.monotonic) the call claimed the request id
        self._claims: dict[tuple[str, str], float] = {}

    def configure(self, guard: Guard, ttl: float, dedup_ttl: float) -> None:
        """Hold slots and claims ``ttl`` seconds in ``guard``'s store, answers for repeats
        ``dedup_ttl``; none held yet."""
        self._guard = guard
        self.ttl = ttl
        self.dedup_ttl = dedup_ttl
        self._slots = set()
        self._claims = {}

    # -- slots -------------------------------------------------------------------

    def hold(self, key: str, uid: str) -> None:
        """Call ``uid`` holds a slot in ``key`` (its admission took it, or may have)."""
        self._slots.add((key, uid))

    def enter(self, key: str, uid: str, limit: int) -> bool:
        """Take one of ``limit`` slots in ``key`` for call ``uid``; False if all are taken."""
        store = self._guard.store
        held, _ = self._guard.guarded("enter", (True, 0), store.acquire, key, uid, limit, self.ttl)
        if held:
            self._slots.add((key, uid))
        return held

    def released(self, key: str, uid: str) -> list[tuple[str, tuple]]:
        """Call ``uid``'s slot in ``key`` as no longer held: the operation that gives it
        back to the store (none if this worker does not hold it)."""
        if (key, uid) not in self._slots:
            return []
        self._slots.discard((key, uid))
        return [("release", (key, uid))]

    def leave(self, key: str, uid: str) -> None:
        """Give back call ``uid``'s slot in ``key``."""
        owed = self.released(key, uid)
        if owed:
            self._guard.send_or_owe("leave", self._guard.store.release, owed[0][1], owed)

    # -- request-id claims ---------------------------------------------------------

    def claim(self, key: str, mark: str, uid: str) -> tuple[Claim | None, bool]:
        """Claim request id ``key`` for call ``uid``: (None, unsure) if claimed, else
        (who holds it, False); ``mark`` says since when the store keeps the key's claims
        (``Limiter.claim_unsure``)."""
        ttl = self.ttl
        store = self._guard.store
        holder = self._guard.guarded("claim", None, store.claim, key, uid, ttl, 0.0, mark, ttl)
        unsure = holder is not None and holder.uid == uid
        if holder is None or unsure:
            self._claims[(key, uid)] = time.monotonic()
            return None, unsure
        return holder, False

    def settled(self, key: str, uid: str, answer: str | None) -> list[tuple[str, tuple]]:
        """Call ``uid``'s claim on ``key`` as no longer held: the operation that keeps
        ``answer`` for repeats DEDUP_TTL seconds (None: releases it); none if this worker
        does not hold it."""
        if (key, uid) not in self._claims:
            return []
        del self._claims[(key, uid)]
        if answer is None:
            return [("unclaim", (key, uid))]
        return [("settle", (key, uid, answer, self.dedup_ttl))]

    def settle(self, key: str, uid: str, answer: str | None) -> None:
        """Call ``uid`` is over: keep ``answer`` for repeats of ``key`` (None: release)."""
        owed = self.settled(key, uid, answer)
        if owed:
            name, args = owed[0]
            store = self._guard.store
            self._guard.send_or_owe(
                name, store.unclaim if answer is None else store.settle, args, owed
            )

    # -- keeping them alive ---------------------------------------------------------

    def keep_on(self) -> None:
        """Refresh this worker's slots and claims; a killed worker's lapse after the TTL."""
        while True:
            gevent.sleep(self.ttl / 3)
            self.keep()  # and what is still owed: the store may answer by now

    def keep(self) -> None:
        """Extend each slot and claim this worker holds by the TTL from now, KEEP_BATCH
        of them a round trip. One given back meanwhile is not taken again (the scripts
        extend only what is still held). One the store lost while its call still runs (a
        Redis restarted empty, a replica promoted before it had them) is taken again
        (``_take_again``): else the key's calls in flight went uncounted, and a repeat
        of a running request id was made anew, for as long as the call ran."""
        ttl = self.ttl
        operations = [("refresh", (key, uid, ttl)) for key, uid in self._slots]
        operations += [("keep_claim", (key, uid, ttl)) for key, uid in self._claims]
        lost = []
        for at in range(0, len(operations), KEEP_BATCH):
            batch = operations[at : at + KEEP_BATCH]
            kept = self._guard.guarded("keep", None, self._guard.store.run_all, batch)
            if kept is not None:
                lost += [op for op, held in zip(batch, kept, strict=True) if not held]
        self._take_again(lost)

    def _take_again(self, lost: list[tuple[str, tuple]]) -> None:
        """Hold again what the store lost of calls still in flight here: each slot
        whatever the key's limit (the call runs: it counts), each claim unless another
        call claimed the request id meanwhile. One given back since is left alone: its
        call removed it from this worker's sets before it said so to the store, and what
        this worker sends after that reaches the store after it."""
        ttl = self.ttl
        for name, (key, uid, _) in lost:
            guard = self._guard
            if name == "refresh" and (key, uid) in self._slots:
                guard.guarded("keep", None, guard.store.acquire, key, uid, UNLIMITED, ttl)
            elif name == "keep_claim" and (key, uid) in self._claims:
                age = time.monotonic() - self._claims[(key, uid)]  # started_at stays
                holder = guard.guarded("keep", None, guard.store.claim, key, uid, ttl, age)
                if holder is not None and holder.uid != uid:
                    self._claims.pop((key, uid), None)  # another call holds it now
