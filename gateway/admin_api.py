"""The admin JSON API under ``/api/admin``, as NexusGate's (paths, camelCase fields).

Guarded by ``Authorization: Bearer $ADMIN_SUPER_SECRET`` (or ``x-api-key``). Writes
that change routing or keys clear this worker's caches at once; other workers see
them within ``CACHE_TTL``. Gateway keys leave in full only once, at creation.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import peewee as pw
from flask import Blueprint, Response, current_app, request

from gateway import auth, db, serializers, stats
from gateway.adapters import PROVIDER_TYPES, endpoint
from gateway.models import (
    MODEL_TYPES,
    ApiKey,
    Completion,
    Embedding,
    Model,
    Provider,
    database,
    utcnow,
)
from gateway.routing import catalog
from gateway.upstream import UpstreamError, upstream

bp = Blueprint("admin_api", __name__, url_prefix="/api/admin")


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@bp.errorhandler(AdminError)
def _admin_error(exc: AdminError) -> Response:
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
    row, key = ApiKey.issue(**key_fields(_body()))
    return _json({**serializers.api_key(row), "key": key}, 201)


@bp.get("/apiKey/<key>")
def get_key(key: str) -> Response:
    return _json(serializers.api_key(_key_row(key)))


@bp.delete("/apiKey/<key>")
def revoke_key(key: str) -> Response:
    row = _key_row(key)
    revoke(row)
    return _json({"id": row.id, "key": row.key_hint, "revoked": True})


@bp.put("/apiKey/<key>/ratelimit")
def set_key_limits(key: str) -> Response:
    data = _fields(_body(), rpmLimit=(int, True, 1), tpmLimit=(int, True, 1))
    row = _key_row(key)
    set_limits(row, data)
    return _json(
        {"key": row.key_hint, "rpmLimit": data["rpm_limit"], "tpmLimit": data["tpm_limit"]}
    )


@bp.get("/apiKey/by-external-id/<path:external_id>")
def get_key_by_external_id(external_id: str) -> Response:
    row = ApiKey.get_or_none(ApiKey.external_id == unquote(external_id))
    if row is None:
        raise AdminError(404, "Key not found")
    return _json(serializers.api_key(row))


@bp.put("/apiKey/by-external-id/<path:external_id>")
def ensure_key_by_external_id(external_id: str) -> Response:
    """Idempotent ensure for the Kubernetes operator; the key is returned only when created."""
    external_id = unquote(external_id)
    data = _fields(
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


def key_fields(body: dict) -> dict[str, Any]:
    """Check the fields of a new key (camelCase in, column names out)."""
    return _fields(
        body,
        comment=(str, False),
        expiresAt=(datetime, False),
        rpmLimit=(int, False, 1),
        tpmLimit=(int, False, 1),
    )


def revoke(row: ApiKey) -> None:
    """Revoke a key; this worker stops accepting it at once."""
    ApiKey.update(revoked=True, updated_at=utcnow()).where(ApiKey.id == row.id).execute()
    auth.keys.forget(row.key_hash)


def set_limits(row: ApiKey, data: dict[str, Any]) -> None:
    """Change a key's RPM and TPM limits (column names in ``data``)."""
    ApiKey.update(**data, updated_at=utcnow()).where(ApiKey.id == row.id).execute()
    auth.keys.forget(row.key_hash)


def _key_row(key: str) -> ApiKey:
    """A key by its plaintext value, or by id (the dashboard never holds the key)."""
    row = ApiKey.get_or_none(ApiKey.id == int(key)) if key.isdigit() else ApiKey.by_key(key)
    if row is None:
        raise AdminError(404, "Key not found")
    return row


# -- providers ----------------------------------------------------------------


@bp.get("/providers")
def list_providers() -> Response:
    return _json([serializers.provider(p) for p in Provider.active().order_by(Provider.id)])


@bp.post("/providers")
def create_provider() -> Response:
    row = add_provider(provider_fields(_body(), required=True))
    return _json(serializers.provider(row), 201)


@bp.get("/providers/<int:provider_id>")
def get_provider(provider_id: int) -> Response:
    return _json(serializers.provider(_provider_row(provider_id)))


@bp.put("/providers/<int:provider_id>")
def update_provider(provider_id: int) -> Response:
    edit_provider(_provider_row(provider_id), provider_fields(_body(), required=False))
    return _json(serializers.provider(_provider_row(provider_id)))


@bp.delete("/providers/<int:provider_id>")
def delete_provider(provider_id: int) -> Response:
    remove_provider(_provider_row(provider_id))
    return _json({"success": True})


@bp.get("/providers/<int:provider_id>/models")
def provider_models(provider_id: int) -> Response:
    row = _provider_row(provider_id)
    query = Model.select().where((Model.provider == row) & (Model.deleted == False))  # noqa: E712
    return _json([serializers.model(m) for m in query.order_by(Model.id)])


@bp.get("/providers/<int:provider_id>/remote-models")
def provider_remote_models(provider_id: int) -> Response:
    row = _provider_row(provider_id)
    try:
        models = remote_models(row)
    except UpstreamError as exc:
        return _json({"error": exc.describe()}, 502)
    return _json({"models": models})


@bp.post("/providers/<int:provider_id>/test")
def test_provider(provider_id: int) -> Response:
    """Ask the provider for its model list: proves the URL and the key work."""
    row = _provider_row(provider_id)
    try:
        models = remote_models(row)
    except UpstreamError as exc:
        return _json({"success": False, "error": exc.describe()}, 502)
    return _json({"success": True, "message": f"{len(models)} models found", "models": models})


def remote_models(row: Provider) -> list[dict]:
    """The provider's own model list: proves its URL and key work (UpstreamError if not)."""
    url, headers = endpoint(row.type, row.base_url, row.api_key, row.api_version, "", "models")
    resp = upstream.get(url, headers)
    try:
        payload = json.loads(resp.read(8 * 1024 * 1024))
    except ValueError as exc:
        raise UpstreamError("protocol", f"model list is not JSON: {exc}") from exc
    finally:
        resp.close()
    items = payload.get("data", []) if isinstance(payload, dict) else []
    return [
        {"id": m.get("id"), "owned_by": m.get("owned_by"), "created": m.get("created")}
        for m in items
        if isinstance(m, dict) and m.get("id")
    ]


def provider_fields(body: dict, *, required: bool) -> dict[str, Any]:
    """Check a provider's fields (camelCase in, column names out)."""
    data = _fields(
        body,
        name=(str, required),
        type=(str, False),
        baseUrl=(str, required),
        apiKey=(str, False),
        apiVersion=(str, False),
        comment=(str, False),
        streamUsage=(bool, False),
    )
    if "name" in data and not 1 <= len(data["name"]) <= 63:
        raise AdminError(400, "name must be 1 to 63 characters")
    if "type" in data and data["type"] not in PROVIDER_TYPES:
        raise AdminError(400, f"type must be one of {', '.join(PROVIDER_TYPES)}")
    if "base_url" in data and not (
        data["base_url"].startswith(("http://", "https://")) and len(data["base_url"]) <= 255
    ):
        raise AdminError(400, "baseUrl must be an http(s) URL of at most 255 characters")
    if data.get("api_version") and len(data["api_version"]) > 31:
        raise AdminError(400, "apiVersion must be at most 31 characters")
    return data


def add_provider(data: dict[str, Any]) -> Provider:
    """Create a provider from checked fields; 409 if a live one has that name."""
    _unique_provider_name(data["name"])
    row = Provider.create(**data)
    catalog.invalidate()
    return row


def edit_provider(row: Provider, data: dict[str, Any]) -> None:
    """Change a provider's checked fields."""
    if "name" in data and data["name"] != row.name:
        _unique_provider_name(data["name"])
    Provider.update(**data, updated_at=utcnow()).where(Provider.id == row.id).execute()
    catalog.invalidate()


def remove_provider(row: Provider) -> None:
    """Soft-delete a provider; its models stop serving."""
    Provider.update(deleted=True, updated_at=utcnow()).where(Provider.id == row.id).execute()
    catalog.invalidate()


def _unique_provider_name(name: str) -> None:
    if Provider.active().where(Provider.name == name).exists():
        raise AdminError(409, f"Provider '{name}' already exists")


def _provider_row(provider_id: int) -> Provider:
    row = Provider.active().where(Provider.id == provider_id).first()
    if row is None:
        raise AdminError(404, "Provider not found")
    return row


# -- models -------------------------------------------------------------------


@bp.get("/models")
def list_models() -> Response:
    query = Model.active().order_by(Model.id)
    if request.args.get("modelType"):
        query = query.where(Model.model_type == request.args["modelType"])
    return _json([serializers.model(m) for m in query])


@bp.post("/models")
def create_model() -> Response:
    return _json(serializers.model(add_model(model_fields(_body(), required=True))), 201)


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
    apply_weights(unquote(system_name), _body().get("weights"))
    return models_by_system_name(system_name)


def apply_weights(system_name: str, weights: Any) -> None:
    """Set the load-balancing weights ``[{modelId, weight}]`` of one system name's models."""
    if not isinstance(weights, list) or not all(
        isinstance(w, dict)
        and isinstance(w.get("modelId"), int)
        and _number(w.get("weight"))
        and w["weight"] >= 0
        for w in weights
    ):
        raise AdminError(400, "weights must be a list of {modelId, weight >= 0}")
    ids = {m.id for m in Model.active().where(Model.system_name == system_name)}
    foreign = [w["modelId"] for w in weights if w["modelId"] not in ids]
    if foreign:
        raise AdminError(400, f"models {foreign} do not serve '{system_name}'")
    with database.atomic():
        for w in weights:
            Model.update(weight=float(w["weight"]), updated_at=utcnow()).where(
                Model.id == w["modelId"]
            ).execute()
    catalog.invalidate()


@bp.get("/models/<int:model_id>")
def get_model(model_id: int) -> Response:
    return _json(serializers.model(_model_row(model_id)))


@bp.put("/models/<int:model_id>")
def update_model(model_id: int) -> Response:
    edit_model(_model_row(model_id), model_fields(_body(), required=False))
    return _json(serializers.model(_model_row(model_id)))


@bp.delete("/models/<int:model_id>")
def delete_model(model_id: int) -> Response:
    remove_model(_model_row(model_id))
    return _json({"success": True})


def add_model(data: dict[str, Any]) -> Model:
    """Create a model from checked fields (or bring back a deleted one of that name)."""
    provider = _provider_row(data.pop("provider_id"))
    existing = Model.get_or_none(
        (Model.provider == provider) & (Model.system_name == data["system_name"])
    )
    if existing is not None and not existing.deleted:
        raise AdminError(409, f"Model '{data['system_name']}' already exists on this provider")
    if existing is not None:  # bring a deleted model back rather than fail on the unique index
        Model.update(**data, deleted=False, updated_at=utcnow()).where(
            Model.id == existing.id
        ).execute()
        row = Model.get_by_id(existing.id)
    else:
        row = Model.create(provider=provider, **data)
    catalog.invalidate()
    return row


def edit_model(row: Model, data: dict[str, Any]) -> None:
    """Change a model's checked fields; its provider stays."""
    if data.pop("provider_id", row.provider_id) != row.provider_id:
        raise AdminError(400, "providerId cannot be changed; create a model on the other provider")
    try:
        Model.update(**data, updated_at=utcnow()).where(Model.id == row.id).execute()
    except pw.IntegrityError as exc:
        raise AdminError(409, "Another model of this provider has that system name") from exc
    catalog.invalidate()


def remove_model(row: Model) -> None:
    """Soft-delete a model; it stops serving."""
    Model.update(deleted=True, updated_at=utcnow()).where(Model.id == row.id).execute()
    catalog.invalidate()


def model_fields(body: dict, *, required: bool) -> dict[str, Any]:
    """Check a model's fields (camelCase in, column names out)."""
    data = _fields(
        body,
        providerId=(int, required),
        systemName=(str, required),
        remoteId=(str, False),
        modelType=(str, False),
        contextLength=(int, False, 1),
        inputPrice=(float, False, 0),
        outputPrice=(float, False, 0),
        weight=(float, False, 0),
        comment=(str, False),
    )
    if "system_name" in data and not 1 <= len(data["system_name"]) <= 63:
        raise AdminError(400, "systemName must be 1 to 63 characters")
    if "model_type" in data and data["model_type"] not in MODEL_TYPES:
        raise AdminError(400, f"modelType must be one of {', '.join(MODEL_TYPES)}")
    return data


def _model_row(model_id: int) -> Model:
    row = Model.active().where(Model.id == model_id).first()
    if row is None:
        raise AdminError(404, "Model not found")
    return row


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
        query = query.where(Completion.api_key == _key_row(request.args["apiKey"]).id)
    prompt, completion = query.tuples().get()
    return _json({"total_prompt_tokens": int(prompt), "total_completion_tokens": int(completion)})


@bp.get("/stats/overview")
def stats_overview() -> Response:
    range_key = request.args.get("range") or stats.DEFAULT_RANGE
    if range_key not in stats.RANGES:
        raise AdminError(400, f"range must be one of {', '.join(stats.RANGES)}")
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
    names = provider_names({r.provider_id for r in rows})
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
        raise AdminError(404, f"{table.__name__} not found")
    return row


def _provider_name(provider_id: int | None) -> str | None:
    return provider_names({provider_id}).get(provider_id)


def provider_names(ids: set[int | None]) -> dict[int, str]:
    """Provider id -> name, deleted providers included (old records name them)."""
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    return {
        p.id: p.name
        for p in Provider.select(Provider.id, Provider.name).where(Provider.id.in_(sorted(ids)))
    }


# -- request helpers ----------------------------------------------------------


def _body() -> dict[str, Any]:
    try:
        body = json.loads(request.get_data(cache=False) or b"{}")
    except ValueError as exc:
        raise AdminError(400, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise AdminError(400, "Request body must be a JSON object")
    return body


def _fields(body: dict, **spec: tuple) -> dict[str, Any]:
    """Check camelCase fields by (type, required[, minimum]); return them snake_cased."""
    out: dict[str, Any] = {}
    for name, (kind, required, *minimum) in spec.items():
        if name not in body or body[name] is None:
            if required:
                raise AdminError(400, f"{name} is required")
            if name in body:
                out[_snake(name)] = None
            continue
        value = body[name]
        if kind is datetime:
            value = _datetime(name, value)
        elif kind is float:
            if not _number(value):
                raise AdminError(400, f"{name} must be a number")
            value = float(value)
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise AdminError(400, f"{name} must be an integer")
        elif not isinstance(value, kind):
            raise AdminError(400, f"{name} must be a {kind.__name__}")
        if minimum and value < minimum[0]:
            raise AdminError(400, f"{name} must be at least {minimum[0]}")
        out[_snake(name)] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _datetime(name: str, value: Any) -> datetime:
    """ISO 8601 (a trailing Z or an offset is honoured) -> naive UTC."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError) as exc:
        raise AdminError(400, f"{name} must be an ISO 8601 date-time") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _int_arg(name: str, default: int | None = None) -> int:
    value = request.args.get(name)
    if value is None or value == "":
        if default is None:
            raise AdminError(400, f"{name} is required")
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise AdminError(400, f"{name} must be an integer") from exc


def _json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")
