"""The Requests and Embeddings pages: tables with filters, details, and downloads."""

from __future__ import annotations

from typing import Any

from flask import Response, abort, render_template, request

from gateway import export, records, serializers
from gateway.dashboard.blueprint import bp, zone
from gateway.models import Completion, Embedding


@bp.get("/requests")
def requests_list():
    return _table(Completion, "dashboard/requests.html")


@bp.get("/requests/<id:record_id>")
def request_detail(record_id: int):
    found = records.detail(Completion, record_id)
    tokens = serializers.tokens(found["row"].usage)
    return render_template("dashboard/request.html", tokens=tokens, **found)


@bp.get("/embeddings")
def embeddings_list():
    return _table(Embedding, "dashboard/embeddings.html")


@bp.get("/embeddings/<id:record_id>")
def embedding_detail(record_id: int):
    return render_template("dashboard/embedding.html", **records.detail(Embedding, record_id))


@bp.get("/requests/export")
def requests_export():
    return _download(Completion, serializers.completion)


@bp.get("/embeddings/export")
def embeddings_export():
    return _download(Embedding, serializers.embedding)


def _table(table: Any, template: str) -> str:
    listing = records.listing(table, request.args, zone())
    return render_template(
        template, listing=listing, bounds=records.bounds(table), **records.names(listing.rows)
    )


def _download(table: Any, serialize: Any) -> Response:
    """What the table shows, every page of it, as a file (the same query string)."""
    fmt = request.args.get("format", "csv")
    if fmt not in export.FORMATS:
        abort(404)
    found = records.parse(table, request.args, strict=False, zone=zone())
    return records.attachment(table, found, serialize, fmt)
