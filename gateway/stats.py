"""The overview's numbers: calls, outcomes, tokens and latency over a recent range.

Bucketed in SQL (one grouped query per table, plus the model mix), so the cost does
not grow with the rows in the range. The semantics, for the dashboard and for
``GET /api/admin/stats/overview``:

- success rate = (completed + cache_hit) / (completed + cache_hit + failed). ``aborted``
  is left out: the client hung up, yet the upstream answered in full, so it is neither
  a success served nor a failure of the gateway. ``pending`` is not finished yet.
- average duration and TTFT: over ``completed`` and ``aborted`` calls (the upstream
  answered in full), where known; a replay (``cache_hit``) would flatter them.
- tokens: every count an upstream reported, whatever the status, except replays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import peewee as pw

from gateway.db import connection, is_postgres
from gateway.models import Completion, Embedding, utcnow

# range -> (seconds covered, bucket seconds); NexusGate's ranges, plus a day and a week.
RANGES: dict[str, tuple[int, int]] = {
    "1m": (60, 5),
    "5m": (300, 15),
    "10m": (600, 30),
    "30m": (1800, 60),
    "1h": (3600, 120),
    "4h": (14400, 480),
    "12h": (43200, 1440),
    "24h": (86400, 3600),
    "7d": (604800, 21600),
}
DEFAULT_RANGE = "1h"
TIMED = ("completed", "aborted")  # the upstream answered in full
TOP_MODELS = 10
EPOCH = datetime(1970, 1, 1)  # naive UTC, like every timestamp in the tables


@dataclass
class Mean:
    """A running average whose value is None until something was counted."""

    total: float = 0.0
    count: int = 0

    def add(self, total: float | None, count: int) -> None:
        """Fold in a sum of ``count`` values."""
        if count:
            self.total += float(total or 0)
            self.count += count

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class Bucket:
    """One slice of the range: calls by status, tokens and latencies."""

    start: datetime
    completions: Counter = field(default_factory=Counter)
    embeddings: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    duration: Mean = field(default_factory=Mean)
    ttft: Mean = field(default_factory=Mean)

    @property
    def statuses(self) -> Counter:
        """Completions and embeddings together, by status."""
        return self.completions + self.embeddings

    @property
    def success_rate(self) -> float | None:
        return success_rate(self.statuses)


@dataclass
class Overview:
    """Everything the overview shows for one range."""

    range: str
    since: datetime
    until: datetime
    bucket_seconds: int
    buckets: list[Bucket]
    models: list[tuple[str, int, str]]  # (model, calls, "chat" | "embedding"), most first

    def _sum(self, name: str) -> Counter | int:
        values = [getattr(b, name) for b in self.buckets]
        return sum(values, Counter()) if isinstance(values[0], Counter) else sum(values)

    @property
    def completions(self) -> Counter:
        return self._sum("completions")

    @property
    def embeddings(self) -> Counter:
        return self._sum("embeddings")

    @property
    def statuses(self) -> Counter:
        """Completions and embeddings together, by status."""
        return self.completions + self.embeddings

    @property
    def requests(self) -> int:
        return self.statuses.total()

    @property
    def success_rate(self) -> float | None:
        return success_rate(self.statuses)

    @property
    def prompt_tokens(self) -> int:
        return self._sum("prompt_tokens")

    @property
    def completion_tokens(self) -> int:
        return self._sum("completion_tokens")

    @property
    def embedding_tokens(self) -> int:
        return self._sum("embedding_tokens")

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.embedding_tokens

    def _mean(self, name: str) -> float | None:
        mean = Mean()
        for bucket in self.buckets:
            part = getattr(bucket, name)
            mean.add(part.total, part.count)
        return mean.value

    @property
    def avg_duration(self) -> float | None:
        return self._mean("duration")

    @property
    def avg_ttft(self) -> float | None:
        return self._mean("ttft")


def success_rate(statuses: Counter) -> float | None:
    """Share of finished calls that were answered, 0..1 (None: nothing finished)."""
    good = statuses["completed"] + statuses["cache_hit"]
    judged = good + statuses["failed"]
    return good / judged if judged else None


def overview(range_key: str, now: datetime | None = None) -> Overview:
    """The overview for ``range_key`` (one of RANGES) ending at ``now``."""
    seconds, size = RANGES[range_key]
    until = now or utcnow()
    since = until - timedelta(seconds=seconds)
    first = _epoch(since) // size
    count = _epoch(until) // size - first + 1
    buckets = [Bucket(EPOCH + timedelta(seconds=(first + i) * size)) for i in range(count)]

    def slot(bucket: float) -> Bucket | None:
        index = int(bucket) - first
        return buckets[index] if 0 <= index < count else None

    for bucket, status, calls, prompt, answer, dur, durs, ttft, ttfts in _grouped(
        Completion, since, size, Completion.prompt_tokens, Completion.completion_tokens
    ):
        if (b := slot(bucket)) is not None:
            b.completions[status] += calls
            if status != "cache_hit":
                b.prompt_tokens += int(prompt or 0)
                b.completion_tokens += int(answer or 0)
            if status in TIMED:
                b.duration.add(dur, durs)
                b.ttft.add(ttft, ttfts)
    for bucket, status, calls, tokens, _, dur, durs, _, _ in _grouped(
        Embedding, since, size, Embedding.input_tokens, None
    ):
        if (b := slot(bucket)) is not None:
            b.embeddings[status] += calls
            if status != "cache_hit":
                b.embedding_tokens += int(tokens or 0)
            if status in TIMED:
                b.duration.add(dur, durs)
    models = _model_mix(Completion, since, "chat") + _model_mix(Embedding, since, "embedding")
    return Overview(range_key, since, until, size, buckets, models)


def _epoch(moment: datetime) -> int:
    return int((moment - EPOCH).total_seconds())


def _bucket(table: type[pw.Model], size: int) -> pw.Node:
    """Seconds since the epoch, divided by ``size`` and floored, in the database's dialect."""
    if is_postgres():
        # timestamp without time zone: date_part reads it as UTC, which it is.
        return pw.fn.FLOOR(pw.fn.date_part("epoch", table.created_at) / size)
    return pw.fn.strftime("%s", table.created_at).cast("INTEGER") / size


def _grouped(
    table: type[pw.Model],
    since: datetime,
    size: int,
    tokens_a: pw.Field,
    tokens_b: pw.Field | None,
) -> list[tuple]:
    """(bucket, status, calls, tokens_a, tokens_b, duration sum/count, ttft sum/count)."""
    ttft = getattr(table, "ttft", None)
    none = pw.SQL("NULL")
    query = (
        table.select(
            _bucket(table, size).alias("bucket"),
            table.status,
            pw.fn.COUNT(table.id),
            pw.fn.SUM(tokens_a),
            pw.fn.SUM(tokens_b) if tokens_b is not None else none,
            pw.fn.SUM(table.duration),
            pw.fn.COUNT(table.duration),
            pw.fn.SUM(ttft) if ttft is not None else none,
            pw.fn.COUNT(ttft) if ttft is not None else pw.SQL("0"),
        )
        .where((table.created_at >= since) & (table.deleted == False))  # noqa: E712
        # By alias: PostgreSQL cannot tell two bound copies of the expression are one.
        .group_by(pw.SQL("bucket"), table.status)
    )
    return list(query.tuples())


def _model_mix(table: type[pw.Model], since: datetime, kind: str) -> list[tuple[str, int, str]]:
    """The most used models, ``name@provider`` counted as ``name`` (as NexusGate shows them)."""
    calls = pw.fn.COUNT(table.id)
    query = (
        table.select(table.model, calls)
        .where((table.created_at >= since) & (table.deleted == False))  # noqa: E712
        .group_by(table.model)
        .order_by(calls.desc())
        .limit(TOP_MODELS * 5)
    )
    mix: Counter = Counter()
    for model, count in query.tuples():
        mix[model.split("@", 1)[0]] += count
    return [(model, count, kind) for model, count in mix.most_common(TOP_MODELS)]


@dataclass
class KeyUsage:
    """One key's calls and reported tokens since some moment."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_by_key(since: datetime | None = None, key: int | None = None) -> dict[int, KeyUsage]:
    """Calls and tokens per key id, since ``since`` and of one key if given.

    Live records of every status, as the overview counts them: every token count an
    upstream reported, except a replay's (it counts as a call, not as tokens).
    """
    tokens = pw.Case(None, [(Completion.status == "cache_hit", 0)], Completion.prompt_tokens)
    answer = pw.Case(None, [(Completion.status == "cache_hit", 0)], Completion.completion_tokens)
    query = (
        Completion.select(
            Completion.api_key,
            pw.fn.COUNT(Completion.id),
            pw.fn.COALESCE(pw.fn.SUM(tokens), 0),
            pw.fn.COALESCE(pw.fn.SUM(answer), 0),
        )
        .where(Completion.deleted == False)  # noqa: E712
        .group_by(Completion.api_key)
    )
    if since is not None:
        query = query.where(Completion.created_at >= since)
    if key is not None:
        query = query.where(Completion.api_key == key)
    return {key: KeyUsage(calls, int(p), int(c)) for key, calls, p, c in query.tuples()}


def total(usages: Iterable[KeyUsage]) -> KeyUsage:
    """Several keys' usage added up."""
    out = KeyUsage()
    for usage in usages:
        out.calls += usage.calls
        out.prompt_tokens += usage.prompt_tokens
        out.completion_tokens += usage.completion_tokens
    return out


def embedding_tokens(key: int | None = None) -> int:
    """Input tokens of live embedding records, of one key if given; unknown counts left out."""
    query = Embedding.select(pw.fn.COALESCE(pw.fn.SUM(Embedding.input_tokens), 0)).where(
        Embedding.deleted == False  # noqa: E712
    )
    if key is not None:
        query = query.where(Embedding.api_key == key)
    return int(query.scalar())


def key_totals(key: int) -> KeyUsage:
    """One key's lifetime usage (``GET /api/usage``), on a connection of its own."""
    with connection():
        return total(usage_by_key(key=key).values())
