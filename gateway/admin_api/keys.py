"""``/api/admin/apiKey``: gateway keys, their limits, budgets and the operator's ensure.

Keys leave in full only once, in the answer that created them; elsewhere as their hint.
The changes themselves (checks, announcements to every worker) are ``registry``'s.
"""

from __future__ import annotations

from flask import Response

from gateway import jsonio, registry, serializers
from gateway.admin_api.blueprint import body, bp, flag
from gateway.limiter import limiter
from gateway.models import ApiKey


@bp.get("/apiKey")
def list_keys() -> Response:
    query = ApiKey.select().order_by(ApiKey.id)
    if not flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return jsonio.response([serializers.api_key(k) for k in query])


@bp.get("/apiKey/managed")
def list_managed_keys() -> Response:
    query = ApiKey.select().where(ApiKey.source == "operator").order_by(ApiKey.id)
    if not flag("includeRevoked"):
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    return jsonio.response([serializers.api_key(k) for k in query])


@bp.post("/apiKey")
def create_key() -> Response:
    row, key = registry.issue_key(registry.key_fields(body()))
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
    data = registry.fields(body(), registry.LIMITS)
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
    data = registry.fields(body(), registry.BUDGET)
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
    data = registry.fields(body(), registry.OPERATOR_KEY)
    row, key = registry.ensure_operator_key(external_id, data)
    return jsonio.response(
        {
            "id": row.id,
            "key": key or row.key_hint,
            "created": key is not None,
            "externalId": external_id,
        }
    )


def _external_id(external_id: str) -> str:
    if not 1 <= len(external_id) <= 127 or "\x00" in external_id:
        raise registry.Refused(400, "externalId must be 1 to 127 characters")
    return external_id
