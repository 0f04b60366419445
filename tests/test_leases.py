"""Leases: when a worker may admit a call from what it took ahead, and what it reports.

Pure: a ``Holding`` is fed the levels Redis reported and the clock. ``test_limiter``
runs leases against a real Redis, two workers at once.
"""

from __future__ import annotations

from gateway.buckets import per_minute
from gateway.leases import LEASE_TTL, Holding, size


def _holding(rpm: int = 100_000, tpm: int | None = 1_000_000) -> Holding:
    tpm_bucket = per_minute("tpm", tpm, cost=0) if tpm else None
    return Holding(per_minute("rpm", rpm), tpm_bucket, size(rpm, 0.01))


def test_small_limits_get_no_leases() -> None:
    assert [size(limit, 0.01) for limit in (50, 199, 200, 10_000)] == [0, 0, 2, 100]
    assert size(10**9, 0.0) == 0  # switched off


def test_a_call_takes_from_a_live_lease_only() -> None:
    holding = _holding(rpm=1000)  # leases of 10
    holding.seen((990.0, 1_000_000.0), 0.0, 0.0)  # after a call and a lease of 10
    assert holding.take(0.0) is None  # no lease yet: ask Redis
    holding.add(0.0)
    taken = [holding.take(0.0) for _ in range(11)]
    assert taken[0] == (999, 1_000_000)  # the shared level plus 9 unused here
    assert taken[9] == (990, 1_000_000)
    assert taken[10] is None  # used up
    assert holding.take(0.06) is None  # and refilled by a request: still none here
    holding.add(0.1)
    assert holding.take(0.1 + LEASE_TTL) is None  # lapsed


def test_tpm_near_empty_or_charged_here_sends_calls_to_redis() -> None:
    holding = _holding(tpm=1000)
    holding.seen((90_000.0, 150.0), 0.0, 0.0)
    holding.add(0.0)
    assert holding.take(0.0) == (min(100_000, 90_000 + 1000 - 1), 150)
    holding.charged(60)  # 90 left: under a tenth of 1000
    assert holding.take(0.0) is None
    holding.seen((90_000.0, 150.0), 0.1, 0.1)  # a new report: own charges start again
    assert holding.take(0.1) is not None
    holding.seen((90_000.0, 99.0), 0.1, 0.1)  # another worker's charges, seen with a lease
    assert holding.take(0.1) is None


def test_the_next_lease_is_asked_half_used_or_half_aged_and_never_near_the_limit() -> None:
    holding = _holding(rpm=1000, tpm=None)
    holding.seen((999.0,), 0.0, 0.0)
    assert holding.wants(0.0)  # no lease
    holding.asking = True
    assert not holding.wants(0.0)  # one is being asked for
    holding.asking = False
    lease = holding.add(0.0)
    assert not holding.wants(0.0)
    for _ in range(5):
        holding.take(0.0)
    assert holding.wants(0.0)  # half used
    holding.add(0.0)
    assert not holding.wants(0.0)  # two live leases
    assert holding.end(lease) == 5  # given back
    assert holding.wants(LEASE_TTL / 2)  # the other, half aged
    holding.seen((29.0,), 0.0, 0.0)  # under three leases' worth left: every call asks Redis
    assert not holding.wants(0.0)


def test_a_charge_elsewhere_near_empty_sends_calls_to_redis_until_it_says_otherwise() -> None:
    holding = _holding(tpm=1000)
    holding.seen((90_000.0, 1000.0), 0.0, 0.0)
    holding.add(0.0)
    holding.doubt(0.1)  # announced by the charge's script
    assert holding.take(0.1) is None
    holding.seen((90_000.0, 1000.0), 0.05, 0.15)  # asked before the charge: still in doubt
    assert holding.take(0.15) is None
    holding.seen((90_000.0, 500.0), 0.2, 0.2)  # refilled since, and asked after it
    assert holding.take(0.2) == (min(100_000, 90_000 + 999), 500)
