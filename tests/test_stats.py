"""The overview's aggregates (bucketed in SQL) and GET /api/admin/stats/overview.

Rows are written at known moments before a fixed ``now``, so every bucket, rate and
average can be checked by hand. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from gateway import stats
from gateway.db import database
from gateway.models import ApiKey, Completion, Embedding
from tests.servers import ADMIN_SECRET

NOW = datetime(2026, 3, 4, 12, 0, 0)  # on a 2-minute boundary: 1h buckets are exact
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


def completion(key: ApiKey, ago: float, status: str, **fields: object) -> Completion:
    return Completion.create(
        uid=uuid.uuid4().hex,
        api_key=key.id,
        model=fields.pop("model", "gpt-4o"),
        api_format="openai-chat",
        status=status,
        created_at=NOW - timedelta(seconds=ago),
        **fields,
    )


@pytest.fixture
def key(app) -> ApiKey:  # type: ignore[no-untyped-def]
    with database.connection_context():
        return ApiKey.issue(comment="stats")[0]


def test_buckets_statuses_tokens_and_latency(key: ApiKey) -> None:
    with database.connection_context():
        # Bucket 11:58-12:00 (the second-last): one of every status.
        completion(key, 100, "completed", prompt_tokens=10, completion_tokens=5, duration=1000,
                   ttft=100)  # fmt: skip
        completion(key, 101, "aborted", prompt_tokens=20, completion_tokens=30, duration=3000,
                   ttft=300)  # fmt: skip
        completion(key, 102, "failed", duration=9000)
        completion(key, 103, "pending")
        completion(key, 104, "cache_hit", prompt_tokens=999, completion_tokens=999, duration=1)
        # Unknown tokens stay unknown: they add nothing, and are not averaged as 0.
        completion(key, 1700, "completed", duration=2000)
        # Outside the range, or deleted: not counted.
        completion(key, 3700, "failed")
        completion(key, 50, "failed", deleted=True)
        Embedding.create(
            uid=uuid.uuid4().hex, api_key=key.id, model="embed", status="completed",
            input_tokens=7, duration=40, created_at=NOW - timedelta(seconds=300),
        )  # fmt: skip
        data = stats.overview("1h", now=NOW)

    assert data.bucket_seconds == 120
    assert data.buckets[0].start == NOW - timedelta(hours=1)
    assert data.buckets[-1].start == NOW  # the bucket now is in, so nothing recent is lost
    assert len(data.buckets) == 31
    busy = data.buckets[-2]
    assert busy.start == NOW - timedelta(minutes=2)
    assert dict(busy.completions) == {
        "completed": 1,
        "aborted": 1,
        "failed": 1,
        "pending": 1,
        "cache_hit": 1,
    }
    assert (busy.prompt_tokens, busy.completion_tokens) == (30, 35)  # the replay is free
    assert busy.duration.value == 2000  # completed and aborted only
    assert busy.ttft.value == 200
    assert busy.success_rate == pytest.approx(2 / 3)  # completed + cache hit, over + failed
    assert data.buckets[-4].start == NOW - timedelta(minutes=6)
    assert dict(data.buckets[-4].embeddings) == {"completed": 1}

    assert data.requests == 7
    assert data.completions.total() == 6 and data.embeddings.total() == 1
    assert data.statuses["failed"] == 1
    assert data.success_rate == pytest.approx(4 / 5)  # 2 completed, a replay, an embedding
    assert data.avg_duration == pytest.approx((1000 + 3000 + 2000 + 40) / 4)
    assert data.avg_ttft == 200
    assert (data.prompt_tokens, data.completion_tokens, data.embedding_tokens) == (30, 35, 7)
    assert data.tokens == 72


def test_nothing_finished_means_no_rate_and_no_average(key: ApiKey) -> None:
    with database.connection_context():
        completion(key, 10, "pending")
        completion(key, 20, "aborted")  # the client left: neither success nor failure
        data = stats.overview("5m", now=NOW)
    assert data.success_rate is None
    assert data.avg_duration is None and data.avg_ttft is None
    assert stats.success_rate(data.statuses) is None


def test_model_mix_counts_pinned_providers_as_the_model(key: ApiKey) -> None:
    with database.connection_context():
        for ago, model in enumerate(["gpt-4o", "gpt-4o@openai", "gpt-4o@azure", "claude"]):
            completion(key, ago + 1, "completed", model=model)
        Embedding.create(
            uid=uuid.uuid4().hex, api_key=key.id, model="embed", status="completed",
            created_at=NOW - timedelta(seconds=5),
        )  # fmt: skip
        data = stats.overview("10m", now=NOW)
    assert data.models == [("gpt-4o", 3, "chat"), ("claude", 1, "chat"), ("embed", 1, "embedding")]


@pytest.mark.parametrize("range_key", list(stats.RANGES))
def test_every_range_has_whole_buckets_up_to_now(key: ApiKey, range_key: str) -> None:
    seconds, size = stats.RANGES[range_key]
    with database.connection_context():
        completion(key, 0, "completed")
        completion(key, seconds - 1, "completed")
        data = stats.overview(range_key, now=NOW)
    assert data.requests == 2
    assert all((b.start - stats.EPOCH).total_seconds() % size == 0 for b in data.buckets)
    assert data.buckets[0].start <= NOW - timedelta(seconds=seconds) < data.buckets[1].start
    assert sum(b.completions.total() for b in data.buckets) == 2


def test_usage_by_key(key: ApiKey) -> None:
    with database.connection_context():
        other = ApiKey.issue(comment="other")[0]
        completion(key, 10, "completed", prompt_tokens=3, completion_tokens=4)
        completion(key, 20, "cache_hit", prompt_tokens=100, completion_tokens=100)
        completion(key, 30, "failed")
        completion(other, 10, "completed", prompt_tokens=1, completion_tokens=1)
        completion(other, 90_000, "completed", prompt_tokens=50, completion_tokens=50)
        usage = stats.usage_by_key(NOW - timedelta(days=1))
    assert (usage[key.id].calls, usage[key.id].tokens) == (3, 7)
    assert (usage[other.id].calls, usage[other.id].tokens) == (1, 2)


def test_admin_endpoint_speaks_nexusgate(client, key: ApiKey) -> None:  # type: ignore[no-untyped-def]
    with database.connection_context():
        now = datetime.utcnow()  # the endpoint reads the real clock
        for ago, status in ((5, "completed"), (6, "failed"), (7, "aborted")):
            Completion.create(
                uid=uuid.uuid4().hex, api_key=key.id, model="gpt-4o", api_format="openai-chat",
                status=status, created_at=now - timedelta(seconds=ago), duration=100 * ago,
                prompt_tokens=ago, completion_tokens=1,
            )  # fmt: skip
    assert client.get("/api/admin/stats/overview").status_code == 401
    bad = client.get("/api/admin/stats/overview?range=2h", headers=ADMIN)
    assert bad.status_code == 400 and "range must be one of" in bad.json["error"]

    body = client.get("/api/admin/stats/overview?range=5m", headers=ADMIN).json
    summary = body["summary"]
    assert summary["totalRequests"] == 3 == summary["completionsCount"]
    assert summary["embeddingsCount"] == 0
    assert summary["completionsSuccessRate"] == 50.0
    assert summary["embeddingsSuccessRate"] == 100.0  # nothing finished: as NexusGate
    assert summary["avgDuration"] == 600  # (500 + 700) / 2: completed and aborted
    assert body["tokenUsage"] == {
        "promptTokens": 18,
        "completionTokens": 3,
        "embeddingTokens": 0,
        "totalTokens": 21,
    }
    assert body["modelDistribution"] == [{"model": "gpt-4o", "count": 3, "type": "chat"}]
    series = body["timeSeries"]
    assert len(series) >= 20 and series[0]["timestamp"].endswith("Z")
    assert sum(b["completionsCount"] for b in series) == 3
    assert sum(b["completionsFailed"] for b in series) == 1
    assert set(series[0]) >= {
        "timestamp",
        "completionsCount",
        "embeddingsCount",
        "completionsFailed",
        "embeddingsFailed",
        "avgDuration",
        "avgTTFT",
    }
    default = client.get("/api/admin/stats/overview", headers=ADMIN).json
    assert default["range"] == "1h" and default["bucketSeconds"] == 120
