"""Call records for the dashboard's tables: filters, one page of rows, the names beside them.

A listing reads its filters from a query-string mapping (status, model, key, time range,
page, page size), ignores values it does not know rather than failing, and selects only
the columns a table shows: prompts, answers and vectors can be megabytes per row.
Soft-deleted records are never shown. Totals honour the filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from flask import abort, url_for

from gateway import registry
from gateway.models import STATUSES, ApiKey, Completion, Embedding, Model, utcnow

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


def listing(table: Any, args: Mapping[str, str]) -> Listing:
    """One page of ``table``'s records, newest first, filtered as ``args`` ask."""
    found = Listing(
        status=args.get("status", "") if args.get("status") in STATUSES else "",
        model=args.get("model", "").strip(),
        key=_int(args.get("key")),
        range=args.get("range", "") if args.get("range") in RANGES else "",
        size=size if (size := _int(args.get("size"))) in PAGE_SIZES else DEFAULT_SIZE,
    )
    query = table.select(*COLUMNS[table]).where(table.deleted == False)  # noqa: E712
    if found.status:
        query = query.where(table.status == found.status)
    if found.model:  # a system name, whether or not the caller pinned a provider
        query = query.where(
            (table.model == found.model) | table.model.startswith(found.model + "@")
        )
    if found.key is not None:
        query = query.where(table.api_key == found.key)
    if found.range:
        query = query.where(table.created_at >= utcnow() - timedelta(seconds=RANGES[found.range]))
    found.total = query.count()
    found.page = min(max(1, _int(args.get("page")) or 1), found.pages)
    # By when the call arrived: ids follow write order, which the recorder may batch.
    found.rows = list(
        query.order_by(table.created_at.desc(), table.id.desc()).paginate(found.page, found.size)
    )
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
    row = table.get_or_none((table.id == record_id) & (table.deleted == False))  # noqa: E712
    if row is None:
        abort(404)
    return {
        "row": row,
        "key": ApiKey.get_or_none(ApiKey.id == row.api_key_id),
        "provider": registry.provider_names({row.provider_id}).get(row.provider_id),
    }


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
