"""The dashboard: server-rendered pages at ``/`` for operators, in English and Chinese.

Login with the admin secret starts a signed cookie session (``sessions.py``); every
POST must carry the session's CSRF token; every page but the login form needs the
session. Pages: Overview, Requests and Embeddings (tables and details), API keys,
Providers and models. Writes go through the admin API's own functions, so a form and
the JSON API change things the same way and check the same rules. Pages work with
JavaScript off; prompts and answers are untrusted text (autoescaped, never ``|safe``,
and a lone surrogate in them shows as U+FFFD instead of breaking the page), and no
page shows a secret in full but the new key, once, in the answer that made it.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import get_timezone, ngettext
from flask_babel import gettext as _
from werkzeug.exceptions import HTTPException

from gateway import (
    auth,
    charts,
    db,
    export,
    forwarded,
    i18n,
    ledger,
    pricing,
    records,
    redact,
    registry,
    serializers,
    sessions,
    settings,
    srvlog,
    stats,
    transcript,
    urlargs,
)
from gateway.limiter import limiter
from gateway.models import (
    STATUSES,
    ApiKey,
    Completion,
    Embedding,
    Model,
    Provider,
    SrvLog,
    utcnow,
)
from gateway.upstream import UpstreamError

bp = Blueprint("dashboard", __name__)
bp.record_once(urlargs.register)

LANGUAGE_COOKIE = "lang"
EXPIRY_DAYS = (7, 30, 90, 180, 365)
OPEN = ("dashboard.login", "dashboard.language")  # the pages a visitor without a session sees
SECURITY_HEADERS = {
    # Scripts only from our own static folder: a prompt that smuggles markup in can't run.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: http: https:; "
    "script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",  # the new-key page must not be kept anywhere
}


# -- the shell: login, language, guards -----------------------------------------


@bp.before_request
def _guard() -> Response | None:
    db.connect()  # every page reads the database; /v1 requests do not connect at all
    if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
        # PostgreSQL refuses NUL in text: keep it away from every query.
        abort(400, _("The request could not be read."))
    if request.method == "POST" and not sessions.csrf_valid(_posted("csrf_token")):
        abort(400, _("The form expired. Reload the page and try again."))
    if request.endpoint not in OPEN and not sessions.logged_in():
        return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
    return None


@bp.after_request
def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    return render_template("dashboard/error.html", error=exc), exc.code or 500


@bp.errorhandler(registry.Refused)
def _rejected(exc: registry.Refused) -> Response:
    # The admin API's checks speak English (they are the API's error messages).
    flash(_("Not saved: %(reason)s", reason=exc.message), "error")
    return redirect(_next(request.form.get("next")))


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        # Wrong secrets are throttled per address, shared by every instance (limiter).
        address = forwarded.address_of(request, current_app.config["TRUSTED_PROXIES"])
        wait = limiter.attempt(address)
        if wait:
            message = ngettext(
                "Too many wrong secrets from your address. Try again in %(num)d second.",
                "Too many wrong secrets from your address. Try again in %(num)d seconds.",
                wait,
            )
            flash(message, "error")
            page = render_template("dashboard/login.html", next=request.form.get("next"))
            return page, 429, {"Retry-After": str(wait)}
        secret = request.form.get("secret", "")
        expected = auth.admin_secret(current_app)
        if hmac.compare_digest(secret.encode(), expected.encode()):
            limiter.succeeded(address)
            sessions.log_in()
            return redirect(_next(request.form.get("next")))
        flash(_("That is not the admin secret."), "error")
        return render_template("dashboard/login.html", next=request.form.get("next")), 401
    if sessions.logged_in():
        return redirect(_next(request.args.get("next")))
    return render_template("dashboard/login.html", next=request.args.get("next"))


@bp.post("/logout")
def logout():
    sessions.log_out()
    return redirect(url_for("dashboard.login"))


@bp.post("/language")
def language():
    response = redirect(_next(request.form.get("next")))
    choice = request.form.get("lang")
    if choice in i18n.LANGUAGES:
        response.set_cookie(
            LANGUAGE_COOKIE, choice, max_age=365 * 86400, samesite="Lax", httponly=True
        )
    return response


def _locale() -> str:
    return i18n.language_of(
        request.cookies.get(LANGUAGE_COOKIE), [tag for tag, _q in request.accept_languages]
    )


def _next(target: str | None) -> str:
    """A path on this site to go back to; anything else (another site) means the overview."""
    return urlargs.local_path(target) or url_for("dashboard.overview")


def _posted(name: str) -> str | None:
    """A posted form field; a body that cannot be read (broken chunked framing) is a 400."""
    try:
        return request.form.get(name)
    except HTTPException:
        raise
    except Exception:  # gunicorn's ParseException kinds, a socket cut mid-body
        abort(400, _("The request could not be read."))


# -- overview -------------------------------------------------------------------


@bp.get("/")
def overview():
    range_key = request.args.get("range") or settings.overview_range()
    if range_key not in stats.RANGES:
        range_key = settings.overview_range()
    data = stats.overview(range_key)
    spend = ledger.ledger(data.since)
    return render_template(
        "dashboard/overview.html",
        data=data,
        ranges=stats.RANGES,
        charts=charts.overview(data, STATUSES),
        spend=spend,
        keys={k.id: k for k in ApiKey.select()},
        providers=registry.provider_names(set(spend.by_provider)),
    )


# -- requests and embeddings ------------------------------------------------------


@bp.get("/requests")
def requests_list():
    return _table(Completion, "dashboard/requests.html")


@bp.get("/requests/<id:record_id>")
def request_detail(record_id: int):
    found = records.detail(Completion, record_id)
    tokens = serializers.tokens(found["row"].usage)
    return render_template("dashboard/request.html", tokens=tokens, **found)


@bp.get("/embeddings")
def embeddings_list():
    return _table(Embedding, "dashboard/embeddings.html")


@bp.get("/embeddings/<id:record_id>")
def embedding_detail(record_id: int):
    return render_template("dashboard/embedding.html", **records.detail(Embedding, record_id))


@bp.get("/requests/export")
def requests_export():
    return _download(Completion, serializers.completion)


@bp.get("/embeddings/export")
def embeddings_export():
    return _download(Embedding, serializers.embedding)


def _table(table: Any, template: str) -> str:
    listing = records.listing(table, request.args, _zone())
    return render_template(
        template, listing=listing, bounds=records.bounds(table), **records.names(listing.rows)
    )


def _download(table: Any, serialize: Any) -> Response:
    """What the table shows, every page of it, as a file (the same query string)."""
    fmt = request.args.get("format", "csv")
    if fmt not in export.FORMATS:
        abort(404)
    found = records.parse(table, request.args, strict=False, zone=_zone())
    return records.attachment(table, found, serialize, fmt)


def _zone() -> ZoneInfo:
    """The time zone the dashboard shows times in: times typed in filters are in it too."""
    return ZoneInfo(str(get_timezone()))


# -- server logs ------------------------------------------------------------------


@bp.get("/logs")
def logs():
    return render_template("dashboard/logs.html", logs=srvlog.page(request.args))


@bp.post("/logs/ack")
def acknowledge_logs():
    """Acknowledge one log (``id``), or every one the page's level filter shows."""
    log_id = urlargs.integer(_posted("id"), 1, urlargs.MAX_ID)
    level = _posted("level")
    query = srvlog.select(level if level in srvlog.LEVEL_NAMES else "", acknowledged=False)
    if log_id is not None:
        query = query.where(SrvLog.id == log_id)
    count = srvlog.acknowledge(query)
    flash(ngettext("%(num)d log acknowledged.", "%(num)d logs acknowledged.", count), "ok")
    return redirect(_next(request.form.get("next")))


# -- API keys -------------------------------------------------------------------


@bp.get("/keys")
def keys():
    return _keys_page()


@bp.post("/keys")
def create_key():
    body = _form_body(KEY_FORM)
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
    registry.edit_key(row, registry.key_fields(_form_body(limits, clear=clear)))
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
        now=now,
        show_revoked=show_revoked,
        new_key=new_key,
        new_row=new_row,
        expiry_days=EXPIRY_DAYS,
    )


# -- providers and models ---------------------------------------------------------

PROVIDER_FORM = {
    "name": str,
    "type": str,
    "baseUrl": str,
    "apiKey": str,
    "apiVersion": str,
    "comment": str,
    "streamUsage": bool,
}
MODEL_FORM = {
    "systemName": str,
    "remoteId": str,
    "modelType": str,
    "contextLength": int,
    "inputPrice": float,
    "outputPrice": float,
    "cacheReadPrice": float,
    "cacheWritePrice": float,
    "weight": float,
    "comment": str,
}


@bp.get("/providers")
def providers():
    models = list(Model.active().order_by(Model.system_name, Model.id))
    by_system: dict[str, list[Model]] = {}
    for model in models:
        by_system.setdefault(model.system_name, []).append(model)
    return render_template(
        "dashboard/providers.html",
        providers=list(Provider.active().order_by(Provider.name)),
        models=models,
        by_system=by_system,
        mask=redact.mask,
    )


@bp.post("/providers")
def create_provider():
    row = registry.add_provider(registry.provider_fields(_form_body(PROVIDER_FORM), required=True))
    flash(_("Provider %(name)s added.", name=row.name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.route("/providers/<id:provider_id>", methods=["GET", "POST"])
def edit_provider(provider_id: int):
    row = _live(Provider, provider_id)
    if request.method == "POST":
        # A blank key field keeps the stored key: the page never holds it to send back.
        body = _form_body(PROVIDER_FORM, clear=("apiVersion", "comment"))
        registry.edit_provider(row, registry.provider_fields(body, required=False))
        flash(_("Provider %(name)s saved.", name=body.get("name", row.name)), "ok")
        return redirect(url_for("dashboard.providers"))
    return render_template("dashboard/provider_form.html", row=row, mask=redact.mask)


@bp.post("/providers/<id:provider_id>/delete")
def delete_provider(provider_id: int):
    row = _live(Provider, provider_id)
    registry.remove_provider(row)
    flash(_("Provider %(name)s deleted.", name=row.name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/providers/<id:provider_id>/test")
def test_provider(provider_id: int):
    row = _live(Provider, provider_id)
    try:
        found = registry.remote_models(row)
    except UpstreamError as exc:
        flash(_("%(name)s did not answer: %(error)s", name=row.name, error=exc.describe()), "error")
    else:
        names = ", ".join(m["id"] for m in found[:8]) + (" …" if len(found) > 8 else "")
        message = ngettext(
            "%(name)s works: %(num)d model found (%(names)s).",
            "%(name)s works: %(num)d models found (%(names)s).",
            len(found),
            name=row.name,
            names=names,
        )
        flash(message, "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/providers/<id:provider_id>/models")
def create_model(provider_id: int):
    body = {**_form_body(MODEL_FORM), "providerId": _live(Provider, provider_id).id}
    row = registry.add_model(registry.model_fields(body, required=True))
    flash(_("Model %(name)s added.", name=row.system_name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.route("/models/<id:model_id>", methods=["GET", "POST"])
def edit_model(model_id: int):
    row = _live(Model, model_id)
    if request.method == "POST":
        clear = ("remoteId", "contextLength", "inputPrice", "outputPrice", "comment")
        clear += ("cacheReadPrice", "cacheWritePrice")
        body = _form_body(MODEL_FORM, clear)
        registry.edit_model(row, registry.model_fields(body, required=False))
        flash(_("Model %(name)s saved.", name=body.get("systemName", row.system_name)), "ok")
        return redirect(url_for("dashboard.providers"))
    return render_template("dashboard/model_form.html", row=row)


@bp.post("/models/<id:model_id>/delete")
def delete_model(model_id: int):
    row = _live(Model, model_id)
    registry.remove_model(row)
    flash(_("Model %(name)s deleted.", name=row.system_name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/weights/<path:system_name>")
def weights(system_name: str):
    posted = [
        {"modelId": model_id, "weight": _number(value, float)}
        for name, value in request.form.items()
        if (model_id := urlargs.integer(name.removeprefix("weight-"), 1, urlargs.MAX_ID))
    ]
    registry.apply_weights(system_name, posted)
    flash(_("Weights of %(name)s saved.", name=system_name), "ok")
    return redirect(url_for("dashboard.providers") + "#balance")


def _live(table: Any, row_id: int) -> Any:
    row = table.active().where(table.id == row_id).first()
    if row is None:
        abort(404)
    return row


def _form_body(fields: dict[str, type], clear: tuple[str, ...] = ()) -> dict[str, Any]:
    """The posted form as an admin API body, for the API's own checks to judge."""
    # Numbers are parsed; a blank field is left out, or None where it clears a value.
    body: dict[str, Any] = {}
    for name, kind in fields.items():
        raw = request.form.get(name, "").strip()
        if kind is bool:
            body[name] = name in request.form
        elif raw:
            body[name] = _number(raw, kind) if kind in (int, float) else raw
        elif name in clear:
            body[name] = None
    return body


def _number(raw: str, kind: type) -> Any:
    """ASCII digits as a number of ``kind``; anything else is left as text for the check."""
    value = urlargs.integer(raw, -urlargs.MAX_ID, urlargs.MAX_ID) if kind is int else None
    if kind is float and urlargs.DECIMAL.fullmatch(raw):
        value = float(raw)
    return raw if value is None else value  # text: the admin API's check names the field


def init_app(app: Flask) -> None:
    """Languages, sessions, formats and the transcript helpers for the dashboard."""
    i18n.init_app(app, _locale, settings.timezone)
    sessions.init_app(app)
    app.jinja_env.globals.update(
        parts=transcript.parts,
        tool_calls=transcript.tool_calls,
        preview=transcript.preview,
        image_src=transcript.image_src,
        current_language=_locale,
    )
    app.jinja_env.filters["pretty"] = transcript.pretty
    app.jinja_env.filters["nano_usd"] = pricing.usd  # then |usd: a cost as the ledger sums it
    app.jinja_env.finalize = transcript.printable  # a lone surrogate must not make a 500
