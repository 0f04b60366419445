"""An LLM API gateway that records every call exactly once, truthfully.

Only ``wsgi.py`` builds an app at import time. Nothing here imports peewee at module
level: gunicorn imports this package (for the worker class) in its master, before
gevent patches threading, and peewee must be imported after that (see ``db.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from gateway.config import DEFAULTS, INSTANCE, ROOT, UNPREFIXED, problems


class SettingsError(ValueError):
    """A knob's value is not what it may be; the message names each, one a line."""


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then GATEWAY_* and the unprefixed names, then ``config``;
    a value a setting cannot take raises ``SettingsError``, naming each."""
    app = Flask(
        __name__,
        instance_path=str(INSTANCE),
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("GATEWAY")
    for name in ("DATABASE_URL", "REDIS_URL", "ADMIN_SUPER_SECRET", "COMMIT_SHA"):
        if os.environ.get(name):
            app.config[name] = os.environ[name]
    if "ALLOWED_ORIGINS" in os.environ:  # empty: no origin, not the default "*"
        app.config["ALLOWED_ORIGINS"] = os.environ["ALLOWED_ORIGINS"]
    if config:
        app.config.update(config)
    # PORT and HOST are gunicorn.conf.py's, from variables without the prefix.
    if wrong := problems({k: v for k, v in app.config.items() if k not in UNPREFIXED}):
        raise SettingsError("\n".join(wrong))
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(ROOT / "translations"))
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_BODY_BYTES"])
    logging.basicConfig(
        level=app.config["LOG_LEVEL"].upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )

    from werkzeug.exceptions import HTTPException

    from gateway import (
        admin_api,
        auth,
        calls,
        cli,
        cors,
        dashboard,
        db,
        limiter,
        model_limits,
        proxy,
        recorder,
        retention,
        service,
        snapshot,
        spend,
        srvlog,
        sweeper,
        telemetry,
        upstream,
        vault,
    )
    from gateway.errors import GatewayError

    db.init_app(app)
    vault.vault.init_app(app)
    upstream.upstream.init_app(app)
    recorder.recorder.init_app(app)
    telemetry.telemetry.init_app(app)
    sweeper.sweeper.init_app(app)
    retention.retention.init_app(app)
    calls.calls.init_app(app)
    limiter.limiter.init_app(app)
    spend.seeder.init_app(app)
    snapshot.refresher.init_app(app)
    model_limits.model_limits.init_app(app)
    # A key or per-model limit changed in another worker or instance: forget it here.
    limiter.limiter.on_key_change(auth.keys.changed)
    limiter.limiter.on_key_change(model_limits.model_limits.changed)
    auth.keys.catch_up = limiter.limiter.catch_up
    srvlog.init_app(app)
    cli.init_app(app)
    dashboard.init_app(app)

    # A path with "//" is a 404 like any unknown path, never a redirect: werkzeug's
    # merge_slashes would answer /api/admin/apiKey//usage with an HTML 308 to a
    # different route (an API answers JSON, and a client must not be sent elsewhere).
    app.url_map.merge_slashes = False
    app.register_blueprint(proxy.bp)
    app.register_blueprint(service.bp)
    app.register_blueprint(admin_api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_error_handler(GatewayError, proxy.render_error)

    def _http_error(exc: HTTPException) -> Any:
        """The APIs' errors in their shape (``proxy``); any other path's, a page."""
        answer = proxy.render_http_error(exc)
        return dashboard.unrouted(exc) if answer is exc else answer

    app.register_error_handler(HTTPException, _http_error)
    # The /v1 call routes are served in front of Flask's per-request machinery (issue 11);
    # cross-origin calls to the APIs are allowed in front of both.
    routes = proxy.CallRoutes(app)
    app.wsgi_app = cors.Cors(routes, app.config["ALLOWED_ORIGINS"])  # type: ignore[method-assign]
    return app
