"""A /v1 call's request and answer as WSGI objects, lighter than Werkzeug's own.

``CallRequest`` is Werkzeug's request, limited to the app's ``MAX_CONTENT_LENGTH``,
carrying what its answer's headers need; ``Heads`` reads its headers straight off the
environ. ``Answer`` is a 200 answer as a WSGI app, and ``_Then`` runs what follows once
its body is written (a permit's payment). Each leaves out work Werkzeug does for every
request that a call never needs (issue 11). ``proxy``'s views make and return them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask
from werkzeug.wrappers import Request

from gateway import admission, auth


class CallRequest(Request):
    """A /v1 call's request: Werkzeug's, limited to the app's MAX_CONTENT_LENGTH, and what
    its answer's headers need (the caller once known, its permit once admitted).

    It does not put itself in its environ (``werkzeug.request``): the environ would hold
    the request and the request the environ, a cycle only the garbage collector frees,
    about 30 objects a call kept until its next pass (issue 11). Nothing reads it there.
    """

    def __init__(self, environ: dict[str, Any], app: Flask) -> None:
        super().__init__(environ, populate_request=False)
        self.app = app
        self.max_content_length = app.config["MAX_CONTENT_LENGTH"]
        self.caller: auth.Caller | None = None
        self.permit: admission.Permit | None = None
        self.heads = Heads(environ)


class Heads:
    """A request's headers by name, read straight from its WSGI environ: what
    Werkzeug's ``EnvironHeaders.get`` answers for a header other than the body's type
    and length, without its four calls and the name's conversion each time (the call
    views read six headers a call, issue 11). Only the views' own names are asked, so
    the names converted are kept."""

    __slots__ = ("_environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = _ENVIRON_KEYS[name] = "HTTP_" + name.upper().replace("-", "_")
        return self._environ.get(key, default)


_ENVIRON_KEYS: dict[str, str] = {}


class Answer:
    """A call's answer (200) as a WSGI app: the headers werkzeug's Response would send,
    without the work it does on the way for headers an answer never has (about 50 µs of
    a JSON call at one client, issue 11). A body of bytes gets its Content-Length; an
    iterator goes to the server as it is (it closes it)."""

    __slots__ = ("after", "body", "headers")

    def __init__(self, body: bytes | Iterator[bytes], headers: list[tuple[str, str]]) -> None:
        self.headers = [*headers]
        if isinstance(body, bytes):
            self.headers.append(("Content-Length", str(len(body))))
            body = [body]
        self.body: Iterable[bytes] = body
        self.after: Callable[[], None] | None = None  # run once the body is written

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        start_response("200 OK", self.headers)
        if self.after is None:
            return self.body
        return _Then(self.body, self.after)


class _Then:
    """A body, and what to run once the server has written it and closes it (after the
    body's own ``close``, even if that fails): Werkzeug's ``ClosingIterator`` for one
    callback, without a Python call for each piece (the server iterates the body's own
    iterator)."""

    __slots__ = ("_after", "_body")

    def __init__(self, body: Iterable[bytes], after: Callable[[], None]) -> None:
        self._body = body
        self._after = after

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._after()
