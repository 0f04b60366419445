"""Providers, models and keys: the checked changes the admin API and the dashboard share.

Fields arrive camelCase (as NexusGate's admin API spells them) and leave as column
names; a change the rules forbid raises ``Refused`` with an HTTP status and a reason
(in English: the API's own words). Changes that affect routing or keys clear this
worker's caches at once; other workers see them within ``CACHE_TTL``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import peewee as pw

from gateway import auth
from gateway.adapters import PROVIDER_TYPES, endpoint
from gateway.models import MODEL_TYPES, ApiKey, Model, Provider, database, utcnow
from gateway.routing import catalog
from gateway.upstream import UpstreamError, upstream


class Refused(Exception):
    """A change the registry will not make: an HTTP status and a reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def key_fields(body: dict) -> dict[str, Any]:
    """Check the fields of a new key (camelCase in, column names out)."""
    return fields(
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
    data = fields(
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
        raise Refused(400, "name must be 1 to 63 characters")
    if "type" in data and data["type"] not in PROVIDER_TYPES:
        raise Refused(400, f"type must be one of {', '.join(PROVIDER_TYPES)}")
    if "base_url" in data and not (
        data["base_url"].startswith(("http://", "https://")) and len(data["base_url"]) <= 255
    ):
        raise Refused(400, "baseUrl must be an http(s) URL of at most 255 characters")
    if data.get("api_version") and len(data["api_version"]) > 31:
        raise Refused(400, "apiVersion must be at most 31 characters")
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
        raise Refused(409, f"Provider '{name}' already exists")


def apply_weights(system_name: str, weights: Any) -> None:
    """Set the load-balancing weights ``[{modelId, weight}]`` of one system name's models."""
    if not isinstance(weights, list) or not all(
        isinstance(w, dict)
        and isinstance(w.get("modelId"), int)
        and _number(w.get("weight"))
        and w["weight"] >= 0
        for w in weights
    ):
        raise Refused(400, "weights must be a list of {modelId, weight >= 0}")
    ids = {m.id for m in Model.active().where(Model.system_name == system_name)}
    foreign = [w["modelId"] for w in weights if w["modelId"] not in ids]
    if foreign:
        raise Refused(400, f"models {foreign} do not serve '{system_name}'")
    with database.atomic():
        for w in weights:
            Model.update(weight=float(w["weight"]), updated_at=utcnow()).where(
                Model.id == w["modelId"]
            ).execute()
    catalog.invalidate()


def add_model(data: dict[str, Any]) -> Model:
    """Create a model from checked fields (or bring back a deleted one of that name)."""
    provider = provider_row(data.pop("provider_id"))
    existing = Model.get_or_none(
        (Model.provider == provider) & (Model.system_name == data["system_name"])
    )
    if existing is not None and not existing.deleted:
        raise Refused(409, f"Model '{data['system_name']}' already exists on this provider")
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
        raise Refused(400, "providerId cannot be changed; create a model on the other provider")
    try:
        Model.update(**data, updated_at=utcnow()).where(Model.id == row.id).execute()
    except pw.IntegrityError as exc:
        raise Refused(409, "Another model of this provider has that system name") from exc
    catalog.invalidate()


def remove_model(row: Model) -> None:
    """Soft-delete a model; it stops serving."""
    Model.update(deleted=True, updated_at=utcnow()).where(Model.id == row.id).execute()
    catalog.invalidate()


def model_fields(body: dict, *, required: bool) -> dict[str, Any]:
    """Check a model's fields (camelCase in, column names out)."""
    data = fields(
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
        raise Refused(400, "systemName must be 1 to 63 characters")
    if "model_type" in data and data["model_type"] not in MODEL_TYPES:
        raise Refused(400, f"modelType must be one of {', '.join(MODEL_TYPES)}")
    return data


def provider_names(ids: set[int | None]) -> dict[int, str]:
    """Provider id -> name, deleted providers included (old records name them)."""
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    return {
        p.id: p.name
        for p in Provider.select(Provider.id, Provider.name).where(Provider.id.in_(sorted(ids)))
    }


def fields(body: dict, **spec: tuple) -> dict[str, Any]:
    """Check camelCase fields by (type, required[, minimum]); return them snake_cased."""
    out: dict[str, Any] = {}
    for name, (kind, required, *minimum) in spec.items():
        if name not in body or body[name] is None:
            if required:
                raise Refused(400, f"{name} is required")
            if name in body:
                out[_snake(name)] = None
            continue
        value = body[name]
        if kind is datetime:
            value = _datetime(name, value)
        elif kind is float:
            if not _number(value):
                raise Refused(400, f"{name} must be a number")
            value = float(value)
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise Refused(400, f"{name} must be an integer")
        elif not isinstance(value, kind):
            raise Refused(400, f"{name} must be a {kind.__name__}")
        if minimum and value < minimum[0]:
            raise Refused(400, f"{name} must be at least {minimum[0]}")
        out[_snake(name)] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _datetime(name: str, value: Any) -> datetime:
    """ISO 8601 (a trailing Z or an offset is honoured) -> naive UTC."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError) as exc:
        raise Refused(400, f"{name} must be an ISO 8601 date-time") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def key_row(key: str) -> ApiKey:
    """A key by its plaintext value, or by id (the dashboard never holds the key)."""
    row = ApiKey.get_or_none(ApiKey.id == int(key)) if key.isdigit() else ApiKey.by_key(key)
    if row is None:
        raise Refused(404, "Key not found")
    return row


def provider_row(provider_id: int) -> Provider:
    row = Provider.active().where(Provider.id == provider_id).first()
    if row is None:
        raise Refused(404, "Provider not found")
    return row


def model_row(model_id: int) -> Model:
    row = Model.active().where(Model.id == model_id).first()
    if row is None:
        raise Refused(404, "Model not found")
    return row
