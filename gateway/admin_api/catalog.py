"""``/api/admin/providers``, ``/models`` and ``/ratelimits``: what routing knows.

Providers and models as NexusGate's admin API has them (provider keys masked when read
back), weights by system name, and the per-model limits. The checked changes are
``registry``'s; JSON shapes are ``serializers``'.
"""

from __future__ import annotations

from typing import Any

from flask import Response, request

from gateway import jsonio, registry, serializers
from gateway.admin_api.blueprint import body, bp
from gateway.failures import UpstreamError
from gateway.models import MODEL_TYPES, Model, Provider


@bp.get("/providers")
def list_providers() -> Response:
    rows = Provider.active().order_by(Provider.id)
    return jsonio.response([serializers.provider(p) for p in rows])


@bp.post("/providers")
def create_provider() -> Response:
    row = registry.add_provider(registry.provider_fields(body(), required=True))
    return jsonio.response(serializers.provider(row))


@bp.get("/providers/<id:provider_id>")
def get_provider(provider_id: int) -> Response:
    return jsonio.response(serializers.provider(registry.provider_row(provider_id)))


@bp.put("/providers/<id:provider_id>")
def update_provider(provider_id: int) -> Response:
    row = registry.provider_row(provider_id)
    registry.edit_provider(row, registry.provider_fields(body(), required=False))
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
    query = _of_type(Model.active().order_by(Model.id))
    return jsonio.response([serializers.model(m) for m in query])


@bp.post("/models")
def create_model() -> Response:
    row = registry.add_model(registry.model_fields(body(), required=True))
    return jsonio.response(serializers.model(row))


@bp.get("/models/system-names")
def system_names() -> Response:
    query = Model.active().select(Model.system_name).distinct().order_by(Model.system_name)
    query = _of_type(query)
    return jsonio.response([m.system_name for m in query])


@bp.get("/models/by-system-name/<path:system_name>")
def models_by_system_name(system_name: str) -> Response:
    query = _of_type(Model.active().where(Model.system_name == system_name).order_by(Model.id))
    return jsonio.response(
        [
            {"model": serializers.model(m), "provider": serializers.provider(m.provider)}
            for m in query
        ]
    )


@bp.put("/models/by-system-name/<path:system_name>/weights")
def set_weights(system_name: str) -> Response:
    registry.apply_weights(system_name, body().get("weights"))
    return models_by_system_name(system_name)


def _of_type(query: Any) -> Any:
    """``query`` narrowed to the ``modelType`` asked for, if any (not a type: a 400)."""
    kind = request.args.get("modelType")
    if not kind:
        return query
    if kind not in MODEL_TYPES:
        raise registry.Refused(400, f"modelType must be one of {', '.join(MODEL_TYPES)}")
    return query.where(Model.model_type == kind)


@bp.get("/models/<id:model_id>")
def get_model(model_id: int) -> Response:
    return jsonio.response(serializers.model(registry.model_row(model_id)))


@bp.put("/models/<id:model_id>")
def update_model(model_id: int) -> Response:
    row = registry.model_row(model_id)
    registry.edit_model(row, registry.model_fields(body(), required=False))
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
    return jsonio.response(registry.add_rate_limit(body()), 201)


@bp.get("/ratelimits/<path:identifier>")
def get_rate_limit(identifier: str) -> Response:
    return jsonio.response(registry.rate_limit(identifier))


@bp.delete("/ratelimits/<path:identifier>")
def delete_rate_limit(identifier: str) -> Response:
    registry.remove_rate_limit(identifier)
    return Response(status=204, mimetype="application/json")
