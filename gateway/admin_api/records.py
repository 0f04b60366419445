"""``/api/admin/completions`` and ``/embeddings``: call records, paged, exported, deleted.

Lists are ``{data, total, from}``, newest first, filtered as ``records.select`` filters
them (the total honours the filters; NexusGate's did not). Deleting is soft and answers
as NexusGate's does: the row for a completion, ``{success: true}`` for an embedding.
"""

from __future__ import annotations

from typing import Any

import peewee as pw
from flask import Response, request

from gateway import export, jsonio, records, registry, search, serializers, urlargs
from gateway.admin_api.blueprint import MAX_PAGE, bp, int_arg
from gateway.models import Completion, Embedding, utcnow


@bp.get("/completions")
def list_completions() -> Response:
    return _list_records(Completion, serializers.completion, default_limit=100)


@bp.get("/completions/export")
def export_completions() -> Response:
    return _export(Completion, serializers.completion)


@bp.get("/completions/<id:record_id>")
def get_completion(record_id: int) -> Response:
    return _one_record(Completion, serializers.completion, record_id)


@bp.delete("/completions/<id:record_id>")
def delete_completion(record_id: int) -> Response:
    row = _delete_record(Completion, record_id)
    return jsonio.response(serializers.completion(row))


@bp.get("/embeddings")
def list_embeddings() -> Response:
    return _list_records(Embedding, serializers.embedding, default_limit=20)


@bp.get("/embeddings/export")
def export_embeddings() -> Response:
    return _export(Embedding, serializers.embedding)


@bp.get("/embeddings/<id:record_id>")
def get_embedding(record_id: int) -> Response:
    return _one_record(Embedding, serializers.embedding, record_id)


@bp.delete("/embeddings/<id:record_id>")
def delete_embedding(record_id: int) -> Response:
    _delete_record(Embedding, record_id)
    return jsonio.response({"success": True})


def _list_records(table: type[pw.Model], serialize: Any, default_limit: int) -> Response:
    """A page of records, newest first, filtered as ``records.select`` filters them."""
    found = _search(table)
    query = records.select(table, found=found)
    offset = int_arg("offset", 0, 0, urlargs.MAX_ID)
    limit = int_arg("limit", default_limit, 1, MAX_PAGE)
    total, exact = records.total(query)  # the filters apply to the total too (NexusGate's did not)
    rows = records.page(query, table, offset, limit, found, exact)
    names = registry.provider_names({r.provider_id for r in rows})
    data = [serialize(r, names.get(r.provider_id)) for r in rows]
    page = {"data": data, "total": total, "from": offset}
    if not exact:
        page["totalExact"] = False  # past SEARCH_COUNT_CAP: the planner's estimate
    return jsonio.response(page)


def _export(table: type[pw.Model], serialize: Any) -> Response:
    """Every record the filters match, streamed as CSV or JSON Lines (``format``)."""
    fmt = request.args.get("format", "jsonl")
    if fmt not in export.FORMATS:
        raise registry.Refused(400, f"format must be one of {', '.join(export.FORMATS)}")
    return records.attachment(table, _search(table), serialize, fmt)


def _search(table: type[pw.Model]) -> search.Search:
    try:
        return records.parse(table, request.args, strict=True)
    except search.Invalid as exc:
        raise registry.Refused(400, str(exc)) from exc


def _one_record(table: type[pw.Model], serialize: Any, record_id: int) -> Response:
    row = _record_row(table, record_id)
    name = registry.provider_names({row.provider_id}).get(row.provider_id)
    return jsonio.response(serialize(row, name))


def _delete_record(table: type[pw.Model], record_id: int) -> Any:
    """Soft delete; the row as the delete left it, or a 404 if it took none."""
    # One statement, reading back what it changed: a read before it let two deletes at
    # once both answer 200, and one after it found nothing when retention had deleted
    # the row meanwhile (a 500).
    query = table.update(deleted=True, updated_at=utcnow()).where(
        (table.id == record_id) & (table.deleted == False)  # noqa: E712
    )
    taken = list(query.returning(table).execute())
    if not taken:
        raise registry.Refused(404, f"{table.__name__} not found")
    return taken[0]


def _record_row(table: type[pw.Model], row_id: int) -> Any:
    row = records.live(table, row_id)
    if row is None:
        raise registry.Refused(404, f"{table.__name__} not found")
    return row
