"""Rows -> admin JSON, field by field, so no secret can leak by accident.

camelCase as NexusGate's admin API. Token counts and timings the upstream did not
report are stored as NULL and shown as -1, NexusGate's "unknown". Gateway keys
appear only as a hint; provider keys are masked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.ledger import Ledger, Total
from gateway.models import ApiKey, Completion, Embedding, Model, Provider, Setting, SrvLog
from gateway.redact import mask
from gateway.stats import Overview, success_rate

UNKNOWN = -1


def iso(value: datetime | None) -> str | None:
    """Naive UTC -> ISO 8601 with a Z, as JavaScript prints it."""
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def _known(value: int | None) -> int:
    return UNKNOWN if value is None else value


def api_key(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "key": row.key_hint,
        "comment": row.comment,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "expiresAt": iso(row.expires_at),
        "lastSeen": iso(row.last_seen),
        "revoked": row.revoked,
        "rpmLimit": row.rpm_limit,
        "tpmLimit": row.tpm_limit,
        "maxConcurrent": row.max_concurrent,
        "externalId": row.external_id,
        "source": row.source,
        "budgetUsd": row.budget_usd,
    }


def provider(row: Provider) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "type": row.type,
        "baseUrl": row.base_url,
        "apiKey": mask(row.api_key),
        "apiVersion": row.api_version,
        "comment": row.comment,
        "streamUsage": row.stream_usage,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "deleted": row.deleted,
    }


def model(row: Model) -> dict[str, Any]:
    return {
        "id": row.id,
        "providerId": row.provider_id,
        "systemName": row.system_name,
        "remoteId": row.remote_id,
        "modelType": row.model_type,
        "contextLength": row.context_length,
        "inputPrice": row.input_price,
        "outputPrice": row.output_price,
        "cacheReadPrice": row.cache_read_price,
        "cacheWritePrice": row.cache_write_price,
        "weight": row.weight,
        "comment": row.comment,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "deleted": row.deleted,
    }


def _record(row: Completion | Embedding, provider_name: str | None) -> dict[str, Any]:
    """The fields every call record has."""
    return {
        "id": row.id,
        "uid": row.uid,
        "apiKeyId": row.api_key_id,
        "modelId": row.model_id,
        "providerId": row.provider_id,
        "providerName": provider_name,
        "model": row.model,
        "status": row.status,
        "duration": _known(row.duration),
        "error": row.error,
        # Each try with the provider's request id (None in rows older than that field).
        "attempts": [{**a, "requestId": a.get("requestId")} for a in row.attempts or []],
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "deleted": row.deleted,
        # Finalised by the sweeper (its process died with the call in flight); sweptAt
        # stays when the call's own process, alive after all, wrote its true end later.
        "swept": row.swept,
        "sweptAt": iso(row.swept_at),
    }


def tokens(usage: dict | None) -> dict[str, int | None]:
    """A record's token classes: ``input`` includes the cached ones; None where unknown."""
    usage = usage or {}
    return {name: usage.get(field) for name, field in TOKEN_CLASSES}


TOKEN_CLASSES = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cacheRead", "cache_read_tokens"),
    ("cacheWrite", "cache_write_tokens"),
    ("cacheWrite1h", "cache_write_1h_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def completion(row: Completion, provider_name: str | None = None) -> dict[str, Any]:
    return {
        **_record(row, provider_name),
        "upstreamId": row.upstream_id,
        "responseModel": row.response_model,
        "stopReason": row.stop_reason,
        "apiFormat": row.api_format,
        "stream": row.stream,
        "prompt": row.prompt,
        "promptTokens": _known(row.prompt_tokens),
        "completion": row.completion or [],
        "completionTokens": _known(row.completion_tokens),
        "usage": row.usage,
        "tokens": tokens(row.usage),
        "cost": row.cost,
        "delivered": row.delivered,
        "ttft": _known(row.ttft),
        "reqId": row.req_id,
        "sourceCompletionId": row.source_completion_id,
        "rating": row.rating,
    }


def embedding(row: Embedding, provider_name: str | None = None) -> dict[str, Any]:
    return {
        **_record(row, provider_name),
        "input": row.input,
        "inputTokens": _known(row.input_tokens),
        "tokens": {"input": row.input_tokens},
        "cost": row.cost,
        "embedding": row.embedding,
        "dimensions": row.dimensions,
    }


def setting(row: Setting) -> dict[str, Any]:
    return {"id": row.id, "key": row.key, "value": row.value, "updatedAt": iso(row.updated_at)}


def srv_log(row: SrvLog) -> dict[str, Any]:
    return {
        "id": row.id,
        "relatedApiKeyId": row.related_api_key_id,
        "relatedUpstreamId": row.related_upstream_id,
        "relatedCompletionId": row.related_completion_id,
        "message": row.message,
        "level": row.level,
        "details": row.details,
        "createdAt": iso(row.created_at),
        "acknowledged": row.acknowledged,
        "ackAt": iso(row.ack_at),
    }


def overview(stats: Overview, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """``GET /stats/overview`` in NexusGate's fields (and ``cost``, the range's ledger)."""
    # As NexusGate: rates in percent (100 when nothing finished), whole milliseconds,
    # 0 for an average of nothing. Extra fields: byStatus and per-bucket tokens.

    def percent(rate: float | None) -> float:
        return 100.0 if rate is None else round(rate * 100, 2)

    def ms(value: float | None) -> int:
        return 0 if value is None else round(value)

    return {
        "range": stats.range,
        "bucketSeconds": stats.bucket_seconds,
        "summary": {
            "totalRequests": stats.requests,
            "completionsCount": stats.completions.total(),
            "embeddingsCount": stats.embeddings.total(),
            "completionsSuccessRate": percent(success_rate(stats.completions)),
            "embeddingsSuccessRate": percent(success_rate(stats.embeddings)),
            "avgDuration": ms(stats.avg_duration),
            "avgTTFT": ms(stats.avg_ttft),
            "byStatus": dict(stats.completions + stats.embeddings),
        },
        "tokenUsage": {
            "promptTokens": stats.prompt_tokens,
            "completionTokens": stats.completion_tokens,
            "embeddingTokens": stats.embedding_tokens,
            "totalTokens": stats.tokens,
        },
        "modelDistribution": [
            {"model": model, "count": count, "type": kind} for model, count, kind in stats.models
        ],
        "timeSeries": [
            {
                "timestamp": iso(b.start),
                "completionsCount": b.completions.total(),
                "embeddingsCount": b.embeddings.total(),
                "completionsFailed": b.completions["failed"],
                "embeddingsFailed": b.embeddings["failed"],
                "avgDuration": ms(b.duration.value),
                "avgTTFT": ms(b.ttft.value),
                "byStatus": dict(b.statuses),
                "promptTokens": b.prompt_tokens,
                "completionTokens": b.completion_tokens,
                "embeddingTokens": b.embedding_tokens,
            }
            for b in stats.buckets
        ],
        "cost": cost,
    }


def _total(total: Total) -> dict[str, Any]:
    return {
        "calls": total.calls,
        "costUsd": total.usd,
        "unpricedCalls": total.unpriced,
        "inputTokens": total.prompt_tokens,
        "outputTokens": total.completion_tokens,
    }


def ledger(
    book: Ledger, keys: dict[int, ApiKey], providers: dict[int, str], since: datetime | None
) -> dict[str, Any]:
    """Cost totals over a range, and by key, model and provider (costliest first)."""
    return {
        "since": iso(since),
        "currency": "USD",
        **_total(book.total),
        "byKey": [
            {
                "apiKeyId": key_id,
                "key": keys[key_id].key_hint if key_id in keys else None,
                "comment": keys[key_id].comment if key_id in keys else None,
                **_total(total),
            }
            for key_id, total in book.ranked(book.by_key)
        ],
        "byModel": [{"model": name, **_total(total)} for name, total in book.ranked(book.by_model)],
        "byProvider": [
            {"providerId": pid, "providerName": providers.get(pid), **_total(total)}
            for pid, total in book.ranked(book.by_provider)
        ],
    }
