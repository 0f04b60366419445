"""A worker's limiter: what the call path, sign-in and key changes ask of shared state.

One ``Limiter`` per worker process (``limiter``), on the shared store (``ratelimit``,
with ``REDIS_URL``), else on the store process of this instance's workers
(``instancestore``, with more than one worker) or on this process's memory
(``buckets.LocalStore``); a warning at start says how far limits then hold. It names
the state (``gw:{key:42}:rpm``: all of a key's state under one hash tag), turns a key's
limits into buckets, has the slots and request-id claims of calls in flight held and
kept alive (``inflight``: a killed worker's lapse within ``INFLIGHT_TTL``), totals each
key's spend per calendar month (UTC) for its budget
(raised to the records' figure when the store may not have it: ``spend``),
takes a large RPM limit's requests ahead in leases so that most calls admit with no round
trip (``leases``, which says what that changes), and fails open (``failopen``): when the
store is away an operation allows, is counted in /metrics, and a warning is logged at
most once a minute; what a call gives back and the store did not take is sent later.
Key changes go to every worker on the store's channel (``keychanges``: announcing,
listening, re-subscribing, a call's catch-up).

Greenlets (slot keeper, key-change listener, leases) run only in a gevent process, in one
group, each linked to a logger.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import gevent
import gevent.pool
from gevent import monkey

from gateway import instancestore, leases, metrics, pricing
from gateway.buckets import Bucket, Claim, LocalStore, per_minute
from gateway.config import DEFAULTS
from gateway.errors import BudgetExceeded
from gateway.failopen import UNSENT, Guard
from gateway.inflight import InFlight
from gateway.keychanges import KeyChanges
from gateway.ratelimit import open_store

log = logging.getLogger(__name__)

SPEND_TTL = 40 * 86400.0  # a month's spend outlives the month, whatever day it started
# Seconds between two raises of a key's spend to the records' figure. In Redis the
# spend is every instance's and outlives workers: it needs the records only for what
# Redis lost (a restart, which takes the marks too: the next admission raises it; a
# send that failed on its way), and a raise is a query over the key's month of records.
# In a worker's memory it is the worker's own: the records bring the others' spend.
SEED_SHARED_EVERY = 600.0
SEED_EVERY_MIN = 1.0  # in memory: CACHE_TTL, at least this
# Announced by a charge that leaves a key's TPM bucket near empty: "tpm-low:<key id>".
TPM_LOW = "tpm-low:"
# What a fail-open is counted as in /metrics (gateway_limiter_fail_open_total's label).
OPERATIONS = (
    "admit", "lease", "charge", "finish", "usage", "enter", "leave", "claim", "unclaim",
    "settle", "keep", "spend", "spent", "seed", "attempt", "announce",
)  # fmt: skip


def _whole(x: float) -> float:
    return round(x, 6)  # refill arithmetic leaves 19.999999999999996 where 20 is meant


def remaining(level: float) -> int:
    """Whole tokens left in a bucket at ``level`` (0 when in debt)."""
    return max(0, math.floor(_whole(level)))


def over_budget(spent: int, budget_usd: float, now: datetime) -> BudgetExceeded:
    """The refusal of a key that spent ``spent`` nano-USD of its monthly budget (402),
    until the month after ``now`` (UTC)."""
    month_end = (now.replace(day=1) + timedelta(days=32)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    return BudgetExceeded(
        f"Budget exceeded: this key has spent ${pricing.usd(spent):.6f} of its"
        f" ${budget_usd:g} budget for {now:%B %Y} (UTC); calls are refused until"
        f" {month_end:%Y-%m-%d} 00:00 UTC or a larger budget",
        retry_after=math.ceil((month_end - now).total_seconds()),
    )


def model_bucket(identifier: str, limit: float, refill: float) -> Bucket:
    """A per-model limit as ``/ratelimits`` configures it: ``limit`` burst, ``refill``/s."""
    return Bucket(f"model:{identifier}", float(limit), float(refill))


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to "may this key make a call now", with what its headers report."""

    allowed: bool
    rpm_limit: int | None
    rpm_remaining: int | None
    tpm_limit: int | None
    tpm_remaining: int | None
    limit_type: str | None = None  # what refused: "rpm", "tpm", "model:<id>", "concurrency"
    retry_after: int = 0  # whole seconds until the refusing bucket allows
    failed_open: bool = False

    def headers(self) -> dict[str, str]:
        """The X-RateLimit-* headers every /v1 answer carries (for the limits a key has)."""
        out = {}
        for kind, limit, left in (
            ("RPM", self.rpm_limit, self.rpm_remaining),
            ("TPM", self.tpm_limit, self.tpm_remaining),
        ):
            if limit is not None:
                out[f"X-RateLimit-Limit-{kind}"] = str(limit)
                out[f"X-RateLimit-Remaining-{kind}"] = str(left)
        return out


class Limiter:
    """Traffic-control decisions for one worker process; fails open when the store is away."""

    def __init__(self) -> None:
        self._group = gevent.pool.Group()
        # Slots and request-id claims of calls in flight; its keeper outlives ``configure``.
        self._inflight = InFlight()
        # Announces key changes and hears others'; its callbacks outlive ``configure``.
        self._changes = KeyChanges(self._background, self._heard_for_leases, self._inflight.keep)
        # Asked to read a key's spend in a month from the records (``seed_spend``).
        self.on_unseeded: Callable[[int, datetime], None] = lambda key_id, now: None
        self.configure({})

    def configure(self, config: Mapping[str, Any], clock: Callable[[], float] = time.time) -> None:
        """Take settings (REDIS_URL and the limiter's keys); connect lazily to the store."""
        cfg = {**DEFAULTS, **config}
        self.store: Any = open_store(cfg) or instancestore.open_store(cfg) or LocalStore(clock)
        # Shared by every worker (and with Redis every instance): announcements, leases.
        self.shared = not isinstance(self.store, LocalStore)
        store_name = (
            "the instance store" if isinstance(self.store, instancestore.InstanceStore) else "Redis"
        )
        self.retry_after = float(cfg["REDIS_RETRY_AFTER"])
        # Every operation on the store, failing open; give-backs it did not take.
        self._guard = Guard(self.store, store_name, self.retry_after, self._background)
        if self.shared:
            self.store.on_lost = self._guard.posts_lost
        self.prefix = str(cfg["REDIS_PREFIX"])
        self._changes.configure(self._guard, self.prefix, self.shared)
        self.inflight_ttl = float(cfg["INFLIGHT_TTL"])
        self._inflight.configure(self._guard, self.inflight_ttl, float(cfg["DEDUP_TTL"]))
        self.seed_every = (
            SEED_SHARED_EVERY if self.shared else max(SEED_EVERY_MIN, float(cfg["CACHE_TTL"]))
        )
        # Leases only where a round trip is what they save, and something runs them.
        self.lease_share = float(cfg["LIMIT_LEASE_SHARE"]) if self.shared else 0.0
        if not monkey.is_module_patched("socket"):
            self.lease_share = 0.0
        self._holdings: dict[int, leases.Holding] = {}  # key id -> its leases here
        self.login = Bucket(
            "auth",
            float(cfg["LOGIN_ATTEMPTS"]),
            float(cfg["LOGIN_ATTEMPTS"]) / float(cfg["LOGIN_WINDOW"]),
        )
        self._keys: dict[tuple[int, str], str] = {}  # (key id, bucket or set name) -> store key
        # spend key -> the highest total the store answered for it: the key's spend is
        # at least that, whatever becomes of the store (``admit`` while it is away)
        self._spent_seen: dict[str, int] = {}
        # key id -> a time in the month whose spend was not sent (Redis was known away)
        self._unsent_spend: dict[int, datetime] = {}
        self._reseeder: gevent.Greenlet | None = None  # has it seeded once Redis answers

    def init_app(self, app: Any) -> None:
        """Configure from the app; start the keeper and listener in a gevent worker."""
        self.configure(app.config)
        metrics.limiter_operations(OPERATIONS)
        if isinstance(self.store, LocalStore):
            log.warning(
                "REDIS_URL is not set: rate limits, concurrency limits, request dedup and "
                "sign-in throttling hold per worker process, not across workers or instances"
            )
        elif isinstance(self.store, instancestore.InstanceStore):
            log.warning(
                "REDIS_URL is not set: rate limits, concurrency limits, request dedup and "
                "sign-in throttling hold across this instance's workers (its store "
                "process), not across instances"
            )
        if monkey.is_module_patched("socket"):
            self.start()

    def start(self) -> None:
        """Run the slot keeper (and the key-change listener, with Redis) in the background."""
        self.stop()
        self._spawn(self._inflight.keep_on)
        if self.shared:
            self._spawn(self._changes.listen)

    def stop(self) -> None:
        """Stop the background greenlets; leases give back what they left unused, and
        charges waiting to share a frame (``instancestore``) are sent."""
        self._group.kill(block=True)
        self._holdings = {}
        flush = getattr(self.store, "flush", None)
        if flush is not None:
            self._guard.guarded("finish", None, flush)

    def _spawn(self, fn: Callable[[], None], what: str = "a greenlet") -> gevent.Greenlet:
        """``fn`` in this limiter's group, its death logged as ``what``'s."""
        greenlet = self._group.spawn(fn)
        greenlet.link_exception(lambda g: log.error("limiter: %s died", what, exc_info=g.exc_info))
        return greenlet

    def _background(self, fn: Callable[[], None], what: str) -> gevent.Greenlet | None:
        """``fn`` running in the background (in a gevent process; else None)."""
        return self._spawn(fn, what) if monkey.is_module_patched("socket") else None

    @property
    def fail_opens(self) -> int:
        """Operations allowed without limits (the store away) since ``configure``."""
        return self._guard.fail_opens

    def key(self, owner: str, name: str) -> str:
        """The store key of ``name`` under ``owner``'s hash tag (one Cluster slot per owner)."""
        return f"{self.prefix}:{{{owner.replace('{', '(').replace('}', ')')}}}:{name}"

    def _of_key(self, key_id: int, name: str) -> str:
        """The store key of an API key's bucket or slot set ``name``, kept: every call
        names its key's two or three of them twice."""
        known = self._keys.get((key_id, name))
        if known is None:
            known = self.key(f"key:{key_id}", name)
            if len(self._keys) >= 10_000:
                self._keys.clear()
            self._keys[key_id, name] = known
        return known

    # -- per-key limits --------------------------------------------------------

    def admit(
        self,
        key_id: int,
        rpm: int | None,
        tpm: int | None,
        extra: Sequence[Bucket] = (),
        slot: tuple[str, int] | None = None,
        budget: float | None = None,
        now: datetime | None = None,
    ) -> Admission:
        """Take one request from the key's RPM bucket if its TPM bucket is above 0 (atomic).

        ``slot`` (call uid, the key's maxConcurrent): take one of the key's in-flight slots
        in the same step (one round trip); a full set refuses as ``"concurrency"``.
        ``budget`` (USD a month): a key that spent it this month (``now``'s, UTC) is
        refused first, taking nothing, by raising BudgetExceeded; in the same step. The
        step also says when the store's spend has not been raised to the records' figure
        for ``seed_every`` seconds (a restarted Redis has none): ``on_unseeded`` is told,
        and reads it in the background (``seed_spend``); this call goes on meanwhile.
        """
        named: list[tuple[str, Bucket]] = []
        if rpm and rpm > 0:
            named.append(("rpm", per_minute("rpm", rpm)))
        if tpm and tpm > 0:
            named.append(("tpm", per_minute("tpm", tpm, cost=0)))
        named += [(b.name, b) for b in extra]
        rpm, tpm = (rpm if rpm and rpm > 0 else None), (tpm if tpm and tpm > 0 else None)
        held = None
        if slot is not None and slot[1] and slot[1] > 0:
            held = (self._of_key(key_id, "inflight"), slot[0], slot[1], self.inflight_ttl)
        spend = None
        if budget is not None:
            now = now or datetime.now(UTC)
            total = self._spend_key(key_id, now)
            # A total below budget_usd * 1e9 is below its ceiling (totals are whole).
            limit = max(0, math.ceil(budget * 1e9))
            spend = (total, limit, f"{total}:seeded", self.seed_every)
        if not named and held is None and spend is None:
            return Admission(True, None, None, None, None)
        holding = self._holding(key_id, rpm, tpm, not extra and held is None and spend is None)
        if holding is not None:
            taken = holding.take(time.monotonic())
            self._renew(key_id, holding)
            if taken is not None:
                return Admission(True, rpm, taken[0], tpm, taken[1])
        keys = [self._of_key(key_id, name) for name, _ in named]
        buckets = [b for _, b in named]
        asked = time.monotonic()
        verdict = self._guard.guarded("admit", None, self.store.admit, keys, buckets, held, spend)
        if holding is not None and verdict is not None:
            holding.seen(verdict.levels, asked, time.monotonic())
            self._renew(key_id, holding)
        if verdict is None:
            if held is not None:  # the store may yet run it: given back as if held
                self._inflight.hold(held[0], held[1])
            if spend is not None and self._spent_seen.get(spend[0], 0) >= spend[1]:
                # Known spent: a month's spend only grows, so this is no guess (a key
                # over its budget spent $7.60 in the second Redis was away, at 16 clients).
                assert budget is not None and now is not None
                raise over_budget(self._spent_seen[spend[0]], budget, now)
            return Admission(True, rpm, rpm, tpm, tpm, failed_open=True)
        if spend is not None:
            assert now is not None and verdict.spent is not None
            if verdict.spent > self._spent_seen.get(spend[0], 0):
                if len(self._spent_seen) >= 10_000:
                    self._spent_seen.clear()
                self._spent_seen[spend[0]] = verdict.spent
            if verdict.seed:
                self.on_unseeded(key_id, now)
        if held is not None and verdict.allowed:
            self._inflight.hold(held[0], held[1])
        refused_by = None
        if verdict.refused is not None:
            at = verdict.refused
            if at > len(named):
                assert budget is not None and now is not None and verdict.spent is not None
                raise over_budget(verdict.spent, budget, now)
            refused_by = "concurrency" if at == len(named) else named[at][0]
        left = {
            name: remaining(level) for (name, _), level in zip(named, verdict.levels, strict=True)
        }
        return Admission(
            verdict.allowed,
            rpm,
            left.get("rpm"),
            tpm,
            left.get("tpm"),
            refused_by,
            0 if verdict.allowed else verdict.retry_after,
        )

    # -- leases: a share of a key's RPM taken ahead (leases.py) -------------------

    def _holding(
        self, key_id: int, rpm: int | None, tpm: int | None, leasable: bool
    ) -> leases.Holding | None:
        """This worker's leases of the key's limits, or None where every call asks Redis
        (no RPM limit, a small one, or a key with more than RPM and TPM: not ``leasable``).
        """
        size = leases.size(rpm, self.lease_share) if rpm is not None and leasable else 0
        holding = self._holdings.get(key_id)
        if not size:
            if holding is not None and holding.rpm.capacity != rpm:  # now asked per call
                del self._holdings[key_id]  # what its leases left is not given back
            return None
        if (
            holding is None
            or holding.rpm.capacity != rpm
            or holding.size != size
            or ((holding.tpm.capacity if holding.tpm else None) != tpm)
        ):  # new limits: the old leases run out and are given back as they end
            if len(self._holdings) >= 10_000:
                self._holdings = {k: h for k, h in self._holdings.items() if h.leases}
            holding = leases.Holding(
                per_minute("rpm", rpm), per_minute("tpm", tpm, cost=0) if tpm else None, size
            )
            self._holdings[key_id] = holding
        return holding

    def _renew(self, key_id: int, holding: leases.Holding) -> None:
        """Ask for the key's next lease in the background, if it is time (and Redis is
        not known to be away: the call itself fails open then)."""
        now = time.monotonic()
        if self._guard.down_until <= now and holding.wants(now):
            holding.asking = True
            self._spawn(lambda: self._lease(key_id, holding))

    def _lease(self, key_id: int, holding: leases.Holding) -> None:
        """Take a lease, in one round trip, hold it LEASE_TTL, then give back what it
        left unused (also when the worker stops: ``stop`` kills this greenlet)."""
        buckets = [replace(holding.rpm, cost=holding.size)]
        if holding.tpm is not None:
            buckets.append(holding.tpm)
        keys = [self._of_key(key_id, b.name) for b in buckets]
        try:
            asked = time.monotonic()
            verdict = self._guard.guarded("lease", None, self.store.admit, keys, buckets)
            if verdict is None:
                return
            now = time.monotonic()
            holding.seen(verdict.levels, asked, now)
            if not verdict.allowed:
                return
            lease = holding.add(now)
        finally:
            holding.asking = False
        try:
            gevent.sleep(leases.LEASE_TTL)
        finally:
            left = holding.end(lease)
            # Taken under a limit since changed (or one now asked per call): given back
            # with the old limit's bucket, they refilled the new one to full, and a
            # lowered limit let its whole size through again each time a lease ended.
            # The new bucket refills on its own.
            current = self._holdings.get(key_id)
            if left and current is not None and current.rpm == holding.rpm:
                operation = ("charge", (keys[0], holding.rpm, -float(left)))
                self._guard.guarded("lease", None, self.store.post_all, [operation])

    def charge(self, key_id: int, tpm: int | None, tokens: int | None) -> None:
        """Charge a finished call's real tokens to the key's TPM bucket (a debt if over)."""
        if not tpm or tpm <= 0 or not tokens or tokens <= 0:
            return
        bucket = per_minute("tpm", tpm)
        self._guard.guarded(
            "charge", None, self.store.charge, self._of_key(key_id, "tpm"), bucket, tokens
        )

    def standing(self, key_id: int, rpm: int | None, tpm: int | None) -> Admission:
        """The key's limits and what is left of them, taking nothing (for the headers)."""
        rpm, tpm = (rpm if rpm and rpm > 0 else None), (tpm if tpm and tpm > 0 else None)
        if rpm is None or tpm is None:
            return Admission(True, rpm, rpm, tpm, tpm)
        usage = self.usage(key_id, rpm, tpm)
        return Admission(True, rpm, usage["rpm"]["remaining"], tpm, usage["tpm"]["remaining"])

    def usage(self, key_id: int, rpm: int, tpm: int) -> dict[str, dict[str, int]]:
        """``{rpm: {current, limit, remaining}, tpm: {...}}`` from the shared buckets."""
        buckets = [per_minute("rpm", rpm), per_minute("tpm", tpm)]
        keys = [self._of_key(key_id, b.name) for b in buckets]
        levels = self._guard.guarded(
            "usage", (float(rpm), float(tpm)), self.store.peek, keys, buckets
        )
        return {
            b.name: {
                "current": math.ceil(_whole(b.capacity - level)),
                "limit": int(b.capacity),
                "remaining": remaining(level),
            }
            for b, level in zip(buckets, levels, strict=True)
        }

    # -- monthly budgets: spend per key and calendar month (UTC) -----------------

    def spend(self, key_id: int, nanos: int | None, now: datetime | None = None) -> None:
        """Add a finished call's cost (nano-USD) to its key's spend this month."""
        if not nanos or nanos <= 0:
            return
        now = now or datetime.now(UTC)
        args = (self._spend_key(key_id, now), nanos, SPEND_TTL)
        unsent = partial(self._reseed_later, key_id, now)  # in the records: raised from them
        self._guard.send_or_owe("spend", self.store.add, args, [], unsent)

    def spent(self, key_id: int, now: datetime | None = None) -> int:
        """Nano-USD the key spent this month as the store has it (0 when it is away)."""
        key = self._spend_key(key_id, now or datetime.now(UTC))
        return self._guard.guarded("spent", 0, self.store.total, key)

    def seed_spend(self, key_id: int, nanos: int, now: datetime) -> None:
        """Raise the key's spend in ``now``'s month to ``nanos``, what its records say,
        if the store has less. Never added: the store's total may count the same calls
        already (and calls the records do not have yet)."""
        key = self._spend_key(key_id, now)
        if (
            self._guard.guarded("seed", UNSENT, self.store.raise_to, key, nanos, SPEND_TTL)
            is UNSENT
        ):
            self._reseed_later(key_id, now)

    def _reseed_later(self, key_id: int, now: datetime) -> None:
        """Have the key's spend in ``now``'s month raised to the records' figure once the
        store answers: what it was not sent is in the calls' records.

        Not the costs themselves, sent late: by then a seeding (this worker's or
        another's) may have taken the figure of records that hold them, and they would
        count twice. While the database is away too, it waits for the key's next seeding.
        """
        self._unsent_spend[key_id] = now
        if self._reseeder is None or self._reseeder.dead:
            self._reseeder = self._background(self._reseed_when_back, "reseeding")

    def _reseed_when_back(self) -> None:
        while self._unsent_spend:
            gevent.sleep(max(self.retry_after, self._guard.down_until - time.monotonic()))
            due, self._unsent_spend = self._unsent_spend, {}
            for key_id, now in due.items():
                self.on_unseeded(key_id, now)  # a seeding the store refuses comes back

    def _spend_key(self, key_id: int, now: datetime) -> str:
        return self.key(f"key:{key_id}", f"spend:{now:%Y-%m}")

    # -- calls in flight: maxConcurrent slots, request-id claims (inflight.py) -----

    def enter(self, key_id: int, uid: str, max_concurrent: int | None) -> bool:
        """Take one of the key's in-flight slots for call ``uid``; False if all are taken."""
        if not max_concurrent or max_concurrent <= 0:
            return True
        return self._inflight.enter(self._of_key(key_id, "inflight"), uid, max_concurrent)

    def leave(self, key_id: int, uid: str) -> None:
        """Give back call ``uid``'s slot (when its upstream is done, drains included)."""
        self._inflight.leave(self._of_key(key_id, "inflight"), uid)

    def claim(self, key_id: int, req_id: str, uid: str) -> Claim | None:
        """Claim a request id for call ``uid``: None if claimed, else who holds it."""
        return self.claim_unsure(key_id, req_id, uid)[0]

    def claim_unsure(self, key_id: int, req_id: str, uid: str) -> tuple[Claim | None, bool]:
        """``claim``, and whether a claim taken is unsure: the store began to keep the
        key's claims less than INFLIGHT_TTL ago (a Redis restarted empty), and the
        worker of a call still in flight with this id may not have taken its claim
        again yet (it does once it hears the store is back, or at its next keep)."""
        mark = self._of_key(key_id, "claims-since")
        return self._inflight.claim(self._claim_key(key_id, req_id), mark, uid)

    def unclaim(self, key_id: int, req_id: str, uid: str) -> None:
        """Release call ``uid``'s claim on a request id: a repeat will run anew."""
        self.settle(key_id, req_id, uid, None)

    def settle(self, key_id: int, req_id: str, uid: str, answer: str | None) -> None:
        """Call ``uid`` is over: keep ``answer`` for repeats DEDUP_TTL seconds (None: release)."""
        self._inflight.settle(self._claim_key(key_id, req_id), uid, answer)

    def keep_in_flight(self) -> None:
        """Extend the slots and claims this worker holds; take again those the store lost
        while their calls still run (``InFlight.keep``)."""
        self._inflight.keep()

    def _claim_key(self, key_id: int, req_id: str) -> str:
        return self.key(f"key:{key_id}", f"req:{req_id}")

    # -- a finished call ----------------------------------------------------------

    def finish(
        self,
        key_id: int,
        uid: str,
        *,
        req_id: str | None = None,
        answer: str | None = None,
        tpm: int | None = None,
        tokens: int | None = None,
        nanos: int | None = None,
        now: datetime | None = None,
    ) -> None:
        """What call ``uid`` owes once it is over, in one write, in this order.

        Its request id settled with ``answer`` (``settle``; None releases it), its slot
        given back (``leave``), its real tokens charged to TPM (``charge``), its cost in
        nano-USD added to this month's spend (``spend``): each only if it applies. Sent,
        not waited for (``post_all``): Redis runs it before anything asked after it, so
        the call's answer may go as soon as this returns; a failure found later counts
        as failed open.
        """
        operations: list[tuple[str, tuple]] = []
        if req_id is not None:
            operations += self._inflight.settled(self._claim_key(key_id, req_id), uid, answer)
        operations += self._inflight.released(self._of_key(key_id, "inflight"), uid)
        if tpm and tpm > 0 and tokens and tokens > 0:
            charge: tuple = (self._of_key(key_id, "tpm"), per_minute("tpm", tpm), tokens)
            if self.lease_share:  # other workers' leases trust their view of TPM
                charge += (tpm * leases.TPM_RESERVE, self.channel, f"{TPM_LOW}{key_id}")
            operations.append(("charge", charge))
            holding = self._holdings.get(key_id)
            if holding is not None:
                holding.charged(tokens)
        unsent = None  # a spend not sent at all is raised from the records (``spend``)
        if nanos and nanos > 0:
            now = now or datetime.now(UTC)
            operations.append(("add", (self._spend_key(key_id, now), nanos, SPEND_TTL)))
            unsent = partial(self._reseed_later, key_id, now)
        if operations:
            post = self.store.post_all
            self._guard.send_or_owe("finish", post, (operations,), operations, unsent)

    # -- sign-in and admin-bearer throttling ------------------------------------

    def attempt(self, address: str) -> int:
        """Take one try at a secret for ``address``: 0 to go ahead, else seconds to wait."""
        key = self.key(f"addr:{address}", self.login.name)
        verdict = self._guard.guarded("attempt", None, self.store.admit, [key], [self.login])
        return 0 if verdict is None or verdict.allowed else verdict.retry_after

    def succeeded(self, address: str) -> None:
        """Give back the try of a right secret: only failures count against an address."""
        key = self.key(f"addr:{address}", self.login.name)
        self._guard.guarded("attempt", None, self.store.charge, key, self.login, -1.0)

    # -- key changes (keychanges.py) --------------------------------------------

    @property
    def channel(self) -> str:
        """The store's channel of key changes (and of leases' TPM warnings)."""
        return self._changes.channel

    def on_key_change(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(key_hash)`` when any worker announces a change to that key
        (``callback(None)``: some may have been missed; ``KeyChanges.on_key_change``)."""
        self._changes.on_key_change(callback)

    def announce(self, key_hash: str) -> None:
        """Tell every worker of every instance that this key changed (revoked, new limits)."""
        self._changes.announce(key_hash)

    def catch_up(self) -> None:
        """Return once this worker has applied the key changes already sent to it."""
        self._changes.catch_up()

    def _heard_for_leases(self, message: str | None) -> bool:
        """Doubt the leases an announcement says may be off (None: some may have been
        missed, so all of them); True if it was only that (a key's TPM bucket near
        empty), no key change for the channel's callbacks."""
        if message is None or message.startswith(TPM_LOW):
            now = time.monotonic()
            if message is None:
                doubted = list(self._holdings.values())
            else:
                key = message.removeprefix(TPM_LOW)
                doubted = [self._holdings.get(int(key))] if key.isdigit() else []
            for holding in doubted:
                if holding is not None:
                    holding.doubt(now)
            return message is not None
        return False


limiter = Limiter()
