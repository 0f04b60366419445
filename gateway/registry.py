"""Providers, models and keys: the checked changes the admin API and the dashboard share.

Fields arrive camelCase (as NexusGate's admin API spells them) and leave as column
names, checked against what the columns hold on PostgreSQL (32-bit integers, varchar
lengths, finite numbers, no NUL): input the database would refuse is refused here with
a 400 naming the field, never a 500. A change the rules forbid raises ``Refused`` with
an HTTP status and a reason (in English: the API's own words). Two concurrent creates
of one name are settled by the unique indexes: the loser gets 409. Changes to routing
clear this worker's catalog at once (other workers reload within ``CACHE_TTL``); changes
to a key (revoked, new limits) and to per-model limits are announced to every worker of
every instance (``limiter.announce``: at once with Redis, else within ``CACHE_TTL``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import peewee as pw

from gateway import redact
from gateway.adapters import PROVIDER_TYPES
from gateway.auth import REVOKED
from gateway.fields import Invalid, Spec, check, in_range
from gateway.limiter import limiter
from gateway.model_limits import CHANGED, DEFAULT, model_limits
from gateway.models import MODEL_TYPES, ApiKey, Model, Provider, RateLimit, database, utcnow
from gateway.routing import catalog
from gateway.upstream import UpstreamError, endpoint, upstream
from gateway.urlargs import MAX_ID
from gateway.vault import vault

MAX_NUMBER = 1e6  # prices (USD per million tokens) and weights
MAX_BUDGET = 1e9  # USD a month: nano-USD sums stay far inside 64 bits
FORCED_KEY = re.compile(r"sk-[0-9a-f]{32}")  # a key value given, as NexusGate's forced keys
TEXT = 4096  # comments and provider keys: text columns, bounded to keep pages sane


class Refused(Exception):
    """A change the registry will not make: an HTTP status and a reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


KEY = {
    "comment": Spec(str, high=TEXT, line=False),
    "expiresAt": Spec(datetime),
    "rpmLimit": Spec(int, null=False, low=1),
    "tpmLimit": Spec(int, null=False, low=1),
    "maxConcurrent": Spec(int, low=1),  # calls in flight at once; null: unlimited
    "budgetUsd": Spec(float, high=MAX_BUDGET),  # per calendar month (UTC); null: none
}
OPERATOR_KEY = {
    name: KEY[name] for name in ("comment", "rpmLimit", "tpmLimit", "maxConcurrent", "budgetUsd")
}
BUDGET = {"budgetUsd": Spec(float, required=True, high=MAX_BUDGET)}
LIMITS = {
    "rpmLimit": Spec(int, required=True, null=False, low=1),
    "tpmLimit": Spec(int, required=True, null=False, low=1),
    "maxConcurrent": Spec(int, low=1),
}
RATE_LIMIT = {
    "identifier": Spec(str, required=True, null=False, low=1, high=255),
    "limit": Spec(int, required=True, null=False, low=1),
    "refill": Spec(float, required=True, null=False, low=0.1, high=MAX_NUMBER),
}
PROVIDER = {
    "name": Spec(str, required=True, null=False, low=1, high=63),
    "type": Spec(str, null=False, high=31, choices=PROVIDER_TYPES),
    "baseUrl": Spec(str, required=True, null=False, low=1, high=255),
    "apiKey": Spec(str, high=TEXT),
    "apiVersion": Spec(str, high=31),
    "comment": Spec(str, high=TEXT, line=False),
    "streamUsage": Spec(bool, null=False),
}
MODEL = {
    "providerId": Spec(int, required=True, null=False, low=1, high=MAX_ID),
    "systemName": Spec(str, required=True, null=False, low=1, high=63),
    "remoteId": Spec(str, high=127),
    "modelType": Spec(str, null=False, high=15, choices=MODEL_TYPES),
    "contextLength": Spec(int, low=1),
    "inputPrice": Spec(float, high=MAX_NUMBER),
    "outputPrice": Spec(float, high=MAX_NUMBER),
    "cacheReadPrice": Spec(float, high=MAX_NUMBER),
    "cacheWritePrice": Spec(float, high=MAX_NUMBER),
    "weight": Spec(float, null=False, high=MAX_NUMBER),
    "comment": Spec(str, high=TEXT, line=False),
}

# What a new model row holds where its request says nothing (a deleted one brought back
# takes them too, not its old remote id, prices or weight).
_MODEL_DEFAULTS = {
    field.name: field.default
    for field in Model._meta.sorted_fields
    if field.name not in ("id", "provider", "system_name", "created_at", "updated_at", "deleted")
}


# -- keys ------------------------------------------------------------------------


def fields(body: dict, spec: dict[str, Spec], *, required: bool = True) -> dict[str, Any]:
    """Check camelCase fields against ``spec``; return them snake_cased (Refused if not)."""
    try:
        return check(body, spec, required=required)
    except Invalid as exc:
        raise Refused(400, str(exc)) from exc


def key_fields(body: dict) -> dict[str, Any]:
    """Check the fields of a new key (camelCase in, column names out)."""
    return fields(body, KEY)


def issue_key(data: dict[str, Any], **extra: Any) -> tuple[ApiKey, str]:
    """Create a key from checked fields; return it and the key, shown only this once."""
    return ApiKey.issue(**data, **extra)


def adopt_key(key: str, data: dict[str, Any], **extra: Any) -> ApiKey:
    """Create a key row for a key value given (an init file's); 409 if it exists."""
    if not FORCED_KEY.fullmatch(key):
        raise Refused(400, "key must be sk- and 32 lowercase hex digits")
    try:
        with database.atomic():
            return ApiKey.create(
                key_hash=ApiKey.hash(key), key_hint=redact.hint(key), **data, **extra
            )
    except pw.IntegrityError as exc:
        raise Refused(409, "That key exists already") from exc


def edit_key(row: ApiKey, data: dict[str, Any]) -> None:
    """Change a key's checked fields (column names); every worker applies them at once."""
    now = utcnow()
    ApiKey.update(**data, updated_at=now).where(ApiKey.id == row.id).execute()
    expires_at = data.get("expires_at")
    ended = data.get("revoked") is True or (expires_at is not None and expires_at <= now)
    _announce(row, revoked=ended)


def ensure_operator_key(external_id: str, data: dict[str, Any]) -> tuple[ApiKey, str | None]:
    """The operator's key for ``external_id``, created or brought back; the key if new."""
    row = ApiKey.get_or_none(ApiKey.external_id == external_id)
    if row is None:
        try:
            with database.atomic():
                return issue_key(data, external_id=external_id, source="operator")
        except pw.IntegrityError:  # another instance created it first
            row = ApiKey.get(ApiKey.external_id == external_id)
    ApiKey.update(**data, revoked=False, updated_at=utcnow()).where(ApiKey.id == row.id).execute()
    _announce(row)
    return ApiKey.get_by_id(row.id), None


def revoke(row: ApiKey) -> None:
    """Revoke a key; every worker of every instance stops accepting it (``announce``)."""
    ApiKey.update(revoked=True, updated_at=utcnow()).where(ApiKey.id == row.id).execute()
    _announce(row, revoked=True)


def _announce(row: ApiKey, revoked: bool = False) -> None:
    """Tell every worker of every instance that a key changed, or was revoked.

    A changed key is served as it was until its new state can be read (the database
    may be away); a revoked one is refused at once (``auth.KeyCache.forget``). The
    plain hash goes too, after: a worker of the previous version forgets the key on
    it, and takes ``REVOKED`` + hash for a hash it does not know (nothing happens).
    """
    if revoked:
        limiter.announce(REVOKED + row.key_hash)
    limiter.announce(row.key_hash)


def key_row(key: str) -> ApiKey:
    """A key by its plaintext value, or by id (the dashboard never holds the key)."""
    if key.isascii() and key.isdigit():
        row = ApiKey.get_or_none(ApiKey.id == int(key)) if 0 < int(key) <= MAX_ID else None
    else:
        row = ApiKey.by_key(key)
    if row is None:
        raise Refused(404, "Key not found")
    return row


# -- providers ---------------------------------------------------------------------


def provider_fields(body: dict, *, required: bool) -> dict[str, Any]:
    """Check a provider's fields (camelCase in, column names out)."""
    data = fields(body, PROVIDER, required=required)
    if "base_url" in data:
        url = urlparse(data["base_url"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise Refused(400, "baseUrl must be an http(s) URL of at most 255 characters")
    return data


def add_provider(data: dict[str, Any]) -> Provider:
    """Create a provider from checked fields; 409 if a live one has that name."""
    _unique_provider_name(data["name"])
    try:
        with database.atomic():
            row = Provider.create(**data)
    except pw.IntegrityError as exc:  # created meanwhile by another request
        raise _name_taken(data["name"]) from exc
    catalog.invalidate()
    return row


def edit_provider(row: Provider, data: dict[str, Any]) -> None:
    """Change a provider's checked fields."""
    if "name" in data and data["name"] != row.name:
        # Not this provider's own: it may carry the name already, from a request that
        # renamed it since ``row`` was read (identical renames at once all succeed).
        _unique_provider_name(data["name"], other_than=row.id)
    try:
        with database.atomic():
            Provider.update(**data, updated_at=utcnow()).where(Provider.id == row.id).execute()
    except pw.IntegrityError as exc:
        raise _name_taken(data["name"]) from exc
    catalog.invalidate()


def remove_provider(row: Provider) -> None:
    """Soft-delete a provider; its models stop serving. 404 if it is deleted already."""
    # Only a live row is taken: of two deletes at once, both read it live, and the one
    # that did not take it is told so (as a delete after a delete is), not a 200.
    taken = Provider.update(deleted=True, updated_at=utcnow()).where(
        (Provider.id == row.id) & (Provider.deleted == False)  # noqa: E712
    )
    if not taken.execute():
        raise Refused(404, "Provider not found")
    catalog.invalidate()


def _unique_provider_name(name: str, other_than: int | None = None) -> None:
    taken = Provider.active().where(Provider.name == name)
    if other_than is not None:
        taken = taken.where(Provider.id != other_than)
    if taken.exists():
        raise _name_taken(name)


def _name_taken(name: str) -> Refused:
    return Refused(409, f"Provider '{name}' already exists")


def remote_models(row: Provider) -> list[dict]:
    """The provider's own model list: proves its URL and key work (UpstreamError if not)."""
    url, headers = endpoint(row.type, row.base_url, row.api_key, row.api_version, "", "models")
    resp = upstream.get(url, headers)
    try:
        payload = json.loads(resp.read(8 * 1024 * 1024))
    except (ValueError, RecursionError) as exc:
        raise UpstreamError("protocol", f"model list is not JSON: {exc}") from exc
    finally:
        resp.close()
    items = payload.get("data", []) if isinstance(payload, dict) else []
    return [
        {"id": m.get("id"), "owned_by": m.get("owned_by"), "created": m.get("created")}
        for m in items
        if isinstance(m, dict) and m.get("id")
    ]


def reseal_provider_keys() -> tuple[int, list[int]]:
    """Encrypt every provider key with the newest key: (how many, ids none could open)."""
    sealed, unreadable = 0, []
    for provider_id, stored in _stored_provider_keys():
        secret = vault.open(stored)
        if secret is None:
            unreadable.append(provider_id)
            continue
        Provider.update(api_key=secret).where(Provider.id == provider_id).execute()
        sealed += 1
    return sealed, unreadable


def unreadable_provider_keys() -> list[int]:
    """Ids of providers whose stored key no configured encryption key opens."""
    return [i for i, stored in _stored_provider_keys() if vault.open(stored) is None]


def _stored_provider_keys() -> list[tuple[int, str]]:
    """(id, stored value) of every provider with a key, deleted ones too, as stored."""
    query = Provider.select(Provider.id, Provider.api_key).where(Provider.api_key.is_null(False))
    return list(database.execute(query))  # a raw cursor: the values as the table holds them


def provider_names(ids: set[int | None]) -> dict[int, str]:
    """Provider id -> name, deleted providers included (old records name them)."""
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    return {
        p.id: p.name
        for p in Provider.select(Provider.id, Provider.name).where(Provider.id.in_(sorted(ids)))
    }


def provider_row(provider_id: int) -> Provider:
    row = Provider.active().where(Provider.id == provider_id).first()
    if row is None:
        raise Refused(404, "Provider not found")
    return row


# -- models ------------------------------------------------------------------------


def model_fields(body: dict, *, required: bool) -> dict[str, Any]:
    """Check a model's fields (camelCase in, column names out)."""
    return fields(body, MODEL, required=required)


def add_model(data: dict[str, Any]) -> Model:
    """Create a model from checked fields (or bring back a deleted one of that name).

    A name is unique among the provider's live models (the index leaves deleted ones
    out): a deleted model of that name, the latest if several, comes back as new, with
    its id, as NexusGate brings one back."""
    provider = provider_row(data.pop("provider_id"))
    named = Model.select().where(
        (Model.provider == provider) & (Model.system_name == data["system_name"])
    )
    if named.where(Model.deleted == False).exists():  # noqa: E712
        raise _model_taken(data["system_name"])
    existing = named.order_by(Model.id.desc()).first()
    try:
        with database.atomic():
            if existing is not None:  # bring the deleted model back
                fresh = {**_MODEL_DEFAULTS, **data}  # none of the deleted model's settings
                brought = Model.update(**fresh, deleted=False, updated_at=utcnow()).where(
                    (Model.id == existing.id) & (Model.deleted == True)  # noqa: E712
                )
                if not brought.execute():  # brought back meanwhile by another request
                    raise _model_taken(data["system_name"])
                row = Model.get_by_id(existing.id)
            else:
                row = Model.create(provider=provider, **data)
    except pw.IntegrityError as exc:  # created meanwhile by another request
        raise _model_taken(data["system_name"]) from exc
    catalog.invalidate()
    return row


def edit_model(row: Model, data: dict[str, Any]) -> None:
    """Change a model's checked fields; its provider stays."""
    if data.pop("provider_id", row.provider_id) != row.provider_id:
        raise Refused(400, "providerId cannot be changed; create a model on the other provider")
    try:
        with database.atomic():
            Model.update(**data, updated_at=utcnow()).where(Model.id == row.id).execute()
    except pw.IntegrityError as exc:
        raise Refused(409, "Another model of this provider has that system name") from exc
    catalog.invalidate()


def remove_model(row: Model) -> None:
    """Soft-delete a model; it stops serving. 404 if it is deleted already."""
    taken = Model.update(deleted=True, updated_at=utcnow()).where(
        (Model.id == row.id) & (Model.deleted == False)  # noqa: E712
    )
    if not taken.execute():  # another delete took it since ``row`` was read
        raise Refused(404, "Model not found")
    catalog.invalidate()


def _model_taken(name: str) -> Refused:
    return Refused(409, f"Model '{name}' already exists on this provider")


def apply_weights(system_name: str, weights: Any) -> None:
    """Set the load-balancing weights ``[{modelId, weight}]`` of one system name's models."""
    if not isinstance(weights, list) or not all(
        isinstance(w, dict)
        and in_range(w.get("modelId"), int, 1, MAX_ID)
        and in_range(w.get("weight"), float, 0, MAX_NUMBER)
        for w in weights
    ):
        raise Refused(400, f"weights must be a list of {{modelId, weight 0 to {MAX_NUMBER:.0f}}}")
    ids = {m.id for m in Model.active().where(Model.system_name == system_name)}
    foreign = [w["modelId"] for w in weights if w["modelId"] not in ids]
    if foreign:
        raise Refused(400, f"models {foreign} do not serve '{system_name}'")
    # Rows locked in one order, by id, whatever order the request lists them in: two
    # requests at once in opposite orders deadlocked (PostgreSQL), and one was a 503.
    # The sort is stable: a model listed twice still takes the weight listed last.
    with database.atomic():
        for w in sorted(weights, key=lambda w: w["modelId"]):
            Model.update(weight=float(w["weight"]), updated_at=utcnow()).where(
                Model.id == w["modelId"]
            ).execute()
    catalog.invalidate()


def model_row(model_id: int) -> Model:
    row = Model.active().where(Model.id == model_id).first()
    if row is None:
        raise Refused(404, "Model not found")
    return row


# -- per-model limits (model_limits.py applies them) ----------------------------------


def rate_limits() -> dict[str, Any]:
    """``{default: {limit, refill} | None, <identifier>: {limit, refill}, ...}``."""
    out: dict[str, Any] = {DEFAULT: None}
    for row in RateLimit.select().order_by(RateLimit.identifier):
        out[row.identifier] = {"limit": row.limit, "refill": row.refill}
    return out


def rate_limit(identifier: str) -> dict[str, Any]:
    """One per-model limit as ``{identifier, limit, refill}``; 404 if there is none."""
    row = RateLimit.get_or_none(RateLimit.identifier == identifier)
    if row is None:
        raise Refused(404, f"No rate limit for '{identifier}'")
    return {"identifier": row.identifier, "limit": row.limit, "refill": row.refill}


def add_rate_limit(body: dict) -> dict[str, Any]:
    """Create a per-model limit from checked fields; 409 if the identifier has one."""
    data = fields(body, RATE_LIMIT)
    try:
        with database.atomic():
            RateLimit.create(**data)
    except pw.IntegrityError as exc:
        raise Refused(409, f"A rate limit for '{data['identifier']}' already exists") from exc
    _limits_changed()
    return data


def remove_rate_limit(identifier: str) -> None:
    """Delete a per-model limit; 404 if there is none."""
    if not RateLimit.delete().where(RateLimit.identifier == identifier).execute():
        raise Refused(404, f"No rate limit for '{identifier}'")
    _limits_changed()


def _limits_changed() -> None:
    model_limits.reload()  # this worker: before the answer
    limiter.announce(CHANGED)
