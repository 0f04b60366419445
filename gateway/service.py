"""The public API's answers that are not calls: models, a key's usage, metrics, health.

Errors raised here are rendered like the calls' (the app's ``proxy.render_error``).
"""

from __future__ import annotations

import logging

from flask import Response, current_app, request

from gateway import auth, jsonio, metrics, stats, urlargs
from gateway.calls import calls
from gateway.errors import AuthenticationFailed, ServiceUnavailable
from gateway.routing import catalog

log = logging.getLogger(__name__)

bp = urlargs.AnySlash("service", __name__)  # NexusGate answers /v1/models/ too


@bp.get("/v1/models")
def list_models() -> Response:
    """Every live system name, in OpenAI's list format (no key needed, as NexusGate):
    ``created`` is when its first model row was made, in Unix seconds."""
    seen: set[str] = set()
    data = []
    for model in catalog.system_names():  # a chat and an embedding model may share a name
        if model.system_name not in seen:
            seen.add(model.system_name)
            data.append(
                {
                    "id": model.system_name,
                    "object": "model",
                    "created": model.created,
                    "owned_by": model.provider_name,
                }
            )
    return jsonio.response({"object": "list", "data": data})


@bp.get("/api/usage")
def key_usage() -> Response:
    """The calling key's lifetime token sums, as NexusGate (from the records: needs the DB)."""
    caller = auth.authenticate(request.headers)
    try:
        totals = stats.key_totals(caller.id)
    except Exception as exc:  # the database is away: say so, in the API's own shape
        log.warning("usage: cannot read the records (%s)", exc)
        raise ServiceUnavailable(
            "Usage is read from the records, and the database does not answer; try again later",
            code="database_unavailable",
        ) from exc
    return jsonio.response(
        {
            "total_prompt_tokens": totals.prompt_tokens,
            "total_completion_tokens": totals.completion_tokens,
        }
    )


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus metrics of every worker of this instance (METRICS_TOKEN: bearer required)."""
    if not metrics.authorized(
        request.headers.get("Authorization"), current_app.config["METRICS_TOKEN"]
    ):
        raise AuthenticationFailed("/metrics needs Authorization: Bearer <METRICS_TOKEN>")
    # Counted from this worker's keys and catalog, as calls see them: a scrape works,
    # and says the same, while the database is away.
    metrics.catalog(auth.keys.count_usable(), *catalog.counts())
    return Response(metrics.render(), content_type=metrics.CONTENT_TYPE)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonio.response({"status": "ok", "calls": calls.active})
