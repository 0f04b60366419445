"""The dashboard: server-rendered pages at ``/`` for operators, in English and Chinese.

One blueprint (``blueprint``: sign-in, language, the session and CSRF guard, security
headers) and a module per page group: ``overview``, ``records`` (Requests and
Embeddings: tables, details, downloads), ``logs``, ``keys``, ``providers`` (providers,
models, weights); ``forms`` turns a posted form into an admin API body. Writes go
through ``registry``, as the admin API's do, so a form and the JSON API change things
the same way and check the same rules. Pages work with JavaScript off; prompts and
answers are untrusted text (autoescaped, never ``|safe``, and a lone surrogate in them
shows as U+FFFD instead of breaking the page), and no page shows a secret in full but
the new key, once, in the answer that made it.
"""

from __future__ import annotations

from flask import Flask

from gateway import i18n, pricing, sessions, settings, transcript
from gateway.dashboard import keys, logs, overview, providers, records  # noqa: F401 - routes
from gateway.dashboard.blueprint import bp, locale, unrouted

__all__ = ["bp", "init_app", "unrouted"]


def init_app(app: Flask) -> None:
    """Languages, sessions, formats and the transcript helpers for the dashboard."""
    i18n.init_app(app, locale, settings.timezone)
    sessions.init_app(app)
    app.jinja_env.globals.update(
        parts=transcript.parts,
        tool_calls=transcript.tool_calls,
        preview=transcript.preview,
        image_src=transcript.image_src,
        current_language=locale,
    )
    app.jinja_env.filters["pretty"] = transcript.pretty
    app.jinja_env.filters["nano_usd"] = pricing.usd  # then |usd: a cost as the ledger sums it
    app.jinja_env.finalize = transcript.printable  # a lone surrogate must not make a 500
