"""``/api/admin/usage``, ``/embeddings/usage`` and ``/stats/overview``: token sums, costs
and the overview's numbers."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask import Response, request

from gateway import jsonio, ledger, registry, serializers, stats, urlargs
from gateway.admin_api.blueprint import bp, int_arg
from gateway.models import ApiKey, utcnow


@bp.get("/usage")
def usage() -> Response:
    """Token sums (NexusGate's two fields) and what calls cost, by key, model and provider.

    ``apiKey``: one key's; ``range``: the overview's ranges, or ``month`` (this calendar
    month, UTC, a budget's month); all time without.
    """
    key = registry.key_row(request.args["apiKey"]).id if request.args.get("apiKey") else None
    range_key = request.args.get("range") or None
    if range_key is not None and range_key not in (*stats.RANGES, "month"):
        raise registry.Refused(400, f"range must be one of {', '.join(stats.RANGES)}, month")
    since = _since(range_key)
    totals = stats.total(stats.usage_by_key(since=since, key=key).values())
    return jsonio.response(
        {
            "total_prompt_tokens": totals.prompt_tokens,
            "total_completion_tokens": totals.completion_tokens,
            "range": range_key,
            **_ledger(since, key),
        }
    )


@bp.get("/embeddings/usage")
def embeddings_usage() -> Response:
    """Embedding input tokens, of one key (``apiKeyId``) or all, as NexusGate's answer."""
    key = int_arg("apiKeyId", None, 1, urlargs.MAX_ID)
    return jsonio.response({"total_input_tokens": stats.embedding_tokens(key)})


@bp.get("/stats/overview")
def stats_overview() -> Response:
    range_key = request.args.get("range") or stats.DEFAULT_RANGE
    if range_key not in stats.RANGES:
        raise registry.Refused(400, f"range must be one of {', '.join(stats.RANGES)}")
    data = stats.overview(range_key)
    return jsonio.response(serializers.overview(data, _ledger(data.since)))


def _since(range_key: str | None) -> datetime | None:
    if range_key == "month":
        return ledger.month_start(utcnow())
    return utcnow() - timedelta(seconds=stats.RANGES[range_key][0]) if range_key else None


def _ledger(since: datetime | None, key: int | None = None) -> dict[str, Any]:
    book = ledger.ledger(since, key)
    keys = {k.id: k for k in ApiKey.select().where(ApiKey.id.in_(list(book.by_key) or [0]))}
    providers = registry.provider_names(set(book.by_provider))
    return serializers.ledger(book, keys, providers, since)
