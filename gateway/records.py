"""Call records as lists: the one filtered query, its total, its pages and its batches.

``select`` is the query the admin API and the dashboard share: live (not soft-deleted)
records matching a ``search.Search`` (status, model, key, provider, API format, time,
bounds on duration, TTFT, tokens and cost, full text). One model rule for both: a
system name matches its calls whether or not the caller pinned a provider (``gpt-4o``
finds ``gpt-4o`` and ``gpt-4o@azure``, never ``gpt-4o-mini``, which a prefix match
would). A dashboard listing reads its filters from a query-string mapping, ignores
values it does not know rather than failing, and selects only the columns a table
shows: prompts, answers and vectors can be megabytes per row.

Totals honour the filters, within a bound: counting a million matching rows takes
longer than the page itself, so ``total`` counts up to ``SEARCH_COUNT_CAP`` rows
exactly and, past that, on PostgreSQL says what the planner estimates (never less
than the cap), marked as not exact; SQLite counts exactly. Downloads read in
``batches``: keyset pages (created_at, id), never the whole table at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any
from urllib.parse import urlencode

import gevent
import peewee as pw
from flask import Response, abort, current_app, url_for

from gateway import export, fulltext, registry, search
from gateway.db import (
    DatabaseTimeout,
    bounded,
    connection,
    database,
    is_postgres,
    lock_timeout,
)
from gateway.models import (
    ApiKey,
    Completion,
    Embedding,
    Model,
    Provider,
    utcnow,
)
from gateway.search import Search
from gateway.urlargs import MAX_ID, Pages, integer
from gateway.writes import index_all_due

log = logging.getLogger(__name__)

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
        Completion.api_format,
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
class Listing(Pages):
    """A filtered, paginated table: the search as understood, the rows, the counts."""

    search: Search = field(default_factory=Search)
    zone: tzinfo = UTC  # the dashboard's: times in its URLs are local
    page: int = 1
    size: int = DEFAULT_SIZE
    total: int = 0
    exact: bool = True  # False: ``total`` is an estimate past the count cap
    cap: int = 0  # SEARCH_COUNT_CAP
    rows: list = field(default_factory=list)

    @property
    def filtered(self) -> bool:
        return self.search.filtered

    def url(self, endpoint: str, **changes: Any) -> str:
        """This listing's URL with some parameters changed (blank and default ones dropped)."""
        params = {
            **self.search.params(self.zone),
            "size": self.size if self.size != DEFAULT_SIZE else None,
            "page": self.page if self.page != 1 else None,
            **changes,
        }
        query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
        return url_for(endpoint) + (f"?{query}" if query else "")


def bounds(table: Any) -> tuple[str, ...]:
    """The numeric bounds ``table`` offers: those whose columns it has."""
    fields = table._meta.fields
    return tuple(n for n, cols in search.BOUNDS.items() if all(c in fields for c in cols))


def parse(table: Any, args: Mapping[str, str], *, strict: bool, zone: tzinfo = UTC) -> Search:
    """The search ``args`` ask of ``table`` (``search.Invalid`` if strict and unreadable)."""
    return search.parse(
        args, strict=strict, bounds=bounds(table), text=table is Completion, zone=zone
    )


def select(table: Any, *columns: Any, found: Search | None = None) -> Any:
    """Live records of ``table`` that match the search (all columns by default)."""
    found = found or Search()
    query = table.select(*columns).where(table.deleted == False)  # noqa: E712
    if found.status:
        query = query.where(table.status.in_(found.status))
    if found.model:
        # A pinned call's name up to its "@", compared as it is: peewee's startswith is
        # an ILIKE, which took another system name's pinned calls (Qwen@p for qwen).
        pinned = found.model + "@"
        prefix = pw.fn.SUBSTR(table.model, 1, len(pinned))
        query = query.where((table.model == found.model) | (prefix == pinned))
    if found.api_key is not None:
        query = query.where(table.api_key == found.api_key)
    if found.model_id is not None:
        query = query.where(table.model_id == found.model_id)
    if found.provider is not None:
        query = query.where(table.provider_id == found.provider)
    if found.api_format and "api_format" in table._meta.fields:
        query = query.where(table.api_format == found.api_format)
    since, until = found.window(utcnow())
    if since is not None:
        query = query.where(table.created_at >= since)
    if until is not None:
        query = query.where(table.created_at < until)
    for name, (low, high) in found.bounds.items():
        value = sum_of(table, search.BOUNDS[name])
        scale = search.SCALES.get(name, 1)
        if low is not None:
            query = query.where(value >= _bindable(low * scale))
        if high is not None:
            query = query.where(value <= _bindable(high * scale))
    terms = found.terms() if table is Completion else []
    if terms:
        _caught_up()
        query = query.where(fulltext.condition(table, terms))
    return query


def _bindable(bound: float) -> float:
    """A bound past any stored value (SQLite cannot bind an integer past 2^63-1) as
    that value: the rows it selects are the same."""
    return max(-MAX_ID, min(MAX_ID, bound))


def _caught_up() -> None:
    """The calls' text due to the index gets there before it is searched (SQLite: the
    recorder hands it over in lots, ``writes.index_due``). A failure is logged and the
    search goes on: it may then miss the last few seconds' calls. So does a catch-up
    past ``DB_TIMEOUT``: SQLite's write lock held that long by another process (a
    worker's long write, a stuck holder: an outage for the recorder too), which the
    search waited for without bound, or a long outage's backlog, which the recorder
    indexes meanwhile. PostgreSQL indexes as it writes: no connection is opened for
    nothing."""
    if is_postgres():
        return
    expired = DatabaseTimeout("index catch-up timed out")
    try:
        with connection(), gevent.Timeout(lock_timeout(), expired):
            index_all_due()
    except DatabaseTimeout as exc:
        log.warning("records: searched without the text due to the full-text index (%s)", exc)
    except pw.PeeweeException:
        log.warning(
            "records: the text due to the full-text index could not be indexed", exc_info=True
        )


def sum_of(table: Any, columns: tuple[str, ...]) -> Any:
    """The columns added up (unknown if any is unknown)."""
    fields = [table._meta.fields[c] for c in columns]
    value = fields[0]
    for more in fields[1:]:
        value = value + more
    return value


def total(query: Any) -> tuple[int, bool]:
    """How many rows ``query`` matches, and whether that is exact (see the docstring)."""
    if not is_postgres():
        return query.count(), True
    cap = int(current_app.config["SEARCH_COUNT_CAP"])
    with _planned():
        counted = query.order_by().limit(cap + 1).count()
        if counted <= cap:
            return counted, True
        sql, params = query.order_by().sql()
        plan = database.execute_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return max(cap + 1, int(plan[0]["Plan"]["Plan Rows"])), False


@contextmanager
def _planned(*off: str) -> Iterator[None]:
    """A transaction whose queries are planned without ``off`` (PostgreSQL's enable_*).

    JIT is always off: compiling a plan the planner thinks costly (a full-table walk
    it will stop after twenty rows) takes longer than running it.
    """
    with database.atomic():
        for setting in ("jit", *off):
            database.execute_sql(f"SET LOCAL {setting} = off")
        yield


def newest_first(query: Any, table: Any) -> Any:
    """``query`` ordered by when the call arrived, newest first."""
    # Not by id: ids follow write order, which the recorder may batch.
    return query.order_by(table.created_at.desc(), table.id.desc())


def page(query: Any, table: Any, offset: int, limit: int, found: Search, exact: bool) -> list:
    """A page of ``query``'s rows, newest first; ``exact``: what ``total`` said of it."""
    return _rows(newest_first(query, table).offset(offset).limit(limit), found, exact)


def _rows(query: Any, found: Search, exact: bool) -> list:
    """The rows of an ordered query, planned for as many matches as the count found.

    PostgreSQL's planner cannot tell how many records a text search matches, and
    guesses wrong both ways: walking the whole table newest first, row by row, for a
    word that is nowhere (seconds), or gathering a hundred thousand matches to keep
    twenty. The count already knows: up to the cap (``exact``), gather the matches
    from the full-text index and sort them; past it, walk newest first and stop at
    the page (soon found: more than ``cap`` records match).
    """
    if not is_postgres():
        return list(query)
    if not found.terms():
        off: tuple[str, ...] = ()
    elif exact:
        off = ("enable_indexscan",)
    else:
        off = ("enable_bitmapscan", "enable_seqscan")
    with _planned(*off):
        return list(query)


def batches(table: Any, found: Search, exact: bool, size: int = 200) -> Iterator[list]:
    """Every matching record, newest first, ``size`` at a time (keyset pages)."""
    after = None
    while True:
        query = newest_first(select(table, found=found), table)
        if after is not None:
            created, row_id = after
            query = query.where(
                (table.created_at < created) | ((table.created_at == created) & (table.id < row_id))
            )
        rows = _rows(query.limit(size), found, exact)  # whole, before the caller yields
        if not rows:
            return
        yield rows
        after = (rows[-1].created_at, rows[-1].id)


def download(table: Any, found: Search, serialize: Any, exact: bool) -> Iterator[list[dict]]:
    """Every matching record as the admin API's JSON, a batch at a time, on its own connection.

    For a streamed response: it runs after the request's connection is gone, and after
    its bound (``bounded``), which is taken again here: a server that stopped answering
    mid-download held the request and its connection until it answered again.
    """
    with bounded(), connection():
        for rows in batches(table, found, exact):
            names = registry.provider_names({r.provider_id for r in rows})
            yield [serialize(r, names.get(r.provider_id)) for r in rows]


def attachment(table: Any, found: Search, serialize: Any, fmt: str) -> Response:
    """The matching records as a streamed download (``export.FORMATS``)."""
    header = list(serialize(table()))  # the fields of every record, known before the first
    exact = total(select(table, found=found))[1]  # how to plan the batches (see _rows)
    body = export.chunks(fmt, header, download(table, found, serialize, exact))
    name = f"{table._meta.table_name}-{utcnow():%Y%m%d-%H%M%S}.{fmt}"
    return Response(
        body,
        content_type=export.FORMATS[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def live(table: Any, record_id: int) -> Any:
    """One live record by id, or None."""
    return table.get_or_none((table.id == record_id) & (table.deleted == False))  # noqa: E712


def listing(table: Any, args: Mapping[str, str], zone: tzinfo = UTC) -> Listing:
    """One page of ``table``'s records, newest first, filtered as ``args`` ask."""
    found = Listing(
        search=parse(table, args, strict=False, zone=zone),
        zone=zone,
        size=size if (size := integer(args.get("size"), 1, 100)) in PAGE_SIZES else DEFAULT_SIZE,
    )
    query = select(table, *COLUMNS[table], found=found.search)
    found.total, found.exact = total(query)
    found.cap = int(current_app.config["SEARCH_COUNT_CAP"])
    found.turn_to(args.get("page"))
    offset = (found.page - 1) * found.size
    found.rows = page(query, table, offset, found.size, found.search, found.exact)
    return found


def names(rows: list) -> dict[str, Any]:
    """What a record table shows beside its rows: provider names, keys, models, providers."""
    return {
        "providers": registry.provider_names({r.provider_id for r in rows}),
        "keys": {k.id: k for k in ApiKey.select().order_by(ApiKey.id)},
        "models": sorted({m.system_name for m in Model.active()}),
        "all_providers": list(Provider.select(Provider.id, Provider.name).order_by(Provider.name)),
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
