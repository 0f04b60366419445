"""``/api/admin/logs`` and ``/settings``: the gateway's own logs, and its settings.

``GET /logs`` pages as ``/completions`` do (``{data, total, from}``, newest first;
NexusGate wrote the table but never served it) and ``GET /logs/<id>`` answers
NexusGate's ``getLog`` shape; ``POST /logs/<id>/ack`` marks one seen. The settings
routes are NexusGate HEAD's (``settings.py`` keeps its rules).
"""

from __future__ import annotations

from flask import Response, request

from gateway import jsonio, records, registry, serializers, settings, srvlog, urlargs
from gateway.admin_api.blueprint import MAX_PAGE, body, bp, int_arg
from gateway.models import ApiKey, Completion, SrvLog

# -- server logs --------------------------------------------------------------


@bp.get("/logs")
def list_logs() -> Response:
    """The gateway's own warnings and errors, newest first, paged as /completions."""
    level = request.args.get("level", "")
    if level and level not in srvlog.LEVEL_NAMES:
        raise registry.Refused(400, f"level must be one of {', '.join(srvlog.LEVEL_NAMES)}")
    acknowledged = request.args.get("acknowledged")
    if acknowledged not in (None, "", "true", "false"):
        raise registry.Refused(400, "acknowledged must be true or false")
    query = srvlog.select(
        level,
        None if not acknowledged else acknowledged == "true",
        api_key=int_arg("apiKeyId", None, 1, urlargs.MAX_ID),
        completion=int_arg("completionId", None, 1, urlargs.MAX_ID),
        upstream=int_arg("upstreamId", None, 1, urlargs.MAX_ID),
    )
    offset = int_arg("offset", 0, 0, urlargs.MAX_ID)
    limit = int_arg("limit", 100, 1, MAX_PAGE)
    rows = [serializers.srv_log(r) for r in query.offset(offset).limit(limit)]
    return jsonio.response({"data": rows, "total": query.count(), "from": offset})


@bp.get("/logs/<id:log_id>")
def get_log(log_id: int) -> Response:
    """One log with the key and the call it names (NexusGate's ``getLog`` shape)."""
    row = _log_row(log_id)
    key = row.related_api_key_id and ApiKey.get_or_none(ApiKey.id == row.related_api_key_id)
    call = row.related_completion_id and records.live(Completion, row.related_completion_id)
    return jsonio.response(
        {
            "log": serializers.srv_log(row),
            "apiKey": serializers.api_key(key) if key else None,
            "upstream": None,
            "completion": serializers.completion(call) if call else None,
        }
    )


@bp.post("/logs/<id:log_id>/ack")
def acknowledge_log(log_id: int) -> Response:
    srvlog.acknowledge(srvlog.select().where(SrvLog.id == _log_row(log_id).id))
    return jsonio.response(serializers.srv_log(_log_row(log_id)))


def _log_row(log_id: int) -> SrvLog:
    row = SrvLog.get_or_none(SrvLog.id == log_id)
    if row is None:
        raise registry.Refused(404, "Log not found")
    return row


# -- settings -----------------------------------------------------------------


@bp.get("/settings")
def list_settings() -> Response:
    return jsonio.response([serializers.setting(s) for s in settings.visible()])


@bp.get("/settings/<key>")
def get_setting(key: str) -> Response:
    return jsonio.response(serializers.setting(settings.get(key)))


@bp.put("/settings/<key>")
def put_setting(key: str) -> Response:
    return jsonio.response(serializers.setting(settings.put(key, body())))


@bp.delete("/settings/<key>")
def delete_setting(key: str) -> Response:
    return jsonio.response(serializers.setting(settings.delete(key)))
