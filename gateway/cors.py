"""Cross-origin calls to the APIs (CORS), as NexusGate allows them (``ALLOWED_ORIGINS``).

A browser app on another origin may call ``/v1`` and ``/api``: they authenticate by a key
or a bearer in a header, never by a cookie, so no credentials are allowed across
origins, and the dashboard (a cookie session) stays same-origin. ``ALLOWED_ORIGINS`` is
``*`` (NexusGate's default: any origin), a comma-separated list of origins
(``https://app.example.com``), or empty (no cross-origin calls). A preflight (``OPTIONS``
with ``Access-Control-Request-Method``) is answered here, 204, reaching no view, no limit
and no record; an answer to an allowed origin carries ``Access-Control-Allow-Origin`` and
exposes the headers a client reads (the rate limits, ``Retry-After``). A request without
an ``Origin`` header (every SDK outside a browser) passes untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

APIS = ("/v1/", "/api/")
METHODS = "GET, POST, PUT, DELETE, OPTIONS"
EXPOSED = ", ".join(
    [
        *(f"X-RateLimit-{w}-{k}" for k in ("RPM", "TPM") for w in ("Limit", "Remaining")),
        "Retry-After",
    ]
)
VARY = ("Vary", "Origin")
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer
_HEADER_NAMES = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 tokens


class Cors:
    """WSGI middleware: CORS headers for allowed origins on the API paths."""

    def __init__(self, app: Callable, allowed: str | None) -> None:
        self.app = app
        origins = [_normal(o) for o in (allowed or "").split(",")]
        self.any = "*" in origins
        self.origins = frozenset(o for o in origins if o and o != "*")

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or not environ.get("PATH_INFO", "").startswith(APIS):
            return self.app(environ, start_response)
        allow = self.allow(origin)
        if allow is None:  # not allowed (a list of origins): the browser keeps the answer
            # Answered alike but for the header: a cache in between must not give a refused
            # origin's answer to an allowed one.
            return self.app(environ, _adding(start_response, [VARY]))
        headers = [("Access-Control-Allow-Origin", allow)]
        if allow != "*":
            headers.append(VARY)
        if environ["REQUEST_METHOD"] == "OPTIONS" and environ.get(
            "HTTP_ACCESS_CONTROL_REQUEST_METHOD"
        ):
            asked = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
            headers += [
                ("Access-Control-Allow-Methods", METHODS),
                ("Access-Control-Allow-Headers", ", ".join(_HEADER_NAMES.findall(asked))),
                ("Access-Control-Max-Age", MAX_AGE),
                ("Content-Length", "0"),
            ]
            start_response("204 No Content", headers)
            return []
        headers.append(("Access-Control-Expose-Headers", EXPOSED))
        return self.app(environ, _adding(start_response, headers))

    def allow(self, origin: str) -> str | None:
        """What ``Access-Control-Allow-Origin`` says to ``origin``; None if not allowed."""
        if self.any:
            return "*"
        return origin if _normal(origin) in self.origins else None


def _adding(start_response: Callable, headers: list[tuple[str, str]]) -> Callable:
    """``start_response`` with ``headers`` after the app's own."""

    def starting(status: str, sent: list, exc_info: Any = None) -> Any:
        return start_response(status, [*sent, *headers], exc_info)

    return starting


def _normal(origin: str) -> str:
    """An origin as browsers send it: scheme and host in lower case, no default port, no
    trailing slash (``HTTPS://App.example.com:443/`` is ``https://app.example.com``)."""
    origin = origin.strip().rstrip("/").lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin
