"""Call records as lists: the one filtered query, and the dashboard's pages of it.

``select`` is the query the admin API and the dashboard share: live (not soft-deleted)
records, filtered by status, model, key, model id and time. One model rule for both:
a system name matches its calls whether or not the caller pinned a provider
(``gpt-4o`` finds ``gpt-4o`` and ``gpt-4o@azure``, never ``gpt-4o-mini``, which a
prefix match would). A dashboard listing reads its filters from a query-string
mapping, ignores values it does not know rather than failing, and selects only the
columns a table shows: prompts, answers and vectors can be megabytes per row. Totals
honour the filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from flask import abort, url_for

from gateway import registry
from gateway.models import STATUSES, ApiKey, Completion, Embedding, Model, utcnow
from gateway.urlargs import MAX_ID, integer

RANGES = {"1h": 3600, "24h": 86400, "7d": 604800, "30d": 2592000}
PAGE_SIZES = (10, 20, 50, 100)
DEFAULT_SIZE = 20
COLUMNS = {
    Completion: (
        Completion.id,
        Completion.created_at,
        Completion.status,
        Completion.model,
        Completion.provider_id,
        Completion.api_key,
        Completion.prompt_tokens,
        Completion.completion_tokens,
        Completion.ttft,
        Completion.duration,
        Completion.stream,
        Completion.cost_nanos,
    ),
    Embedding: (
        Embedding.id,
        Embedding.created_at,
        Embedding.status,
        Embedding.model,
        Embedding.provider_id,
        Embedding.api_key,
        Embedding.input,  # for the preview; inputs are small next to their vectors
        Embedding.input_tokens,
        Embedding.dimensions,
        Embedding.duration,
        Embedding.cost_nanos,
    ),
}


@dataclass
class Listing:
    """A filtered, paginated table: the filters as understood, the rows, the counts."""

    status: str = ""
    model: str = ""
    key: int | None = None
    range: str = ""
    page: int = 1
    size: int = DEFAULT_SIZE
    total: int = 0
    rows: list = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def first(self) -> int:
        return min(self.total, (self.page - 1) * self.size + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.page * self.size)

    @property
    def filtered(self) -> bool:
        return bool(self.status or self.model or self.key is not None or self.range)

    def url(self, endpoint: str, **changes: Any) -> str:
        """This listing's URL with some parameters changed (blank and default ones dropped)."""
        params = {
            "status": self.status,
            "model": self.model,
            "key": self.key,
            "range": self.range,
            "size": self.size if self.size != DEFAULT_SIZE else None,
            "page": self.page if self.page != 1 else None,
            **changes,
        }
        query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
        return url_for(endpoint) + (f"?{query}" if query else "")


def select(
    table: Any,
    *columns: Any,
    status: str = "",
    model: str = "",
    key: int | None = None,
    model_id: int | None = None,
    since: datetime | None = None,
) -> Any:
    """Live records of ``table`` that match every filter given (all columns by default)."""
    query = table.select(*columns).where(table.deleted == False)  # noqa: E712
    if status:
        query = query.where(table.status == status)
    if model:
        query = query.where((table.model == model) | table.model.startswith(model + "@"))
    if key is not None:
        query = query.where(table.api_key == key)
    if model_id is not None:
        query = query.where(table.model_id == model_id)
    if since is not None:
        query = query.where(table.created_at >= since)
    return query


def newest_first(query: Any, table: Any) -> Any:
    """``query`` ordered by when the call arrived, newest first."""
    # Not by id: ids follow write order, which the recorder may batch.
    return query.order_by(table.created_at.desc(), table.id.desc())


def live(table: Any, record_id: int) -> Any:
    """One live record by id, or None."""
    return table.get_or_none((table.id == record_id) & (table.deleted == False))  # noqa: E712


def listing(table: Any, args: Mapping[str, str]) -> Listing:
    """One page of ``table``'s records, newest first, filtered as ``args`` ask."""
    found = Listing(
        status=args.get("status", "") if args.get("status") in STATUSES else "",
        model=args.get("model", "").strip(),
        key=integer(args.get("key"), 1, MAX_ID),
        range=args.get("range", "") if args.get("range") in RANGES else "",
        size=size if (size := integer(args.get("size"), 1, 100)) in PAGE_SIZES else DEFAULT_SIZE,
    )
    since = utcnow() - timedelta(seconds=RANGES[found.range]) if found.range else None
    query = select(
        table,
        *COLUMNS[table],
        status=found.status,
        model=found.model,
        key=found.key,
        since=since,
    )
    found.total = query.count()
    found.page = min(max(1, integer(args.get("page"), 1, MAX_ID) or 1), found.pages)
    found.rows = list(newest_first(query, table).paginate(found.page, found.size))
    return found


def names(rows: list) -> dict[str, Any]:
    """What a record table shows beside its rows: provider names, keys, model names."""
    return {
        "providers": registry.provider_names({r.provider_id for r in rows}),
        "keys": {k.id: k for k in ApiKey.select().order_by(ApiKey.id)},
        "models": sorted({m.system_name for m in Model.active()}),
    }


def detail(table: Any, record_id: int) -> dict[str, Any]:
    """One live record with its key and provider name, or a 404."""
    row = live(table, record_id)
    if row is None:
        abort(404)
    return {
        "row": row,
        "key": ApiKey.get_or_none(ApiKey.id == row.api_key_id),
        "provider": registry.provider_names({row.provider_id}).get(row.provider_id),
    }
