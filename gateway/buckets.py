"""Token buckets, in-flight slots, request claims, totals: the arithmetic, an in-memory store.

This is the reference for the Lua scripts in ``gateway/lua/``: each step here has its
line there, in the same order, on the same IEEE doubles, so the in-process store
(``LocalStore``, one worker process, no Redis) and the shared one (``ratelimit.RedisStore``)
decide alike. Tests run the same scenarios against both and compare.

A bucket holds up to ``capacity`` tokens and refills continuously at ``rate`` per second
(``capacity = limit``, ``rate = limit / 60`` for a per-minute limit: no burst multiplier).
It may go below zero: a call charged more tokens than were left leaves a debt that later
calls wait out, so over any long window a key uses no more than its limit allows.
Pure code: the clock is passed in; no I/O, no gevent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

# Seconds a bucket's state outlives the moment it would be full again (it is full from
# then on whether stored or not), and a slot set outlives its newest slot.
EXPIRY_MARGIN = 60.0
# Seconds a key's claims mark outlives its last claim (claims.lua's MARK_KEPT).
MARK_KEPT = 7 * 86400.0
# ``LocalStore`` forgets every expired entry after as many writes as it held entries
# when it last began to (``PURGE_WRITES`` at least), or on the first write
# ``PURGE_EVERY`` seconds after, whichever comes first; ``PURGE_SLICE`` entries per
# write, so that no write waits for all of them (120,000 entries held a write 65 ms:
# in the instance store, every worker's limits waited as long).
PURGE_WRITES = 10_000
PURGE_EVERY = 60.0
PURGE_SLICE = 64


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket to decide on: its name under an owner, its size, refill rate and cost.

    ``cost`` is what ``admit`` takes: 1 for a request; 0 means "take nothing, only
    require the level above 0" (the TPM check before a call whose size is unknown).
    """

    name: str
    capacity: float
    rate: float  # tokens per second
    cost: float = 1.0

    def __post_init__(self) -> None:
        if not (self.capacity > 0 and self.rate > 0 and self.cost >= 0):
            raise ValueError(f"bucket {self.name!r}: capacity and rate must be > 0, cost >= 0")


@functools.lru_cache(maxsize=4096)
def per_minute(name: str, limit: float, cost: float = 1.0) -> Bucket:
    """A bucket for ``limit`` per minute: capacity ``limit``, refilled at limit/60 per second.

    Kept (a bucket is frozen): each call asks for its key's RPM and TPM buckets, and a
    frozen dataclass with its check costs about 2 µs to make.
    """
    return Bucket(name, float(limit), float(limit) / 60.0, cost)


# An in-flight slot to take with an admission: slot set key, member, limit, ttl seconds.
Slot = tuple[str, str, int, float]
# A budget an admission must be under: the key of a running total, the limit the total
# must stay below (an integer, as totals are), and the key of the total's mark: set when
# an admission finds it unset, for the seconds given, its caller then raises the total to
# the records' figure (``Verdict.seed``).
Budget = tuple[str, int, str, float]


@dataclass(frozen=True, slots=True)
class Verdict:
    """An admission decision over several buckets, taken or refused as one."""

    allowed: bool
    levels: tuple[float, ...]  # each bucket's level after the decision
    wait: float = 0.0  # seconds until the refusing bucket would allow (0 when allowed)
    # Index of that bucket (the longest wait); len(buckets): the slot; + 1: the budget.
    refused: int | None = None
    spent: int | None = None  # the budget's total when it was asked (None: no budget)
    # The budget's mark was unset (set now): the caller is to raise the total to what
    # the records say (``Limiter.admit``); no other admission is told until it lapses.
    seed: bool = False

    @property
    def retry_after(self) -> int:
        """Whole seconds for a Retry-After header: at least 1."""
        return max(1, math.ceil(self.wait))


State = tuple[float, float]  # (level, time of that level)


def refill(state: State | None, now: float, capacity: float, rate: float) -> State:
    """The bucket's level at ``now``: a missing bucket is full; time never runs back."""
    if state is None:
        return capacity, now
    level, stamp = state
    if now > stamp:
        level = level + (now - stamp) * rate
        stamp = now
    if level > capacity:
        level = capacity
    return level, stamp


def allows(level: float, cost: float) -> bool:
    """True when a bucket at ``level`` can pay ``cost`` (cost 0: the level is above 0)."""
    return level >= cost if cost > 0 else level > 0


def admit(levels: Sequence[float], buckets: Sequence[Bucket]) -> Verdict:
    """Take every bucket's cost if all can pay it, else refuse saying how long to wait."""
    allowed, wait, refused = True, 0.0, None
    for i, (level, bucket) in enumerate(zip(levels, buckets, strict=True)):
        if not allows(level, bucket.cost):
            allowed = False
            needed = (bucket.cost - level) / bucket.rate
            if refused is None or needed > wait:
                wait, refused = needed, i
    if not allowed:
        return Verdict(False, tuple(levels), wait, refused)
    return Verdict(True, tuple(lv - b.cost for lv, b in zip(levels, buckets, strict=True)))


def charge(level: float, amount: float, capacity: float) -> float:
    """The level after taking ``amount`` (negative: a refund, never above capacity)."""
    level = level - amount
    if level > capacity:
        level = capacity
    return level


def lifetime(level: float, capacity: float, rate: float) -> float:
    """Seconds a stored bucket must be kept: until it would be full, plus a margin."""
    return (capacity - level) / rate + EXPIRY_MARGIN


@dataclass(frozen=True, slots=True)
class Claim:
    """Who holds a request id: the holding call's uid and when (store clock) it started.

    ``answer`` is what the holder settled the claim with once its call was over (the
    stored answer a repeat replays); None while the call is still in flight. A claimer
    told that it holds the id itself did claim it, on a store that may have lost the
    claim of a call still in flight (``RedisStore.claim``'s ``mark``).
    """

    uid: str
    started: float
    now: float  # the store's clock when this was read
    answer: str | None = None

    @property
    def age(self) -> float:
        """Seconds since the holder started."""
        return max(0.0, self.now - self.started)


class LocalStore:
    """The store operations in this process's memory, on the clock it is given.

    Same operations and results as ``ratelimit.RedisStore``; state lives in dicts that
    forget expired entries as they are touched, and all of them once the writes of any
    kind since the last purge began outnumber the entries it found (``PURGE_WRITES`` at
    least), or ``PURGE_EVERY`` seconds later (a gateway with no RPM limit writes no
    bucket, and its request ids' answers are whole answers): ``PURGE_SLICE`` of them per
    write, so a write pays about one check over time while writes come often.
    ``marks``: keep claims.lua's mark of when the store first took a claim of a key's
    ids (``claim``), as a store that may start empty while calls are in flight must
    (``instancestore``: one for the workers of one instance). A worker's own memory
    starts empty only with the worker, and with it its calls.
    """

    def __init__(self, clock: Callable[[], float], marks: bool = False) -> None:
        self.clock = clock
        self.marks = marks
        self._buckets: dict[str, tuple[float, float, float]] = {}  # key -> level, stamp, expiry
        self._slots: dict[str, dict[str, float]] = {}  # key -> member -> expiry
        # key -> uid, started, expiry, answer (None while the call is in flight)
        self._claims: dict[str, tuple[str, float, float, str | None]] = {}
        self._totals: dict[str, tuple[int, float]] = {}  # key -> total, expiry
        self._marks: dict[str, float] = {}  # key -> expiry
        self._claims_since: dict[str, tuple[float, float]] = {}  # mark -> since, expiry
        self._writes, self._purge_after = 0, PURGE_WRITES
        self._purge_at = clock() + PURGE_EVERY
        self._purging: Iterator[None] | None = None

    # -- buckets ---------------------------------------------------------------

    def _state(self, key: str, now: float) -> State | None:
        held = self._buckets.get(key)
        if held is None or held[2] <= now:
            return None
        return held[0], held[1]

    def _store(self, key: str, level: float, stamp: float, bucket: Bucket) -> None:
        expiry = stamp + lifetime(level, bucket.capacity, bucket.rate)
        self._buckets[key] = (level, stamp, expiry)
        self._wrote(stamp)

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._purging is None:
            if self._writes < self._purge_after and now < self._purge_at:
                return
            self._writes, self._purge_at = 0, now + PURGE_EVERY
            self._purging = self._purge()
        if next(self._purging, StopIteration) is StopIteration:
            self._purging = None

    def admit(
        self,
        keys: Sequence[str],
        buckets: Sequence[Bucket],
        slot: Slot | None = None,
        budget: Budget | None = None,
    ) -> Verdict:
        """Take each bucket's cost and the slot, all or none.

        ``slot`` (key, member, limit, ttl): also hold one of ``limit`` in-flight slots
        (``acquire``). A full slot set refuses first, as ``refused == len(buckets)``,
        taking nothing. ``budget`` (total key, limit): refuse, before anything else and
        taking nothing, unless the total is below the limit (``refused ==
        len(buckets) + 1``); the verdict says the total it read, and sets the budget's
        mark if it was unset (``seed``).
        """
        now = self.clock()
        states = [
            refill(self._state(k, now), now, b.capacity, b.rate)
            for k, b in zip(keys, buckets, strict=True)
        ]
        levels = tuple(s[0] for s in states)
        spent, seed = None, False
        if budget is not None:
            spent = self.total(budget[0])
            seed = self._marks.get(budget[2], -math.inf) <= now
            if seed:
                self._marks[budget[2]] = now + budget[3]
            if not spent < budget[1]:
                return Verdict(False, levels, 0.0, len(buckets) + 1, spent, seed)
        slots = None
        if slot is not None:
            slots = self._live_slots(slot[0], now)
            if slot[1] not in slots and len(slots) >= slot[2]:
                return Verdict(False, levels, 0.0, len(buckets), spent, seed)
        verdict = admit(levels, buckets)
        if verdict.allowed:
            for key, (_, stamp), level, bucket in zip(
                keys, states, verdict.levels, buckets, strict=True
            ):
                if bucket.cost:  # one that pays nothing (the TPM check) is left as it was
                    self._store(key, level, stamp, bucket)
            if slot is not None and slots is not None:
                slots[slot[1]] = now + slot[3]
                self._slots[slot[0]] = slots
                self._wrote(now)
        if spent is not None:
            verdict = replace(verdict, spent=spent, seed=seed)
        return verdict

    def charge(self, key: str, bucket: Bucket, amount: float) -> float:
        """Take ``amount`` tokens (a debt if there are fewer); return the level."""
        now = self.clock()
        level, stamp = refill(self._state(key, now), now, bucket.capacity, bucket.rate)
        level = charge(level, amount, bucket.capacity)
        self._store(key, level, stamp, bucket)
        return level

    def peek(self, keys: Sequence[str], buckets: Sequence[Bucket]) -> tuple[float, ...]:
        """Each bucket's level now, changing nothing."""
        now = self.clock()
        return tuple(
            refill(self._state(k, now), now, b.capacity, b.rate)[0]
            for k, b in zip(keys, buckets, strict=True)
        )

    # -- in-flight slots -------------------------------------------------------

    def _live_slots(self, key: str, now: float) -> dict[str, float]:
        slots = self._slots.get(key, {})
        for member in [m for m, expiry in slots.items() if expiry <= now]:
            del slots[member]
        return slots

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> tuple[bool, int]:
        """Hold one of ``limit`` slots for ``ttl`` seconds; return (held, slots in use)."""
        now = self.clock()
        slots = self._live_slots(key, now)
        if member not in slots and len(slots) >= limit:
            return False, len(slots)
        slots[member] = now + ttl
        self._slots[key] = slots
        self._wrote(now)
        return True, len(slots)

    def refresh(self, key: str, member: str, ttl: float) -> bool:
        """Extend a held slot by ``ttl`` from now; False if it had expired."""
        now = self.clock()
        slots = self._live_slots(key, now)
        if member not in slots:
            return False
        slots[member] = now + ttl
        return True

    def release(self, key: str, member: str) -> int:
        """Give a slot back; return the slots still in use."""
        slots = self._live_slots(key, self.clock())
        slots.pop(member, None)
        if not slots:
            self._slots.pop(key, None)
        return len(slots)

    # -- request claims --------------------------------------------------------

    def claim(
        self,
        key: str,
        uid: str,
        ttl: float,
        age: float = 0.0,
        mark: str | None = None,
        grace: float = 0.0,
    ) -> Claim | None:
        """Claim a request id for call ``uid``; None if claimed, else the current holder.

        ``age``: seconds ``uid`` has held the id already (a claim taken again after the
        store lost it): the claim says it started then, not now. ``mark`` and ``grace``
        (with ``marks``, else ignored): a claim taken within ``grace`` seconds of the
        store's first claim of the key's ids answers ``uid`` itself as the holder, as
        claims.lua does (``RedisStore.claim``: a store started empty may have lost the
        claim of a call still in flight)."""
        now = self.clock()
        held = self._claims.get(key)
        if held is not None and held[2] > now:
            return Claim(held[0], held[1], now, held[3])
        started = now - max(0.0, age)
        self._claims[key] = (uid, started, now + ttl, None)
        self._wrote(now)
        if mark is not None and self.marks:
            since = self._claims_since.get(mark)
            since = now if since is None or since[1] <= now else since[0]
            self._claims_since[mark] = (since, now + MARK_KEPT)
            if now - since < grace:
                return Claim(uid, started, now)
        return None

    def _held_by(self, key: str, uid: str, now: float) -> tuple | None:
        """``uid``'s claim on ``key`` if ``uid`` is its live, unsettled holder at ``now``
        (claims.lua's ``live`` and holder test: a lapsed claim is nobody's, whether or
        not a purge forgot it yet), else None."""
        held = self._claims.get(key)
        if held is None or held[2] <= now or held[0] != uid or held[3] is not None:
            return None
        return held

    def keep_claim(self, key: str, uid: str, ttl: float) -> bool:
        """Extend ``uid``'s claim by ``ttl`` from now; False if it is not the holder."""
        now = self.clock()
        held = self._held_by(key, uid, now)
        if held is None:
            return False
        self._claims[key] = (uid, held[1], now + ttl, None)
        return True

    def settle(self, key: str, uid: str, answer: str, ttl: float) -> bool:
        """Keep ``answer`` under ``uid``'s claim for ``ttl`` from now; False if not the holder."""
        now = self.clock()
        held = self._held_by(key, uid, now)
        if held is None:
            return False
        self._claims[key] = (uid, held[1], now + ttl, answer)
        return True

    def unclaim(self, key: str, uid: str) -> bool:
        """Release ``uid``'s claim (not a settled one); False if it was not the live holder."""
        if self._held_by(key, uid, self.clock()) is None:
            return False
        del self._claims[key]
        return True

    def run_all(self, operations: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Several operations (``(method name, args)``) in turn; their results."""
        return [getattr(self, name)(*args) for name, args in operations]

    def post_all(self, operations: Sequence[tuple[str, tuple]]) -> None:
        """``run_all``, results unread (``RedisStore.post_all``: here nothing is waited for)."""
        self.run_all(operations)

    # -- running totals (spend per month) ----------------------------------------

    def add(self, key: str, amount: int, ttl: float) -> int:
        """Add ``amount`` to a total kept ``ttl`` seconds from now; return the total."""
        total, now = self.total(key) + amount, self.clock()
        self._totals[key] = (total, now + ttl)
        self._wrote(now)
        return total

    def raise_to(self, key: str, amount: int, ttl: float) -> int:
        """Raise a total to ``amount`` if it is below (never lower it), kept ``ttl``
        seconds from now; return the total."""
        total, now = max(self.total(key), amount), self.clock()
        self._totals[key] = (total, now + ttl)
        self._wrote(now)
        return total

    def total(self, key: str) -> int:
        """A total (0 when there is none)."""
        held = self._totals.get(key)
        return 0 if held is None or held[1] <= self.clock() else held[0]

    def _purge(self) -> Iterator[None]:
        """Forget every expired entry, ``PURGE_SLICE`` at a time: one slice per step."""
        tables: list[tuple[dict[str, Any], Callable[[str, Any, float], bool]]] = [
            (self._buckets, lambda _, v, now: v[2] <= now),
            (self._claims, lambda _, v, now: v[2] + EXPIRY_MARGIN <= now),
            (self._totals, lambda _, v, now: v[1] <= now),
            (self._marks, lambda _, v, now: v <= now),
            (self._claims_since, lambda _, v, now: v[1] <= now),
            (self._slots, lambda k, _, now: not self._live_slots(k, now)),
        ]
        self._purge_after = max(PURGE_WRITES, sum(len(table) for table, _ in tables))
        for table, expired in tables:
            names = list(table)  # entries written meanwhile wait for the next purge
            for start in range(0, len(names), PURGE_SLICE):
                now = self.clock()
                for name in names[start : start + PURGE_SLICE]:
                    held = table.get(name)
                    if held is not None and expired(name, held, now):
                        del table[name]
                yield
