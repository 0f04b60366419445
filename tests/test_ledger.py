"""What calls cost, summed: by key, model and provider; GET /api/admin/usage and the overview.

Rows are written with known costs, statuses and times, so every total is checked by
hand, on SQLite and PostgreSQL. The sums are of nano-USD integers: exact however many
rows there are.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from gateway import ledger, pricing
from gateway.db import database
from gateway.models import ApiKey, Completion, Embedding, Provider, RetiredSpend, utcnow
from tests.servers import ADMIN_SECRET

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
NANO = 1_000_000_000


def completion(key: ApiKey, status: str = "completed", **fields: object) -> Completion:
    usd = fields.pop("usd", None)
    return Completion.create(
        uid=uuid.uuid4().hex,
        api_key=key.id,
        model=fields.pop("model", "gpt"),
        api_format="openai-chat",
        status=status,
        cost_nanos=None if usd is None else round(usd * NANO),
        **fields,
    )


@pytest.fixture
def keys(app) -> tuple[ApiKey, ApiKey]:  # type: ignore[no-untyped-def]
    with database.connection_context():
        return ApiKey.issue(comment="one")[0], ApiKey.issue(comment="two")[0]


def test_costs_by_key_model_and_provider_and_what_could_not_be_priced(keys) -> None:  # type: ignore[no-untyped-def]
    one, two = keys
    with database.connection_context():
        main = Provider.create(name="main", base_url="https://m").id
        azure = Provider.create(name="azure", base_url="https://a").id
        completion(one, usd=0.1, provider_id=main, prompt_tokens=10, completion_tokens=1)
        completion(one, usd=0.2, model="gpt@azure", provider_id=azure)
        completion(two, "aborted", usd=0.000000001, model="claude", provider_id=main)
        # Unpriced: tokens but no cost; a failed call that reported tokens.
        completion(two, prompt_tokens=5, completion_tokens=5)
        completion(two, "failed", prompt_tokens=5)
        # Not unpriced: a failure with nothing reported, a replay; not counted: pending,
        # deleted.
        completion(two, "failed")
        completion(two, "cache_hit", prompt_tokens=99, completion_tokens=99)
        completion(one, "pending", usd=5)
        completion(one, usd=5, deleted=True)
        Embedding.create(
            uid=uuid.uuid4().hex, api_key=one.id, model="embed", status="completed",
            input_tokens=1000, cost_nanos=20_000, provider_id=main,
        )  # fmt: skip
        book = ledger.ledger()
    assert (book.total.calls, book.total.unpriced) == (8, 2)
    assert book.total.nanos == 300_000_001 + 20_000  # exact, where floats would not be
    assert book.total.usd == 0.300020001
    assert (book.by_key[one.id].nanos, book.by_key[one.id].calls) == (300_020_000, 3)
    assert (book.by_key[two.id].unpriced, book.by_key[two.id].calls) == (2, 5)
    assert book.by_model["gpt"].nanos == 300_000_000  # gpt and gpt@azure are one model
    assert book.by_model["embed"].nanos == 20_000
    assert book.by_provider[azure].nanos == 200_000_000
    assert book.by_provider[main].nanos == 100_020_001
    assert book.by_provider[None].calls == 4  # records of calls no provider answered
    assert [name for name, _ in book.ranked(book.by_model)] == ["gpt", "embed", "claude"]
    assert book.by_key[one.id].prompt_tokens == 10 + 1000  # an embedding's input counts in


def test_a_range_and_a_key(keys) -> None:  # type: ignore[no-untyped-def]
    one, two = keys
    now = utcnow()
    with database.connection_context():
        completion(one, usd=1, created_at=now - timedelta(days=40))
        completion(one, usd=2, created_at=now - timedelta(minutes=5))
        completion(two, usd=4, created_at=now - timedelta(minutes=5))
        assert ledger.ledger().total.usd == 7
        assert ledger.ledger(now - timedelta(hours=1)).total.usd == 6
        assert ledger.ledger(now - timedelta(hours=1), key=one.id).total.usd == 2
        assert ledger.spend_by_key(now - timedelta(hours=1))[two.id].usd == 4
    assert ledger.month_start(datetime(2026, 2, 28, 23, 59, 59)) == datetime(2026, 2, 1)


def test_a_month_s_spend_is_that_month_s_alone(keys) -> None:  # type: ignore[no-untyped-def]
    # A record written back late (a journal) asks for its own month's figure: the
    # months after it are not in it, deleted records and retired spend are.
    one, two = keys
    with database.connection_context():
        completion(one, usd=1, created_at=datetime(2026, 1, 31, 23, 59, 59))
        completion(one, usd=2, created_at=datetime(2026, 2, 1))
        completion(one, usd=4, created_at=datetime(2026, 2, 28, 23, 59, 59), deleted=True)
        completion(one, usd=8, created_at=datetime(2026, 3, 1))
        completion(two, "pending", usd=16, created_at=datetime(2026, 2, 14))
        RetiredSpend.insert(api_key_id=two.id, month="2026-02", nanos=32 * NANO).execute()
        assert ledger.month_spend(datetime(2026, 2, 14)) == {one.id: 6 * NANO, two.id: 32 * NANO}
        assert ledger.month_spend(datetime(2026, 3, 31), one.id) == {one.id: 8 * NANO}


def test_admin_usage_keeps_nexusgates_fields_and_adds_the_costs(client, keys) -> None:  # type: ignore[no-untyped-def]
    one, two = keys
    now = utcnow()
    with database.connection_context():
        completion(one, usd=0.25, prompt_tokens=100, completion_tokens=10, provider_id=1)
        completion(two, usd=0.5, prompt_tokens=200, completion_tokens=20, provider_id=1,
                   created_at=now - timedelta(days=2))  # fmt: skip
        completion(two, prompt_tokens=1, completion_tokens=1)  # unpriced
    body = client.get("/api/admin/usage", headers=ADMIN).get_json()
    assert (body["total_prompt_tokens"], body["total_completion_tokens"]) == (301, 31)
    assert (body["costUsd"], body["unpricedCalls"], body["calls"]) == (0.75, 1, 3)
    assert body["range"] is None and body["since"] is None and body["currency"] == "USD"
    assert [k["comment"] for k in body["byKey"]] == ["two", "one"]  # costliest first
    assert body["byKey"][0]["key"] == two.key_hint and body["byKey"][0]["unpricedCalls"] == 1
    assert body["byModel"] == [
        {"model": "gpt", "calls": 3, "costUsd": 0.75, "unpricedCalls": 1, "inputTokens": 301,
         "outputTokens": 31},
    ]  # fmt: skip
    assert body["byProvider"][0]["providerId"] == 1

    day = client.get("/api/admin/usage?range=24h", headers=ADMIN).get_json()
    assert (day["total_prompt_tokens"], day["costUsd"], day["range"]) == (101, 0.25, "24h")
    mine = client.get(f"/api/admin/usage?apiKey={two.id}&range=7d", headers=ADMIN).get_json()
    assert (mine["costUsd"], [k["apiKeyId"] for k in mine["byKey"]]) == (0.5, [two.id])
    month = client.get("/api/admin/usage?range=month", headers=ADMIN).get_json()
    assert month["since"] == pricing_month(now)
    bad = client.get("/api/admin/usage?range=1y", headers=ADMIN)
    assert bad.status_code == 400 and "month" in bad.get_json()["error"]

    overview = client.get("/api/admin/stats/overview?range=24h", headers=ADMIN).get_json()
    assert (overview["cost"]["costUsd"], overview["cost"]["calls"]) == (0.25, 2)
    assert overview["cost"]["byKey"][0]["apiKeyId"] in (one.id, two.id)


def pricing_month(now: datetime) -> str:
    return ledger.month_start(now).isoformat(timespec="milliseconds") + "Z"


def test_nano_usd_round_trips() -> None:
    assert pricing.usd(300_020_001) == 0.300020001
