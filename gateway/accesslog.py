"""gunicorn's access log with secrets taken out: ``logger_class`` in gunicorn.conf.py.

Admin routes take a gateway key by value (``/api/admin/apiKey/sk-…``,
``?apiKey=sk-…``), so a request line can hold one in full: every value the log
format can print has its gateway keys cut to their hint, and a credential header
(``{authorization}i``, ``{set-cookie}o`` in a custom format) prints as ``-``. Imported by gunicorn's
master before gevent patches anything: only ``redact`` (pure) from the gateway.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from gateway import redact


class RedactingLogger(Logger):
    """gunicorn's logger, whose access-log atoms never hold a gateway key or credential."""

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        return {
            name: _clean(name, value)
            for name, value in super().atoms(resp, req, environ, request_time).items()
        }


def _clean(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # {name}i, {name}o, {name}e: request and response headers, environ (HTTP_*).
    if name.startswith("{") and redact.credential_header(name[1:-2], value):
        return "-"
    return redact.keys_in(value)
