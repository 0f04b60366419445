"""The seeder (spend.py): a budgeted key's spend in the store raised to the records' figure.

In process, on SQLite and PostgreSQL, with the worker's limiter on the shared Redis
under a prefix of the test's own. The database is away as in the other in-process
outage tests (``tests.servers.away``): its handle is one where nothing answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from gateway import db
from gateway.auth import keys
from gateway.callrows import snapshot
from gateway.db import database
from gateway.errors import BudgetExceeded
from gateway.exchange import Exchange
from gateway.limiter import Limiter, limiter
from gateway.models import ApiKey, Completion, RetiredSpend
from gateway.recorder import recorder
from gateway.spend import seeder
from tests.servers import RedisServer, away, unreachable, wait_until

NANO = 1_000_000_000


@pytest.fixture
def shared(app, shared_redis: RedisServer) -> Iterator[Limiter]:  # type: ignore[no-untyped-def]
    """The worker's limiter on Redis (a Redis just restarted: nothing under its prefix)."""
    prefix = uuid.uuid4().hex[:8]
    limiter.configure({**app.config, "REDIS_URL": shared_redis.url, "REDIS_PREFIX": prefix})
    yield limiter
    limiter.configure(app.config)


def _key(budget_usd: float | None) -> int:
    """A new key's id, with this monthly budget (None: none)."""
    with database.connection_context():
        return ApiKey.issue(comment="budget", budget_usd=budget_usd)[0].id


def _written_back(key_ids: list[int], usd: int) -> None:
    """A call of each key's that ended during a database outage, costing ``usd``, written
    back from the journal now."""
    late = []
    for key_id in key_ids:
        outage = Exchange(api_key_id=key_id, model="gpt", api_format="openai-chat", prompt={})
        outage.finish("completed", cost={"total": usd})
        late.append(snapshot(outage))
    recorder.journal.append(late)
    recorder._replay_once()


def _spent_usd(key_id: int, usd: int) -> None:
    """A final record of the key's, this month, costing ``usd``."""
    with database.connection_context():
        Completion.create(
            uid=uuid.uuid4().hex, api_key=key_id, model="gpt", api_format="openai-chat",
            status="completed", cost_nanos=usd * NANO,
        )  # fmt: skip


def test_a_seeding_the_database_did_not_answer_is_tried_again_soon(
    shared: Limiter, database_url: str
) -> None:
    key_id = _key(1.0)
    _spent_usd(key_id, 5)
    now = datetime.now(UTC)
    with away(unreachable(database_url)):
        # The first admission since Redis restarted is told to seed; the read is refused.
        assert shared.admit(key_id, None, None, budget=1.0, now=now).allowed
        wait_until(lambda: not db.reachable(), timeout=5)
        # The key's mark stands 10 minutes: no admission is told again meanwhile.
        assert shared.admit(key_id, None, None, budget=1.0, now=now).allowed
    # Back: the read is tried again within CACHE_TTL (at least 1 s), not in 10 minutes.
    wait_until(lambda: shared.spent(key_id, now) == 5 * NANO, timeout=4)
    with pytest.raises(BudgetExceeded):
        shared.admit(key_id, None, None, budget=1.0, now=now)


def test_records_written_back_from_the_journal_raise_their_key_s_spend(shared: Limiter) -> None:
    # Redis restarted during a database outage: it counts the outage's calls ($2), the
    # records the calls before it ($5); the key's spend was raised to them before the
    # journal, which holds the outage's, was written back.
    key_id = _key(6.0)
    _spent_usd(key_id, 5)
    now = datetime.now(UTC)
    shared.spend(key_id, 2 * NANO, now)
    assert shared.admit(key_id, None, None, budget=6.0, now=now).allowed
    wait_until(lambda: shared.spent(key_id, now) == 5 * NANO)
    _written_back([key_id], 2)
    # $7 spent: at once, not when the key's mark lapses (10 minutes on).
    wait_until(lambda: shared.spent(key_id, now) == 7 * NANO, timeout=2)
    with pytest.raises(BudgetExceeded):
        shared.admit(key_id, None, None, budget=6.0, now=now)


def test_deleted_records_still_count_against_the_budget(shared: Limiter) -> None:
    # The key spent $5 this month: $2 in a record since deleted from the dashboard, $3
    # in records retention deleted. A restarted Redis takes all of it from the records.
    key_id = _key(4.0)
    _spent_usd(key_id, 2)
    now = datetime.now(UTC)
    with database.connection_context():
        Completion.update(deleted=True).where(Completion.api_key == key_id).execute()
        RetiredSpend.insert(api_key_id=key_id, month=f"{now:%Y-%m}", nanos=3 * NANO).execute()
    assert shared.admit(key_id, None, None, budget=4.0, now=now).allowed
    wait_until(lambda: shared.spent(key_id, now) == 5 * NANO, timeout=2)
    with pytest.raises(BudgetExceeded):
        shared.admit(key_id, None, None, budget=4.0, now=now)


def test_a_key_known_to_have_no_budget_is_not_read_for_one(shared: Limiter) -> None:
    # Journals written back after an outage ask for every priced record's key: only a
    # key with a budget (or one this worker does not know) has its month of records read.
    free, budgeted = _key(None), _key(9.0)
    assert keys.read_through()
    for key_id in (free, budgeted):
        _spent_usd(key_id, 5)
    _written_back([free, budgeted], 2)
    now = datetime.now(UTC)
    wait_until(lambda: shared.spent(budgeted, now) == 7 * NANO, timeout=2)
    assert seeder.wait(2)
    assert shared.spent(free, now) == 0
