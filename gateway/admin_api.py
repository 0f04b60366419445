"""The admin JSON API under ``/api/admin``, as NexusGate's (paths, camelCase fields).

Guarded by ``Authorization: Bearer $ADMIN_SUPER_SECRET`` (or ``x-api-key``); wrong
secrets are throttled per client address (``LOGIN_ATTEMPTS`` per ``LOGIN_WINDOW``,
shared by every instance through the limiter): past that, 429 with Retry-After, right
secret or not. The views are thin: the checked changes to keys, providers, models and
per-model limits live in ``registry`` (the dashboard makes them too), record lists in
``records``, JSON shapes in ``serializers``. Creates answer 200 with the object, as
NexusGate's do (its scripts check for 200). Gateway keys leave in full only once, at
creation. No input gets a 5xx: bodies are strict JSON (``jsonio``), ids in paths are 1
to 2^63-1 (else 404), query integers are ASCII digits within bounds, and NUL is refused.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

import peewee as pw
from flask import Blueprint, Response, current_app, request

from gateway import (
    auth,
    db,
    export,
    forwarded,
    jsonio,
    ledger,
    records,
    registry,
    search,
    serializers,
    stats,
    urlargs,
)
from gateway.limiter import limiter
from gateway.models import ApiKey, Completion, Embedding, Model, Provider, utcnow
from gateway.upstream import UpstreamError

bp = Blueprint("admin_api", __name__, url_prefix="/api/admin")
bp.record_once(urlargs.register)

MAX_PAGE = 1000


@bp.errorhandler(registry.Refused)
def _admin_error(exc: registry.Refused) -> Response:
    return jsonio.response({"error": exc.message}, exc.status)


@bp.before_request
def _require_admin() -> Response | None:
    db.connect()
    address = forwarded.address_of(request, current_app.config["TRUSTED_PROXIES"])
    wait = limiter.attempt(address)
    if wait:
        answer = jsonio.response(
            {"error": f"Too many wrong admin secrets from {address}: retry in {wait} s"}, 429
        )
        answer.headers["Retry-After"] = str(wait)
        return answer
    if not auth.is_admin(request.headers, auth.admin_secret(current_app)):
        return jsonio.response({"error": "Invalid admin secret"}, 401)
    limiter.succeeded(address)  # only wrong secrets count against an address
    return None


@bp.before_request
def _refuse_nul() -> None:
    # PostgreSQL refuses NUL in text: it must not reach a query from a path or an argument.
    if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
        raise registry.Refused(400, "The URL must not contain NUL characters")


@bp.get("/")
def index() -> Response:
    return jsonio.response(True)


# -- API keys -----------------------------------------------------------------


@bp.get("/apiKey")
def list_keys() -> Response:
    query = ApiKey.select().order_by(ApiKey.id)
    if not _flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return jsonio.response([serializers.api_key(k) for k in query])


@bp.get("/apiKey/managed")
def list_managed_keys() -> Response:
    query = ApiKey.select().where(ApiKey.source == "operator").order_by(ApiKey.id)
    if not _flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return jsonio.response([serializers.api_key(k) for k in query])


@bp.post("/apiKey")
def create_key() -> Response:
    row, key = registry.issue_key(registry.key_fields(_body()))
    return jsonio.response({**serializers.api_key(row), "key": key})


@bp.get("/apiKey/<key>")
def get_key(key: str) -> Response:
    return jsonio.response(serializers.api_key(registry.key_row(key)))


@bp.delete("/apiKey/<key>")
def revoke_key(key: str) -> Response:
    row = registry.key_row(key)
    registry.revoke(row)
    return jsonio.response({"id": row.id, "key": row.key_hint, "revoked": True})


@bp.put("/apiKey/<key>/ratelimit")
def set_key_limits(key: str) -> Response:
    data = registry.fields(_body(), registry.LIMITS)
    row = registry.key_row(key)
    registry.edit_key(row, data)
    row = registry.key_row(key)
    return jsonio.response(
        {
            "key": row.key_hint,
            "rpmLimit": row.rpm_limit,
            "tpmLimit": row.tpm_limit,
            "maxConcurrent": row.max_concurrent,
        }
    )


@bp.get("/apiKey/<key>/usage")
def key_limit_usage(key: str) -> Response:
    """What the key has used of its limits now, from the buckets every instance shares."""
    row = registry.key_row(key)
    return jsonio.response(
        {
            "key": row.key_hint,
            "limits": {"rpm": row.rpm_limit, "tpm": row.tpm_limit},
            "usage": limiter.usage(row.id, row.rpm_limit, row.tpm_limit),
        }
    )


@bp.put("/apiKey/<key>/budget")
def set_key_budget(key: str) -> Response:
    """A key's spend budget per calendar month (UTC), in USD; null removes it."""
    data = registry.fields(_body(), registry.BUDGET)
    row = registry.key_row(key)
    registry.edit_key(row, data)
    return jsonio.response({"key": row.key_hint, "budgetUsd": data["budget_usd"]})


@bp.get("/apiKey/by-external-id/<path:external_id>")
def get_key_by_external_id(external_id: str) -> Response:
    row = ApiKey.get_or_none(ApiKey.external_id == _external_id(external_id))
    if row is None:
        raise registry.Refused(404, "Key not found")
    return jsonio.response(serializers.api_key(row))


@bp.put("/apiKey/by-external-id/<path:external_id>")
def ensure_key_by_external_id(external_id: str) -> Response:
    """Idempotent ensure for the Kubernetes operator; the key is returned only when created."""
    external_id = _external_id(external_id)
    data = registry.fields(_body(), registry.OPERATOR_KEY)
    row, key = registry.ensure_operator_key(external_id, data)
    return jsonio.response(
        {
            "id": row.id,
            "key": key or row.key_hint,
            "created": key is not None,
            "externalId": external_id,
        }
    )


def _external_id(raw: str) -> str:
    external_id = unquote(raw)
    if not 1 <= len(external_id) <= 127 or "\x00" in external_id:
        raise registry.Refused(400, "externalId must be 1 to 127 characters")
    return external_id


# -- providers ----------------------------------------------------------------


@bp.get("/providers")
def list_providers() -> Response:
    rows = Provider.active().order_by(Provider.id)
    return jsonio.response([serializers.provider(p) for p in rows])


@bp.post("/providers")
def create_provider() -> Response:
    row = registry.add_provider(registry.provider_fields(_body(), required=True))
    return jsonio.response(serializers.provider(row))


@bp.get("/providers/<id:provider_id>")
def get_provider(provider_id: int) -> Response:
    return jsonio.response(serializers.provider(registry.provider_row(provider_id)))


@bp.put("/providers/<id:provider_id>")
def update_provider(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    registry.edit_provider(row, registry.provider_fields(_body(), required=False))
    return jsonio.response(serializers.provider(registry.provider_row(provider_id)))


@bp.delete("/providers/<id:provider_id>")
def delete_provider(provider_id: int) -> Response:
    registry.remove_provider(registry.provider_row(provider_id))
    return jsonio.response({"success": True})


@bp.get("/providers/<id:provider_id>/models")
def provider_models(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    query = Model.select().where((Model.provider == row) & (Model.deleted == False))  # noqa: E712
    return jsonio.response([serializers.model(m) for m in query.order_by(Model.id)])


@bp.get("/providers/<id:provider_id>/remote-models")
def provider_remote_models(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    try:
        models = registry.remote_models(row)
    except UpstreamError as exc:
        return jsonio.response({"error": exc.describe()}, 502)
    return jsonio.response({"models": models})


@bp.post("/providers/<id:provider_id>/test")
def test_provider(provider_id: int) -> Response:
    """Ask the provider for its model list: proves the URL and the key work."""
    row = registry.provider_row(provider_id)
    try:
        models = registry.remote_models(row)
    except UpstreamError as exc:
        return jsonio.response({"success": False, "error": exc.describe()}, 502)
    return jsonio.response(
        {"success": True, "message": f"{len(models)} models found", "models": models}
    )


# -- models -------------------------------------------------------------------


@bp.get("/models")
def list_models() -> Response:
    query = Model.active().order_by(Model.id)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return jsonio.response([serializers.model(m) for m in query])


@bp.post("/models")
def create_model() -> Response:
    row = registry.add_model(registry.model_fields(_body(), required=True))
    return jsonio.response(serializers.model(row))


@bp.get("/models/system-names")
def system_names() -> Response:
    query = Model.active().select(Model.system_name).distinct().order_by(Model.system_name)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return jsonio.response([m.system_name for m in query])


@bp.get("/models/by-system-name/<path:system_name>")
def models_by_system_name(system_name: str) -> Response:
    query = Model.active().where(Model.system_name == unquote(system_name)).order_by(Model.id)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return jsonio.response(
        [
            {"model": serializers.model(m), "provider": serializers.provider(m.provider)}
            for m in query
        ]
    )


@bp.put("/models/by-system-name/<path:system_name>/weights")
def set_weights(system_name: str) -> Response:
    registry.apply_weights(unquote(system_name), _body().get("weights"))
    return models_by_system_name(system_name)


@bp.get("/models/<id:model_id>")
def get_model(model_id: int) -> Response:
    return jsonio.response(serializers.model(registry.model_row(model_id)))


@bp.put("/models/<id:model_id>")
def update_model(model_id: int) -> Response:
    row = registry.model_row(model_id)
    registry.edit_model(row, registry.model_fields(_body(), required=False))
    return jsonio.response(serializers.model(registry.model_row(model_id)))


@bp.delete("/models/<id:model_id>")
def delete_model(model_id: int) -> Response:
    registry.remove_model(registry.model_row(model_id))
    return jsonio.response({"success": True})


# -- per-model limits -----------------------------------------------------------


@bp.get("/ratelimits")
def list_rate_limits() -> Response:
    return jsonio.response(registry.rate_limits())


@bp.post("/ratelimits")
def create_rate_limit() -> Response:
    return jsonio.response(registry.add_rate_limit(_body()), 201)


@bp.get("/ratelimits/<path:identifier>")
def get_rate_limit(identifier: str) -> Response:
    return jsonio.response(registry.rate_limit(unquote(identifier)))


@bp.delete("/ratelimits/<path:identifier>")
def delete_rate_limit(identifier: str) -> Response:
    registry.remove_rate_limit(unquote(identifier))
    return Response(status=204, mimetype="application/json")


# -- records ------------------------------------------------------------------


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
    return _delete_record(Completion, serializers.completion, record_id)


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
    return _delete_record(Embedding, serializers.embedding, record_id)


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


def _list_records(table: type[pw.Model], serialize: Any, default_limit: int) -> Response:
    """A page of records, newest first, filtered as ``records.select`` filters them."""
    found = _search(table)
    query = records.select(table, found=found)
    offset = _int_arg("offset", 0, 0, urlargs.MAX_ID)
    limit = _int_arg("limit", default_limit, 1, MAX_PAGE)
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


def _delete_record(table: type[pw.Model], serialize: Any, record_id: int) -> Response:
    """Soft delete; answer with the row as it now is."""
    row = _record_row(table, record_id)
    table.update(deleted=True, updated_at=utcnow()).where(table.id == row.id).execute()
    return jsonio.response(serialize(table.get_by_id(row.id)))


def _record_row(table: type[pw.Model], row_id: int) -> Any:
    row = records.live(table, row_id)
    if row is None:
        raise registry.Refused(404, f"{table.__name__} not found")
    return row


# -- request helpers ----------------------------------------------------------


def _body() -> dict[str, Any]:
    """The body as a JSON object (an empty body is ``{}``), strictly parsed."""
    try:
        body = jsonio.loads(jsonio.read(request) or b"{}")
    except jsonio.Unreadable as exc:
        raise registry.Refused(400, str(exc)) from exc
    if not isinstance(body, dict):
        raise registry.Refused(400, "Request body must be a JSON object")
    return body


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _int_arg(name: str, default: int | None, low: int, high: int) -> Any:
    """A query argument as an integer within ``low..high``; ``default`` when absent."""
    text = request.args.get(name)
    if text is None or text == "":
        return default
    value = urlargs.integer(text, low, high)
    if value is None:
        raise registry.Refused(400, f"{name} must be an integer from {low} to {high}")
    return value
