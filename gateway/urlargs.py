"""Values that arrive in URLs and forms: row ids, integers, pages, places to go back to,
and paths with a final slash or without.

Nothing here trusts its input. A row id is 1 to 2^63-1 in ASCII digits (Werkzeug's
``int`` converter takes any Unicode digit and any size, and SQLite cannot even bind
an integer past 2^63-1), so anything else in a path is simply not found. An integer
argument is ASCII digits with an optional minus sign, within bounds the caller names.
A redirect target must stay on this site, judged as a browser will read it.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint
from werkzeug.routing import BaseConverter, ValidationError

MAX_ID = 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,19}")
DECIMAL = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")  # what a form's number field sends
# What a browser strips from or reads into a URL: C0 controls, space and DEL (it drops
# tabs and newlines anywhere), and the backslash (it reads "\" as "/").
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x20\x7f\\]")


class AnySlash(Blueprint):
    """Routes that answer with or without a final slash, as NexusGate's server (Elysia,
    whose strictPath is off) does: ``/providers/`` is ``/providers``, ``/api/admin`` is
    ``/api/admin/``, ``/v1/chat/completions/`` is ``/v1/chat/completions`` (werkzeug
    would answer a 404, or an HTML redirect)."""

    def add_url_rule(self, rule: str, *args: Any, **options: Any) -> None:
        options.setdefault("strict_slashes", False)
        super().add_url_rule(rule, *args, **options)


class IdConverter(BaseConverter):
    """``<id:name>``: a row id, 1 to MAX_ID; anything else does not match (404)."""

    regex = r"[1-9][0-9]{0,18}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if number > MAX_ID:
            raise ValidationError()
        return number

    def to_url(self, value: int) -> str:
        return str(int(value))


def integer(text: str | None, low: int, high: int) -> int | None:
    """``text`` as an integer within ``low..high``, or None if it is not one."""
    if text is None or not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def local_path(target: str | None) -> str | None:
    """``target`` if it is a path on this site as a browser reads it, else None."""
    if not target or not target.startswith("/") or _UNSAFE_IN_PATH.search(target):
        return None
    if target.startswith("//"):  # scheme-relative: another host
        return None
    return target


def register(state: object) -> None:
    """Make ``<id:...>`` known to the app (``bp.record_once(urlargs.register)``)."""
    state.app.url_map.converters.setdefault("id", IdConverter)  # type: ignore[attr-defined]


class Pages:
    """Where one page of a table stands: ``page`` of ``pages``, rows ``first`` to ``last``.

    Mixed into the dataclasses behind the dashboard's pager, which hold ``page``,
    ``size`` and ``total``.
    """

    page: int
    size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def first(self) -> int:
        return min(self.total, (self.page - 1) * self.size + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.page * self.size)

    def turn_to(self, asked: str | None) -> None:
        """Go to the page a URL asks for, kept within 1..pages."""
        self.page = min(max(1, integer(asked, 1, MAX_ID) or 1), self.pages)
