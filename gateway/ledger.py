"""The account's totals: what calls cost, by key, model and provider, over a time range.

Read from the records' own costs (fixed when each call ended, ``pricing.py``), summed in
the database as nano-USD integers, so a total is exact and no price change moves it.
Chat calls and embeddings count alike. What is counted:

- ``calls``: final records (not ``pending``); a replay (``cache_hit``) cost nothing.
- ``costUsd``: the sum of the costs that are known.
- ``unpriced``: calls that may have cost something but have no cost: the model had no
  price, or the provider reported no token count. A call that failed with no token
  count reported (nothing was answered) is not among them.

``month_start`` is where a key's budget month (UTC) begins; ``month_spend`` is what a
budget counts, which deleting records does not lower.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce

import peewee as pw

from gateway import pricing
from gateway.models import Completion, Embedding, RetiredSpend


@dataclass
class Total:
    """Calls, their known cost (nano-USD) and how many could not be priced."""

    calls: int = 0
    nanos: int = 0
    unpriced: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Total) -> None:
        """Fold another total into this one."""
        self.calls += other.calls
        self.nanos += other.nanos
        self.unpriced += other.unpriced
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    @property
    def usd(self) -> float:
        return pricing.usd(self.nanos) or 0.0


@dataclass
class Ledger:
    """Totals over one range: overall, and per key id, system name and provider id."""

    total: Total = field(default_factory=Total)
    by_key: dict[int, Total] = field(default_factory=dict)
    by_model: dict[str, Total] = field(default_factory=dict)
    by_provider: dict[int | None, Total] = field(default_factory=dict)

    def ranked(self, part: dict) -> list[tuple]:
        """(name, total) pairs of one breakdown, the costliest first."""
        return sorted(part.items(), key=lambda kv: (-kv[1].nanos, -kv[1].calls, str(kv[0])))


def ledger(since: datetime | None = None, key: int | None = None) -> Ledger:
    """The totals of live records since ``since`` (all time if None), of one key if given."""
    out = Ledger()
    for table, prompt, answer in (
        (Completion, Completion.prompt_tokens, Completion.completion_tokens),
        (Embedding, Embedding.input_tokens, None),
    ):
        for key_id, model, provider_id, total in _grouped(table, prompt, answer, since, key):
            out.total.add(total)
            for part, name in (
                (out.by_key, key_id),
                (out.by_model, model.split("@", 1)[0]),
                (out.by_provider, provider_id),
            ):
                part.setdefault(name, Total()).add(total)
    return out


def month_start(now: datetime) -> datetime:
    """The first moment of ``now``'s calendar month (naive UTC, as the tables keep time)."""
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0, tzinfo=None)


def month_spend(now: datetime, key: int | None = None) -> dict[int, int]:
    """Nano-USD each key (or ``key`` alone) spent in ``now``'s month: what its budget
    counts. Every final record's cost, soft-deleted ones too (deleting a record refunds
    nothing), and what the records retention deleted had cost (``RetiredSpend``)."""
    since = month_start(now)
    until = month_start(since + timedelta(days=32))  # a record written late may be older
    parts = []
    for table in (Completion, Embedding):
        query = (
            table.select(table.api_key, pw.fn.SUM(table.cost_nanos))
            .where(
                (table.created_at >= since)
                & (table.created_at < until)
                & (table.status != "pending")
                & table.cost_nanos.is_null(False)
            )
            .group_by(table.api_key)
        )
        parts.append(query if key is None else query.where(table.api_key == key))
    retired = RetiredSpend.select(RetiredSpend.api_key_id, RetiredSpend.nanos).where(
        RetiredSpend.month == f"{since:%Y-%m}"
    )
    parts.append(retired if key is None else retired.where(RetiredSpend.api_key_id == key))
    # One statement (UNION ALL), so one snapshot: a retention batch that committed
    # between a read of the records and one of retired_spend would count the calls it
    # deleted in both (or, read the other way round, in neither).
    spent: dict[int, int] = {}
    for key_id, nanos in reduce(operator.add, parts).tuples():
        if nanos is not None:
            spent[key_id] = spent.get(key_id, 0) + int(nanos)
    return spent


def spend_by_key(since: datetime) -> dict[int, Total]:
    """Each key's totals since ``since`` (a month's spend, for the keys page)."""
    return ledger(since).by_key


def _grouped(
    table: type[pw.Model],
    prompt: pw.Field,
    answer: pw.Field | None,
    since: datetime | None,
    key: int | None,
) -> Iterable[tuple[int, str, int | None, Total]]:
    """(key id, model, provider id, total) per group of final records."""
    told = (
        prompt.is_null(False) if answer is None else prompt.is_null(False) | answer.is_null(False)
    )
    unpriced = (
        table.cost_nanos.is_null()
        & (table.status != "cache_hit")
        & ((table.status != "failed") | told)
    )
    replay = table.status == "cache_hit"  # tokens of a replay were not spent again
    query = (
        table.select(
            table.api_key,
            table.model,
            table.provider_id,
            pw.fn.COUNT(table.id),
            pw.fn.COALESCE(pw.fn.SUM(table.cost_nanos), 0),
            pw.fn.SUM(pw.Case(None, [(unpriced, 1)], 0)),
            pw.fn.COALESCE(pw.fn.SUM(pw.Case(None, [(replay, 0)], prompt)), 0),
            pw.fn.COALESCE(pw.fn.SUM(pw.Case(None, [(replay, 0)], answer)), 0)
            if answer is not None
            else pw.SQL("0"),
        )
        .where((table.deleted == False) & (table.status != "pending"))  # noqa: E712
        .group_by(table.api_key, table.model, table.provider_id)
    )
    if since is not None:
        query = query.where(table.created_at >= since)
    if key is not None:
        query = query.where(table.api_key == key)
    for (
        key_id,
        model,
        provider_id,
        calls,
        nanos,
        unpriced_calls,
        tokens_in,
        tokens_out,
    ) in query.tuples():
        total = Total(calls, int(nanos), int(unpriced_calls or 0), int(tokens_in), int(tokens_out))
        yield key_id, model, provider_id, total
