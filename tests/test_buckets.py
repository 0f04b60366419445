"""The bucket, slot and claim arithmetic, against an independent reference model.

The reference computes a bucket's level in exact arithmetic and in the min-plus form of
a token bucket (the level at ``t`` is the least, over every instant ``s`` the bucket may
last have been full, of ``capacity + rate * (t - s) - tokens taken in [s, t]``), not by
stepping as the implementation does; so the two agree only if the stepping is right.
Within 1e-9 of a decision's boundary the float implementation may round either way: the
reference then follows it, and both go on from the same decision.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buckets import PURGE_SLICE, Bucket, LocalStore, admit, charge, per_minute, refill

TIE = 1e-9


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Reference:
    """One bucket in exact arithmetic: full at its first event, takes never refused here."""

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = Fraction(capacity), Fraction(rate)
        self.events: list[tuple[Fraction, Fraction]] = []  # (time, tokens taken)

    def level(self, t: float) -> Fraction:
        t = Fraction(t)
        candidates = [self.capacity]  # full at t itself (nothing taken yet at t)
        for i, (s, _) in enumerate(self.events):
            taken = sum(amount for _, amount in self.events[i:])
            candidates.append(self.capacity + self.rate * (t - s) - taken)
        return min(candidates)

    def take(self, t: float, amount: float) -> None:
        self.events.append((Fraction(t), Fraction(amount)))


def _close(a: float, b: Fraction) -> bool:
    return abs(a - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


limits = st.integers(min_value=1, max_value=5000)
steps = st.lists(
    st.tuples(
        st.sampled_from(["admit", "charge", "peek"]),
        st.floats(min_value=0, max_value=30, allow_nan=False),  # seconds since last step
        st.integers(min_value=0, max_value=3),  # which bucket (charge) / cost (admit)
        st.integers(min_value=1, max_value=20_000),  # tokens charged
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(rpm=limits, tpm=limits, per_second=st.integers(1, 20), script=steps)
def test_store_matches_the_reference(rpm: int, tpm: int, per_second: int, script: list) -> None:
    """RPM (cost 1), TPM (cost 0, charged after) and a per-second bucket, decided as one."""
    clock = Clock()
    store = LocalStore(clock)
    buckets = [per_minute("rpm", rpm), per_minute("tpm", tpm, cost=0), Bucket("m", 3, per_second)]
    keys = ["rpm", "tpm", "m"]
    refs = [Reference(b.capacity, b.rate) for b in buckets]
    for op, dt, which, tokens in script:
        clock.now += dt
        expected = [ref.level(clock.now) for ref in refs]
        if op == "peek":
            got = store.peek(keys, buckets)
            assert all(_close(g, e) for g, e in zip(got, expected, strict=True))
        elif op == "charge":
            i = which % 3
            level = store.charge(keys[i], buckets[i], tokens)
            refs[i].take(clock.now, tokens)
            assert _close(level, expected[i] - tokens)
        else:
            verdict = store.admit(keys, buckets)
            can = [
                e >= b.cost if b.cost > 0 else e > 0 for e, b in zip(expected, buckets, strict=True)
            ]
            near_tie = any(
                abs(float(e) - b.cost) < TIE for e, b in zip(expected, buckets, strict=True)
            )
            if not near_tie:
                assert verdict.allowed == all(can)
            if verdict.allowed:
                for ref, b in zip(refs, buckets, strict=True):
                    ref.take(clock.now, b.cost)
            else:
                waits = [
                    float(b.cost - e) / b.rate
                    for e, b, ok in zip(expected, buckets, can, strict=True)
                    if not ok
                ]
                assert not waits or math.isclose(
                    verdict.wait, max(waits), rel_tol=1e-6, abs_tol=1e-6
                )


@settings(max_examples=200, deadline=None)
@given(
    limit=limits,
    arrivals=st.lists(st.floats(min_value=0, max_value=120, allow_nan=False), max_size=300),
)
def test_no_window_admits_more_than_the_limit_allows(limit: int, arrivals: list[float]) -> None:
    """In any window of w seconds a per-minute bucket admits at most limit + limit*w/60."""
    clock = Clock(0.0)
    store = LocalStore(clock)
    bucket = per_minute("rpm", limit)
    admitted = []
    for t in sorted(arrivals):
        clock.now = t
        if store.admit(["k"], [bucket]).allowed:
            admitted.append(t)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - start
            assert j - i + 1 <= limit + limit * window / 60 + 1e-6


@settings(max_examples=200, deadline=None)
@given(limit=limits, extra=st.integers(0, 200), wait_more=st.floats(0, 100))
def test_a_refusal_says_how_long_to_wait(limit: int, extra: int, wait_more: float) -> None:
    """Waiting the refusal's ``wait`` is enough (and needed: a bit less is refused)."""
    clock = Clock()
    store = LocalStore(clock)
    bucket = per_minute("rpm", limit)
    verdicts = [store.admit(["k"], [bucket]) for _ in range(limit + extra)]
    assert sum(v.allowed for v in verdicts) == limit  # an instant burst: no more
    refused = store.admit(["k"], [bucket])
    assert not refused.allowed and refused.wait > 0
    clock.now += refused.wait * (1 - 1e-6) - 1e-9
    assert not store.admit(["k"], [bucket]).allowed
    clock.now += refused.wait * 2e-6 + 2e-9 + wait_more
    assert store.admit(["k"], [bucket]).allowed
    assert refused.retry_after == max(1, math.ceil(refused.wait))


def test_forty_instant_calls_against_twenty_rpm_let_twenty_through() -> None:
    clock = Clock()
    store = LocalStore(clock)
    verdicts = [store.admit(["k"], [per_minute("rpm", 20)]) for _ in range(40)]
    assert sum(v.allowed for v in verdicts) == 20
    assert verdicts[-1].retry_after == 3  # one token per 3 s


def test_a_huge_call_leaves_a_debt_that_later_calls_wait_out() -> None:
    """TPM is charged after the call: 5,000 tokens against 1,000/min block for 4 minutes."""
    clock = Clock()
    store = LocalStore(clock)
    tpm = per_minute("tpm", 1000, cost=0)
    assert store.admit(["t"], [tpm]).allowed  # nothing is reserved before the call
    assert store.charge("t", tpm, 5000) == -4000
    refused = store.admit(["t"], [tpm])
    assert not refused.allowed and refused.wait == pytest.approx(240)
    clock.now += 239
    assert not store.admit(["t"], [tpm]).allowed
    clock.now += 1.001
    assert store.admit(["t"], [tpm]).allowed


def test_atomic_over_buckets_a_refusal_takes_nothing() -> None:
    clock = Clock()
    store = LocalStore(clock)
    rpm, tpm = per_minute("rpm", 10), per_minute("tpm", 100, cost=0)
    store.charge("tpm", tpm, 100)  # TPM empty
    verdict = store.admit(["rpm", "tpm"], [rpm, tpm])
    assert not verdict.allowed and verdict.refused == 1
    assert store.peek(["rpm", "tpm"], [rpm, tpm]) == (10, 0)  # the RPM token was not taken


def test_the_longest_wait_names_the_refusing_bucket() -> None:
    verdict = admit([0.5, -10.0], [Bucket("a", 10, 1), Bucket("b", 10, 1, cost=0)])
    assert not verdict.allowed and verdict.refused == 1 and verdict.wait == 10


def test_time_running_back_refills_nothing() -> None:
    assert refill((2.0, 100.0), 90.0, 10.0, 1.0) == (2.0, 100.0)
    assert refill((2.0, 100.0), 103.0, 10.0, 1.0) == (5.0, 103.0)
    assert refill(None, 5.0, 10.0, 1.0) == (10.0, 5.0)


def test_a_refund_never_fills_past_capacity() -> None:
    assert charge(9.5, -1.0, 10.0) == 10.0
    assert charge(3.0, -1.0, 10.0) == 4.0


def test_bad_buckets_are_refused() -> None:
    for capacity, rate, cost in ((0, 1, 1), (1, 0, 1), (1, 1, -1)):
        with pytest.raises(ValueError):
            Bucket("x", capacity, rate, cost)


def test_full_buckets_are_forgotten() -> None:
    """A bucket is kept only until it would be full again (plus a margin)."""
    clock = Clock()
    store = LocalStore(clock)
    bucket = per_minute("rpm", 60)  # one token per second
    for i in range(9_999):
        store.admit([f"k{i}"], [bucket])
    clock.now += 62
    for _ in range(10_000 // PURGE_SLICE + 10):  # the 10,000th write begins a purge,
        store.charge("last", bucket, 0)  # a slice of entries each write from then on
    assert list(store._buckets) == ["last"]


def _held(store: LocalStore) -> dict[str, int]:
    return {
        "buckets": len(store._buckets),
        "slots": len(store._slots),
        "claims": len(store._claims),
        "totals": len(store._totals),
    }


def test_expired_entries_of_every_kind_are_forgotten_without_bucket_writes() -> None:
    """A gateway whose keys have no RPM or TPM limit writes no bucket: its request ids'
    answers (whole answers, up to megabytes each), its dead workers' slots and its
    totals must still be forgotten once expired. The purge waited for the 10,000th
    bucket write, so the long-lived instance store kept every answer it ever held."""
    clock = Clock()
    store = LocalStore(clock, marks=True)
    for i in range(500):
        assert store.claim(f"r{i}", f"u{i}", ttl=10, mark="m", grace=0) is None
        assert store.settle(f"r{i}", f"u{i}", "x" * 1000, ttl=600)
        assert store.acquire(f"s{i}", "w", 5, ttl=10)[0]  # never released: a killed worker
        store.add(f"t{i}", 1, ttl=30)
    clock.now += 600 + 2 * 60  # past every expiry and its margin: a purge is due
    writes = 4 * 500 // PURGE_SLICE + 10  # a slice of entries each write
    for i in range(writes):
        assert store.claim(f"now{i}", "u", ttl=10) is None
    held = _held(store)
    assert held == {"buckets": 0, "slots": 0, "claims": held["claims"], "totals": 0}
    assert held["claims"] <= writes  # only the new ones


def test_a_purge_takes_a_slice_of_the_entries_per_write() -> None:
    """No write waits for every entry: each checks at most ``PURGE_SLICE`` of them."""
    clock = Clock()
    store = LocalStore(clock)
    for i in range(2_000):
        store.add(f"t{i}", 1, ttl=10)
    clock.now += 61  # every total expired; a purge is due at the next write
    steps = -(-2_000 // PURGE_SLICE)
    remaining = []
    for i in range(steps + 2):
        store.add(f"new{i}", 1, ttl=100)
        remaining.append(len(store._totals) - (i + 1))
    assert remaining == [max(0, 2_000 - PURGE_SLICE * n) for n in range(1, steps + 3)]


def test_slots_are_held_refreshed_released_and_expire() -> None:
    clock = Clock()
    store = LocalStore(clock)
    assert store.acquire("s", "a", 2, ttl=10) == (True, 1)
    assert store.acquire("s", "b", 2, ttl=10) == (True, 2)
    assert store.acquire("s", "c", 2, ttl=10) == (False, 2)
    assert store.acquire("s", "a", 2, ttl=10) == (True, 2)  # a holder asking again keeps it
    clock.now += 8
    assert store.refresh("s", "a", ttl=10)
    clock.now += 5  # b lapsed (not refreshed): a worker killed mid-call
    assert store.acquire("s", "c", 2, ttl=10) == (True, 2)
    assert not store.refresh("s", "b", ttl=10)
    assert store.release("s", "a") == 1


def test_claims_are_exclusive_kept_and_released_by_their_holder_only() -> None:
    clock = Clock()
    store = LocalStore(clock)
    assert store.claim("r", "u1", ttl=10) is None
    clock.now += 4
    holder = store.claim("r", "u2", ttl=10)
    assert (holder.uid, holder.age) == ("u1", 4)
    assert not store.keep_claim("r", "u2", ttl=10) and not store.unclaim("r", "u2")
    assert store.keep_claim("r", "u1", ttl=10)
    clock.now += 9
    assert store.claim("r", "u2", ttl=10).uid == "u1"  # kept: still held
    assert store.unclaim("r", "u1")
    assert store.claim("r", "u2", ttl=10) is None
    clock.now += 11  # u2 never kept it: it lapsed
    assert store.claim("r", "u3", ttl=10) is None


def test_a_settled_claim_answers_repeats_until_it_expires() -> None:
    clock = Clock()
    store = LocalStore(clock)
    assert store.claim("r", "u1", ttl=10) is None
    assert not store.settle("r", "u2", "{}", ttl=600)  # only the holder settles
    assert store.settle("r", "u1", '{"answer": 1}', ttl=600)
    clock.now += 300  # far past the in-flight TTL: a settled claim is not kept alive
    repeat = store.claim("r", "u2", ttl=10)
    assert (repeat.uid, repeat.answer, repeat.age) == ("u1", '{"answer": 1}', 300)
    assert not store.keep_claim("r", "u1", ttl=10) and not store.unclaim("r", "u1")
    assert not store.settle("r", "u1", "{}", ttl=600)  # settled once
    clock.now += 301
    assert store.claim("r", "u3", ttl=10) is None  # expired: the next call runs anew
    assert store.claim("r", "u4", ttl=10).answer is None
