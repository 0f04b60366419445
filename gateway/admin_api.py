"""The admin JSON API under ``/api/admin``, as NexusGate's (paths, camelCase fields).

Guarded by ``Authorization: Bearer $ADMIN_SUPER_SECRET`` (or ``x-api-key``). The
views are thin: the checked changes to keys, providers and models live in
``registry`` (the dashboard makes them too), JSON shapes in ``serializers``. Gateway
keys leave in full only once, at creation.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import peewee as pw
from flask import Blueprint, Response, current_app, request

from gateway import auth, db, registry, serializers, stats
from gateway.models import (
    ApiKey,
    Completion,
    Embedding,
    Model,
    Provider,
    database,
    utcnow,
)
from gateway.upstream import UpstreamError

bp = Blueprint("admin_api", __name__, url_prefix="/api/admin")


@bp.errorhandler(registry.Refused)
def _admin_error(exc: registry.Refused) -> Response:
    return _json({"error": exc.message}, exc.status)


@bp.before_request
def _require_admin() -> Response | None:
    db.connect()
    if not auth.is_admin(request.headers, auth.admin_secret(current_app)):
        return _json({"error": "Invalid admin secret"}, 401)
    return None


@bp.get("/")
def index() -> Response:
    return _json(True)


# -- API keys -----------------------------------------------------------------


@bp.get("/apiKey")
def list_keys() -> Response:
    query = ApiKey.select().order_by(ApiKey.id)
    if not _flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return _json([serializers.api_key(k) for k in query])


@bp.get("/apiKey/managed")
def list_managed_keys() -> Response:
    query = ApiKey.select().where(ApiKey.source == "operator").order_by(ApiKey.id)
    if not _flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return _json([serializers.api_key(k) for k in query])


@bp.post("/apiKey")
def create_key() -> Response:
    row, key = ApiKey.issue(**registry.key_fields(_body()))
    return _json({**serializers.api_key(row), "key": key}, 201)


@bp.get("/apiKey/<key>")
def get_key(key: str) -> Response:
    return _json(serializers.api_key(registry.key_row(key)))


@bp.delete("/apiKey/<key>")
def revoke_key(key: str) -> Response:
    row = registry.key_row(key)
    registry.revoke(row)
    return _json({"id": row.id, "key": row.key_hint, "revoked": True})


@bp.put("/apiKey/<key>/ratelimit")
def set_key_limits(key: str) -> Response:
    data = registry.fields(_body(), rpmLimit=(int, True, 1), tpmLimit=(int, True, 1))
    row = registry.key_row(key)
    registry.set_limits(row, data)
    return _json(
        {"key": row.key_hint, "rpmLimit": data["rpm_limit"], "tpmLimit": data["tpm_limit"]}
    )


@bp.get("/apiKey/by-external-id/<path:external_id>")
def get_key_by_external_id(external_id: str) -> Response:
    row = ApiKey.get_or_none(ApiKey.external_id == unquote(external_id))
    if row is None:
        raise registry.Refused(404, "Key not found")
    return _json(serializers.api_key(row))


@bp.put("/apiKey/by-external-id/<path:external_id>")
def ensure_key_by_external_id(external_id: str) -> Response:
    """Idempotent ensure for the Kubernetes operator; the key is returned only when created."""
    external_id = unquote(external_id)
    data = registry.fields(
        _body(), comment=(str, False), rpmLimit=(int, False, 1), tpmLimit=(int, False, 1)
    )
    row = ApiKey.get_or_none(ApiKey.external_id == external_id)
    if row is not None:
        ApiKey.update(**data, revoked=False, updated_at=utcnow()).where(
            ApiKey.id == row.id
        ).execute()
        auth.keys.forget(row.key_hash)
        return _json(
            {"id": row.id, "key": row.key_hint, "created": False, "externalId": external_id}
        )
    try:
        with database.atomic():
            row, key = ApiKey.issue(external_id=external_id, source="operator", **data)
    except pw.IntegrityError:  # another instance created it first
        row = ApiKey.get(ApiKey.external_id == external_id)
        return _json(
            {"id": row.id, "key": row.key_hint, "created": False, "externalId": external_id}
        )
    return _json({"id": row.id, "key": key, "created": True, "externalId": external_id}, 201)


# -- providers ----------------------------------------------------------------


@bp.get("/providers")
def list_providers() -> Response:
    return _json([serializers.provider(p) for p in Provider.active().order_by(Provider.id)])


@bp.post("/providers")
def create_provider() -> Response:
    row = registry.add_provider(registry.provider_fields(_body(), required=True))
    return _json(serializers.provider(row), 201)


@bp.get("/providers/<int:provider_id>")
def get_provider(provider_id: int) -> Response:
    return _json(serializers.provider(registry.provider_row(provider_id)))


@bp.put("/providers/<int:provider_id>")
def update_provider(provider_id: int) -> Response:
    registry.edit_provider(
        registry.provider_row(provider_id), registry.provider_fields(_body(), required=False)
    )
    return _json(serializers.provider(registry.provider_row(provider_id)))


@bp.delete("/providers/<int:provider_id>")
def delete_provider(provider_id: int) -> Response:
    registry.remove_provider(registry.provider_row(provider_id))
    return _json({"success": True})


@bp.get("/providers/<int:provider_id>/models")
def provider_models(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    query = Model.select().where((Model.provider == row) & (Model.deleted == False))  # noqa: E712
    return _json([serializers.model(m) for m in query.order_by(Model.id)])


@bp.get("/providers/<int:provider_id>/remote-models")
def provider_remote_models(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    try:
        models = registry.remote_models(row)
    except UpstreamError as exc:
        return _json({"error": exc.describe()}, 502)
    return _json({"models": models})


@bp.post("/providers/<int:provider_id>/test")
def test_provider(provider_id: int) -> Response:
    """Ask the provider for its model list: proves the URL and the key work."""
    row = registry.provider_row(provider_id)
    try:
        models = registry.remote_models(row)
    except UpstreamError as exc:
        return _json({"success": False, "error": exc.describe()}, 502)
    return _json({"success": True, "message": f"{len(models)} models found", "models": models})


# -- models -------------------------------------------------------------------


@bp.get("/models")
def list_models() -> Response:
    query = Model.active().order_by(Model.id)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return _json([serializers.model(m) for m in query])


@bp.post("/models")
def create_model() -> Response:
    return _json(
        serializers.model(registry.add_model(registry.model_fields(_body(), required=True))), 201
    )


@bp.get("/models/system-names")
def system_names() -> Response:
    query = Model.active().select(Model.system_name).distinct().order_by(Model.system_name)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return _json([m.system_name for m in query])


@bp.get("/models/by-system-name/<path:system_name>")
def models_by_system_name(system_name: str) -> Response:
    query = Model.active().where(Model.system_name == unquote(system_name)).order_by(Model.id)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return _json(
        [
            {"model": serializers.model(m), "provider": serializers.provider(m.provider)}
            for m in query
        ]
    )


@bp.put("/models/by-system-name/<path:system_name>/weights")
def set_weights(system_name: str) -> Response:
    registry.apply_weights(unquote(system_name), _body().get("weights"))
    return models_by_system_name(system_name)


@bp.get("/models/<int:model_id>")
def get_model(model_id: int) -> Response:
    return _json(serializers.model(registry.model_row(model_id)))


@bp.put("/models/<int:model_id>")
def update_model(model_id: int) -> Response:
    registry.edit_model(
        registry.model_row(model_id), registry.model_fields(_body(), required=False)
    )
    return _json(serializers.model(registry.model_row(model_id)))


@bp.delete("/models/<int:model_id>")
def delete_model(model_id: int) -> Response:
    registry.remove_model(registry.model_row(model_id))
    return _json({"success": True})


# -- records ------------------------------------------------------------------


@bp.get("/completions")
def list_completions() -> Response:
    return _list_records(Completion, serializers.completion, default_limit=100)


@bp.get("/completions/<int:record_id>")
def get_completion(record_id: int) -> Response:
    return _one_record(Completion, serializers.completion, record_id)


@bp.delete("/completions/<int:record_id>")
def delete_completion(record_id: int) -> Response:
    return _delete_record(Completion, serializers.completion, record_id)


@bp.get("/embeddings")
def list_embeddings() -> Response:
    return _list_records(Embedding, serializers.embedding, default_limit=20)


@bp.get("/embeddings/<int:record_id>")
def get_embedding(record_id: int) -> Response:
    return _one_record(Embedding, serializers.embedding, record_id)


@bp.delete("/embeddings/<int:record_id>")
def delete_embedding(record_id: int) -> Response:
    return _delete_record(Embedding, serializers.embedding, record_id)


@bp.get("/usage")
def usage() -> Response:
    """Token sums over completed and aborted calls (unknown counts are left out)."""
    query = Completion.select(
        pw.fn.COALESCE(pw.fn.SUM(Completion.prompt_tokens), 0),
        pw.fn.COALESCE(pw.fn.SUM(Completion.completion_tokens), 0),
    ).where(Completion.status.in_(("completed", "aborted")))
    if request.args.get("apiKey"):
        query = query.where(Completion.api_key == registry.key_row(request.args["apiKey"]).id)
    prompt, completion = query.tuples().get()
    return _json({"total_prompt_tokens": int(prompt), "total_completion_tokens": int(completion)})


@bp.get("/stats/overview")
def stats_overview() -> Response:
    range_key = request.args.get("range") or stats.DEFAULT_RANGE
    if range_key not in stats.RANGES:
        raise registry.Refused(400, f"range must be one of {', '.join(stats.RANGES)}")
    return _json(serializers.overview(stats.overview(range_key)))


def _list_records(table: type[pw.Model], serialize: Any, default_limit: int) -> Response:
    """A page of records, newest first, filtered by apiKeyId, modelId, model (prefix), status."""
    query = table.select().where(table.deleted == False)  # noqa: E712
    if request.args.get("apiKeyId"):
        query = query.where(table.api_key == _int_arg("apiKeyId"))
    if request.args.get("modelId"):
        query = query.where(table.model_id == _int_arg("modelId"))
    if request.args.get("model"):
        query = query.where(table.model.startswith(request.args["model"]))
    if request.args.get("status"):
        query = query.where(table.status == request.args["status"])
    offset = _int_arg("offset", 0)
    limit = min(_int_arg("limit", default_limit), 1000)
    total = query.count()  # the filters apply to the total too (NexusGate's did not)
    rows = list(
        query.order_by(table.created_at.desc(), table.id.desc()).offset(offset).limit(limit)
    )
    names = registry.provider_names({r.provider_id for r in rows})
    data = [serialize(r, names.get(r.provider_id)) for r in rows]
    return _json({"data": data, "total": total, "from": offset})


def _one_record(table: type[pw.Model], serialize: Any, record_id: int) -> Response:
    row = _record_row(table, record_id)
    return _json(serialize(row, _provider_name(row.provider_id)))


def _delete_record(table: type[pw.Model], serialize: Any, record_id: int) -> Response:
    """Soft delete; answer with the row as it now is."""
    row = _record_row(table, record_id)
    table.update(deleted=True, updated_at=utcnow()).where(table.id == row.id).execute()
    return _json(serialize(_record_row(table, record_id, deleted=True)))


def _record_row(table: type[pw.Model], row_id: int, deleted: bool = False) -> Any:
    query = table.select().where(table.id == row_id)
    if not deleted:
        query = query.where(table.deleted == False)  # noqa: E712
    row = query.first()
    if row is None:
        raise registry.Refused(404, f"{table.__name__} not found")
    return row


def _provider_name(provider_id: int | None) -> str | None:
    return registry.provider_names({provider_id}).get(provider_id)


# -- request helpers ----------------------------------------------------------


def _body() -> dict[str, Any]:
    try:
        body = json.loads(request.get_data(cache=False) or b"{}")
    except ValueError as exc:
        raise registry.Refused(400, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise registry.Refused(400, "Request body must be a JSON object")
    return body


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _int_arg(name: str, default: int | None = None) -> int:
    value = request.args.get(name)
    if value is None or value == "":
        if default is None:
            raise registry.Refused(400, f"{name} is required")
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise registry.Refused(400, f"{name} must be an integer") from exc


def _json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")
