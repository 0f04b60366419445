"""The Logs page: the gateway's own warnings and errors, and acknowledging them."""

from __future__ import annotations

from flask import flash, redirect, render_template, request
from flask_babel import ngettext

from gateway import srvlog, urlargs
from gateway.dashboard.blueprint import bp, next_page, posted
from gateway.models import SrvLog


@bp.get("/logs")
def logs():
    return render_template("dashboard/logs.html", logs=srvlog.page(request.args))


@bp.post("/logs/ack")
def acknowledge_logs():
    """Acknowledge one log (``id``), or every one the page's level filter shows."""
    log_id = urlargs.integer(posted("id"), 1, urlargs.MAX_ID)
    level = posted("level")
    query = srvlog.select(level if level in srvlog.LEVEL_NAMES else "", acknowledged=False)
    if log_id is not None:
        query = query.where(SrvLog.id == log_id)
    count = srvlog.acknowledge(query)
    flash(ngettext("%(num)d log acknowledged.", "%(num)d logs acknowledged.", count), "ok")
    return redirect(next_page(request.form.get("next")))
