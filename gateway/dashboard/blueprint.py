"""The dashboard's blueprint: sign-in, language, the guard every page passes, and helpers.

Login with the admin secret starts a signed cookie session (``sessions.py``); every
POST must carry the session's CSRF token; every page but the login form needs the
session. Every answer carries the security headers (scripts only from our own static
folder). A refusal of the registry's is flashed and sends the form back where it came
from, and so does a change PostgreSQL gave up for another made at once (a deadlock: not
an outage); an HTTP error renders the error page, and so does a database that does not
answer (503).
"""

from __future__ import annotations

import hmac
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
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
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from gateway import auth, db, forwarded, i18n, registry, sessions, urlargs
from gateway.limiter import limiter

bp = Blueprint("dashboard", __name__)
bp.record_once(urlargs.register)

LANGUAGE_COOKIE = "lang"
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


@bp.before_request
def _guard() -> Response | None:
    db.connect()  # every page reads the database; /v1 requests do not connect at all
    if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
        # PostgreSQL refuses NUL in text: keep it away from every query.
        abort(400, _("The request could not be read."))
    if request.method == "POST" and not sessions.csrf_valid(posted("csrf_token")):
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


def unrouted(exc: HTTPException) -> tuple[str, int, dict[str, str]]:
    """The page for a path outside the APIs that no route takes (a 404, or a 405 on
    /healthz), in the visitor's language: Werkzeug's own is English only. Without the
    menu, which reads the settings, and without a form, which would start a session: a
    scanner's guesses cost no database read and leave no cookie."""
    page = render_template("dashboard/unrouted.html", error=exc)
    headers = {**dict(exc.get_headers()), **SECURITY_HEADERS}  # a 405's Allow among them
    return page, exc.code or 500, headers


def _database_away(exc: Exception) -> tuple[str, int, dict[str, str]]:
    """Every page reads the database: without it, the error page says so."""
    current_app.logger.warning("dashboard: the database does not answer (%s)", exc)
    page = render_template("dashboard/error.html", error=ServiceUnavailable())
    return page, 503, {"Retry-After": str(db.AWAY_RETRY_AFTER)}


for _away in db.AWAY:
    bp.register_error_handler(_away, _database_away)


@bp.errorhandler(registry.Refused)
def _rejected(exc: registry.Refused) -> Response:
    # The admin API's checks speak English (they are the API's error messages).
    flash(_("Not saved: %(reason)s", reason=exc.message), "error")
    return redirect(next_page(request.form.get("next")))


@bp.errorhandler(db.Conflict)
def _conflicted(exc: db.Conflict) -> Response | tuple[str, int, dict[str, str]]:
    """A change PostgreSQL gave up for another made at once: not saved, and no outage."""
    current_app.logger.warning(
        "dashboard: %s %s given up by the database (%s)", request.method, request.path, exc.reason
    )
    if request.method != "POST":  # a read waiting past lock_timeout (a table locked)
        page = render_template("dashboard/error.html", error=ServiceUnavailable())
        return page, 503, {"Retry-After": str(db.AWAY_RETRY_AFTER)}
    flash(
        _(
            "Not saved: the change collided with another made at once (%(reason)s); try again",
            reason=exc.reason,
        ),
        "error",
    )
    return redirect(next_page(request.form.get("next")))


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
            return redirect(next_page(request.form.get("next")))
        flash(_("That is not the admin secret."), "error")
        return render_template("dashboard/login.html", next=request.form.get("next")), 401
    if sessions.logged_in():
        return redirect(next_page(request.args.get("next")))
    return render_template("dashboard/login.html", next=request.args.get("next"))


@bp.post("/logout")
def logout():
    sessions.log_out()
    return redirect(url_for("dashboard.login"))


@bp.post("/language")
def language():
    response = redirect(next_page(request.form.get("next")))
    choice = request.form.get("lang")
    if choice in i18n.LANGUAGES:
        response.set_cookie(
            LANGUAGE_COOKIE, choice, max_age=365 * 86400, samesite="Lax", httponly=True
        )
    return response


def locale() -> str:
    """The visitor's language: the switcher's cookie, else Accept-Language."""
    return i18n.language_of(
        request.cookies.get(LANGUAGE_COOKIE), [tag for tag, _q in request.accept_languages]
    )


def next_page(target: str | None) -> str:
    """A path on this site to go back to; anything else (another site) means the overview."""
    return urlargs.local_path(target) or url_for("dashboard.overview")


def posted(name: str) -> str | None:
    """A posted form field; a body that cannot be read (broken chunked framing) is a 400."""
    try:
        return request.form.get(name)
    except HTTPException:
        raise
    except Exception:  # gunicorn's ParseException kinds, a socket cut mid-body
        abort(400, _("The request could not be read."))


def zone() -> ZoneInfo:
    """The time zone the dashboard shows times in: times typed in filters are in it too."""
    return ZoneInfo(str(get_timezone()))
