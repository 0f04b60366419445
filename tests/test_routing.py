"""Candidate lookup, weighted order and the failover loop."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.errors import NotFound, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from gateway.failures import UpstreamError
from gateway.routing import Candidate, Catalog, backoff, failover, weighted_order


def candidate(
    model_id: int, provider: str, name: str = "gpt", weight: float = 1.0, model_type: str = "chat"
) -> Candidate:
    return Candidate(
        model_id=model_id, system_name=name, remote_id=f"{name}-remote", model_type=model_type,
        weight=weight, provider_id=model_id, provider_name=provider, provider_type="openai",
        base_url="http://x", api_key=None, api_version=None, stream_usage=True,
    )  # fmt: skip


ROWS = [candidate(1, "a"), candidate(2, "b"), candidate(3, "a", name="emb", model_type="embedding"),
        candidate(4, "c", name="name@with@ats")]  # fmt: skip


def test_lookup_by_system_name_and_by_name_at_provider() -> None:
    catalog = Catalog(lambda: ROWS)
    assert [c.model_id for c in catalog.lookup("gpt")] == [1, 2]
    assert [c.model_id for c in catalog.lookup("gpt@b")] == [2]
    assert [c.model_id for c in catalog.lookup("gpt", provider="a")] == [1]
    assert [c.model_id for c in catalog.lookup("emb", "embedding")] == [3]
    # A system name that itself contains @ is found as a whole first.
    assert [c.model_id for c in catalog.lookup("name@with@ats")] == [4]


@pytest.mark.parametrize("model", ["nope", "gpt@nowhere", "emb"])
def test_unknown_model_or_provider_is_not_found(model: str) -> None:
    with pytest.raises(NotFound):
        Catalog(lambda: ROWS).lookup(model)


def test_catalog_caches_until_ttl_or_invalidate() -> None:
    loads = []
    catalog = Catalog(lambda: loads.append(1) or ROWS, ttl=60)
    catalog.lookup("gpt")
    catalog.lookup("gpt")
    assert len(loads) == 1
    catalog.invalidate()
    catalog.lookup("gpt")
    assert len(loads) == 2


def test_a_change_made_while_the_catalog_loads_is_not_lost() -> None:
    """An admin write lands (and invalidates) while a load is reading: reload again."""
    loads: list[int] = []

    def load() -> list[Candidate]:
        loads.append(1)
        if len(loads) == 1:
            catalog.invalidate()  # the load already read the rows as they were before
        return ROWS

    catalog = Catalog(load, ttl=60)
    catalog.lookup("gpt")
    catalog.lookup("gpt")
    catalog.lookup("gpt")
    assert len(loads) == 2


def test_weighted_order_follows_weights_even_with_two_candidates() -> None:
    rng = random.Random(7)
    heavy, light = candidate(1, "heavy", weight=3), candidate(2, "light", weight=1)
    firsts = Counter(weighted_order([light, heavy], rng)[0].provider_name for _ in range(4000))
    # P(heavy first) = 3 / (3 + 1) for Efraimidis-Spirakis keys.
    assert 0.72 < firsts["heavy"] / 4000 < 0.78


def test_zero_weight_goes_last_but_is_kept() -> None:
    rng = random.Random(1)
    zero, one = candidate(1, "zero", weight=0), candidate(2, "one", weight=1)
    for _ in range(50):
        assert [c.provider_name for c in weighted_order([zero, one], rng)] == ["one", "zero"]


def test_backoff_grows_exponentially_within_bounds() -> None:
    rng = random.Random(3)
    delays = [backoff(n, 0.1, 5.0, rng) for n in range(10)]
    assert delays[0] == 0
    assert 0.1 <= delays[1] <= 0.11 and 0.2 <= delays[2] <= 0.22 and 0.4 <= delays[3] <= 0.44
    assert all(5.0 <= d <= 5.5 for d in delays[7:])


def run_failover(outcomes: dict[str, list], tries: int = 2) -> tuple[list[str], object]:
    """Drive failover over providers a, b with scripted outcomes per provider."""
    calls: list[str] = []
    sleeps: list[float] = []

    def try_one(c: Candidate) -> str:
        calls.append(c.provider_name)
        outcome = outcomes[c.provider_name].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    result = failover(
        [candidate(1, "a"), candidate(2, "b")],
        try_one,
        tries_per_provider=tries,
        backoff_range=(0.1, 5.0),
        sleep=sleeps.append,
        on_failure=lambda c, e: None,
    )
    return calls, result


def test_failover_retries_then_moves_on() -> None:
    calls, (chosen, value) = run_failover({
        "a": [UpstreamError("connect", "refused"), UpstreamError("http", "busy", status=503)],
        "b": ["answer"],
    })  # fmt: skip
    assert calls == ["a", "a", "b"]
    assert (chosen.provider_name, value) == ("b", "answer")


def test_non_retriable_4xx_is_returned_as_sent() -> None:
    with pytest.raises(UpstreamRejected) as info:
        run_failover(
            {
                "a": [
                    UpstreamError(
                        "http",
                        "bad",
                        status=400,
                        content=b'{"error": {"message": "bad"}}',
                        content_type="application/json",
                    )
                ],
                "b": [],
            }
        )
    assert info.value.status == 400
    assert info.value.body("openai-chat") == b'{"error": {"message": "bad"}}'


def test_all_failed_is_502_and_timeout_last_is_504() -> None:
    with pytest.raises(UpstreamFailed) as info:
        run_failover(
            {
                "a": [UpstreamError("http", "x", status=500)] * 2,
                "b": [UpstreamError("reset", "y")] * 2,
            }
        )
    assert info.value.status == 502 and "4 attempts" in info.value.message
    with pytest.raises(UpstreamTimeout) as info:
        run_failover(
            {
                "a": [UpstreamError("http", "x", status=429)] * 2,
                "b": [UpstreamError("timeout", "slow")] * 2,
            }
        )
    assert info.value.status == 504
