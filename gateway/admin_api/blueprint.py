"""The admin API's blueprint: its guard, its refusals, and what every view reads.

``Authorization: Bearer $ADMIN_SUPER_SECRET`` (or ``x-api-key``) is checked before any
view runs; wrong secrets are throttled per client address (``LOGIN_ATTEMPTS`` per
``LOGIN_WINDOW``, shared by every instance through the limiter): past that, 429 with
Retry-After, right secret or not. A ``registry.Refused`` raised by any view is its
JSON error; a database that does not answer, a 503. A change PostgreSQL gave up for
another made at once (a deadlock, a serialization failure) is run again, twice at most,
then a 503 that says so, with Retry-After: 1; never an outage. Bodies are strict JSON objects
(``jsonio``), query integers ASCII digits within bounds, and NUL in a path or an
argument is refused before any query. Names in a path (system names, external ids,
limit identifiers) arrive decoded once, by Flask, and are used as they are: a name may
hold '%' sequences of its own.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from typing import Any

import gevent
from flask import Response, current_app, g, request

from gateway import auth, db, forwarded, jsonio, registry, urlargs
from gateway.limiter import limiter

log = logging.getLogger(__name__)

MAX_PAGE = 1000


class _Blueprint(urlargs.AnySlash):
    """Every view run again when PostgreSQL gave its transaction up (``_run_again``)."""

    def add_url_rule(
        self, rule: str, endpoint: str | None = None, view_func: Any = None, **opts: Any
    ) -> None:
        if view_func is not None:
            view_func = _run_again(view_func)
        super().add_url_rule(rule, endpoint, view_func, **opts)


def _run_again(view: Callable[..., Response]) -> Callable[..., Response]:
    """``view``, run again when its transaction was a deadlock's victim (or failed to
    serialize): PostgreSQL rolled it back whole, and the other one has likely finished.
    The views write in one transaction, or in steps each safe to make twice."""

    @functools.wraps(view)
    def run(**kwargs: Any) -> Response:
        for attempt in range(db.CONFLICT_RETRIES):
            try:
                return view(**kwargs)
            except db.Conflict as exc:
                if not exc.retryable:
                    raise
                log.info(
                    "admin API: %s %s: %s; run again", request.method, request.path, exc.reason
                )
                gevent.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # apart from the other
        return view(**kwargs)

    return run


bp = _Blueprint("admin_api", __name__, url_prefix="/api/admin")
bp.record_once(urlargs.register)


@bp.errorhandler(registry.Refused)
def _admin_error(exc: registry.Refused) -> Response:
    return jsonio.response({"error": exc.message}, exc.status)


def _database_away(exc: Exception) -> Response:
    """The database does not answer: the admin API has nothing to serve without it."""
    log.warning("admin API: the database does not answer (%s)", exc)
    answer = jsonio.response({"error": "The database does not answer; try again later"}, 503)
    answer.headers["Retry-After"] = str(db.AWAY_RETRY_AFTER)
    return answer


for _away in db.AWAY:
    bp.register_error_handler(_away, _database_away)


@bp.errorhandler(db.Conflict)
def _conflicted(exc: db.Conflict) -> Response:
    """Given up for another change made at once: the database answers, no outage."""
    log.warning(
        "admin API: %s %s given up by the database (%s)", request.method, request.path, exc.reason
    )
    answer = jsonio.response(
        {"error": f"The change collided with another made at once ({exc.reason}); try again"},
        503,
    )
    answer.headers["Retry-After"] = "1" if exc.retryable else str(db.AWAY_RETRY_AFTER)
    return answer


@bp.before_request
def _require_admin() -> Response | None:
    db.connect()
    address = forwarded.address_of(request, current_app.config["TRUSTED_PROXIES"])
    wait = limiter.attempt(address)
    if wait:
        answer = jsonio.response(
            {"error": f"Too many wrong admin secrets from {address}: retry in {wait} s"}, 429
        )
        answer.headers["Retry-After"] = str(wait)
        return answer
    if not auth.is_admin(request.headers, auth.admin_secret(current_app)):
        return jsonio.response({"error": "Invalid admin secret"}, 401)
    limiter.succeeded(address)  # only wrong secrets count against an address
    return None


@bp.before_request
def _refuse_nul() -> None:
    # PostgreSQL refuses NUL in text: it must not reach a query from a path or an argument.
    if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
        raise registry.Refused(400, "The URL must not contain NUL characters")


@bp.get("/")
def index() -> Response:
    return jsonio.response(True)


@bp.get("/rev")
def revision() -> Response:
    """The commit this gateway runs (NexusGate's dashboard shows it beside its own)."""
    return jsonio.response({"version": str(current_app.config["COMMIT_SHA"])})


def body() -> dict[str, Any]:
    """The body as a JSON object (an empty body is ``{}``), strictly parsed."""
    try:
        if "admin_body" not in g:  # read once: a view run again (``_run_again``) reads it again
            g.admin_body = jsonio.read(request)
        found = jsonio.loads(g.admin_body or b"{}")
    except jsonio.Unreadable as exc:
        raise registry.Refused(400, str(exc)) from exc
    if not isinstance(found, dict):
        raise registry.Refused(400, "Request body must be a JSON object")
    return found


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def flag(name: str) -> bool:
    """A query argument read as a yes/no flag (``true``, ``1``, ``yes`` or their noes;
    absent is no); anything else is a 400, not a quiet no."""
    value = _FLAGS.get(request.args.get(name, "").lower())
    if value is None:
        raise registry.Refused(400, f"{name} must be true or false")
    return value


def int_arg(name: str, default: int | None, low: int, high: int) -> Any:
    """A query argument as an integer within ``low..high``; ``default`` when absent."""
    text = request.args.get(name)
    if text is None or text == "":
        return default
    value = urlargs.integer(text, low, high)
    if value is None:
        raise registry.Refused(400, f"{name} must be an integer from {low} to {high}")
    return value
