"""The dashboard's login state: a signed cookie session, and a CSRF token inside it.

Every worker and every instance must verify the cookies the others signed, with no
setup: the signing key is ``SECRET_KEY`` (``GATEWAY_SECRET_KEY``) when set, else an
HMAC of the admin secret, which they all share. Changing the admin secret therefore
signs everyone out. The key is derived when a session is first opened, not at start,
because a generated admin secret lives in the database.

API paths (``/v1``, ``/api``, ``/healthz``, ``/metrics``) never open a session, so the
public API never reaches the database for the key. The CSRF token is random per session; every form posts it back and a POST without the
matching token is refused. Logging in starts a fresh session (new token), so a token
planted before login is worth nothing after it. A signed-in session is also a row in
``dashboard_sessions``: logging out deletes it, so a saved cookie is worthless after.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

from flask import Flask, current_app, session
from flask.sessions import NullSession, SecureCookieSessionInterface

from gateway import auth
from gateway.db import database
from gateway.models import DashboardSession

log = logging.getLogger(__name__)

_PURPOSE = b"gateway dashboard session v1"


def signing_key(app: Flask) -> str:
    """SECRET_KEY if configured, else a key derived from the admin secret."""
    if app.config.get("SECRET_KEY"):
        return app.config["SECRET_KEY"]
    with database.connection_context():  # before the request's own connection opens
        secret = auth.admin_secret(app)
    return hmac.new(secret.encode(), _PURPOSE, hashlib.sha256).hexdigest()


# Paths that never have a session: the public API must not touch the database (the
# key may need it), and the admin API authenticates by bearer.
SESSIONLESS = ("/v1", "/healthz", "/metrics", "/api", "/static")


def sessionless(path: str) -> bool:
    """True for paths served without a session."""
    return any(path == p or path.startswith(p + "/") for p in SESSIONLESS)


class DerivedKeySessions(SecureCookieSessionInterface):
    """Flask's signed cookie sessions, keyed by ``signing_key`` on first use."""

    def open_session(self, app: Flask, request: Any) -> Any:
        if sessionless(request.path):
            return None  # Flask gives these requests a null session
        if not app.secret_key:
            try:
                app.secret_key = signing_key(app)
            except Exception:  # a database outage must not break the API, only the dashboard
                log.exception("dashboard: cannot derive the session key yet")
                return None
        return super().open_session(app, request)


def log_in() -> None:
    """Start a fresh, signed-in session."""
    session.clear()
    session["admin"] = DashboardSession.open(current_app.permanent_session_lifetime)
    session["csrf"] = secrets.token_urlsafe(32)


def log_out() -> None:
    """End this session for good and forget everything but the language cookie."""
    DashboardSession.close(session.get("admin"))
    session.clear()


def logged_in() -> bool:
    """True when this session signed in with the admin secret and has not logged out."""
    return DashboardSession.alive(session.get("admin"), current_app.permanent_session_lifetime)


def csrf_token() -> str:
    """This session's CSRF token, created on first use (the login form needs one too).

    Empty without a session (its key could not be read: the database is away): the
    error page saying so has the language form too, and no form is taken meanwhile.
    """
    if isinstance(session, NullSession):
        return ""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_valid(presented: str | None) -> bool:
    """True when a form posted back this session's token."""
    expected = session.get("csrf")
    return bool(expected and presented) and hmac.compare_digest(
        presented.encode(), expected.encode()
    )


def init_app(app: Flask) -> None:
    """Sign sessions with the derived key; keep the cookie away from other sites' requests."""
    app.session_interface = DerivedKeySessions()
    # Flask's defaults are None and "session": Lax keeps the cookie off cross-site posts,
    # and our own name keeps it apart from other apps on the same host (cookies ignore ports).
    if app.config["SESSION_COOKIE_SAMESITE"] is None:
        app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    if app.config["SESSION_COOKIE_NAME"] == "session":
        app.config["SESSION_COOKIE_NAME"] = "gateway_session"
    app.jinja_env.globals["csrf_token"] = csrf_token
