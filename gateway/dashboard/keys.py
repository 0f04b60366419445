"""The API keys page: create (the key shown once, in that answer only), limits, revoke.

A new key is neither flashed (that would put it in the cookie) nor stored: it is in
the one page that answers the form that made it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _

from gateway import auth, ledger, pricing, registry, stats
from gateway.dashboard.blueprint import bp
from gateway.dashboard.forms import form_body
from gateway.limiter import limiter
from gateway.models import ApiKey, utcnow

EXPIRY_DAYS = (7, 30, 90, 180, 365)


@bp.get("/keys")
def keys():
    return _keys_page()


@bp.post("/keys")
def create_key():
    body = form_body(KEY_FORM)
    days = request.form.get("expires", type=int)
    if days in EXPIRY_DAYS:
        body["expiresAt"] = (datetime.now(UTC) + timedelta(days=days)).isoformat()
    row, key = registry.issue_key(registry.key_fields(body))
    # Shown in this answer only: not flashed (that would put it in the cookie), not stored.
    return _keys_page(new_key=key, new_row=row)


@bp.post("/keys/<id:key_id>/revoke")
def revoke_key(key_id: int):
    row = ApiKey.get_or_none(ApiKey.id == key_id) or abort(404)
    registry.revoke(row)
    flash(_("Key %(hint)s revoked.", hint=row.key_hint), "ok")
    return redirect(url_for("dashboard.keys"))


@bp.post("/keys/<id:key_id>/limits")
def key_limits(key_id: int):
    row = ApiKey.get_or_none(ApiKey.id == key_id) or abort(404)
    limits = {"rpmLimit": int, "tpmLimit": int, "maxConcurrent": int, "budgetUsd": float}
    clear = ("maxConcurrent", "budgetUsd")
    registry.edit_key(row, registry.key_fields(form_body(limits, clear=clear)))
    flash(_("Limits of %(hint)s saved.", hint=row.key_hint), "ok")
    return redirect(url_for("dashboard.keys"))


KEY_FORM = {
    "comment": str,
    "rpmLimit": int,
    "tpmLimit": int,
    "maxConcurrent": int,
    "budgetUsd": float,
}


def _keys_page(new_key: str | None = None, new_row: ApiKey | None = None) -> str:
    show_revoked = request.args.get("revoked") == "1"
    query = ApiKey.select().order_by(ApiKey.id.desc())
    if not show_revoked:
        query = query.where(ApiKey.revoked == False)  # noqa: E712
    keys = list(query)
    now = utcnow()
    return render_template(
        "dashboard/keys.html",
        keys=keys,
        # What each usable key has used of its limits right now, as every instance sees it.
        live={
            k.id: limiter.usage(k.id, k.rpm_limit, k.tpm_limit)
            for k in keys
            if auth.Caller.of(k).usable(now)
        },
        usage=stats.usage_by_key(now - timedelta(days=1)),
        spend=ledger.spend_by_key(ledger.month_start(now)),
        # What each key's budget counts (deleted records too), shown against it.
        spent={k: pricing.usd(n) or 0.0 for k, n in ledger.month_spend(now).items()},
        now=now,
        show_revoked=show_revoked,
        new_key=new_key,
        new_row=new_row,
        expiry_days=EXPIRY_DAYS,
    )
