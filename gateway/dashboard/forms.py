"""Posted dashboard forms as admin API bodies, for the registry's own checks to judge."""

from __future__ import annotations

from typing import Any

from flask import abort, request

from gateway import urlargs


def live(table: Any, row_id: int) -> Any:
    """The live (not deleted) row of ``table`` a form is about; 404 if there is none."""
    row = table.active().where(table.id == row_id).first()
    if row is None:
        abort(404)
    return row


def form_body(fields: dict[str, type], clear: tuple[str, ...] = ()) -> dict[str, Any]:
    """The posted form as an admin API body, for the API's own checks to judge."""
    # Numbers are parsed; a blank field is left out, or None where it clears a value.
    body: dict[str, Any] = {}
    for name, kind in fields.items():
        raw = request.form.get(name, "").strip()
        if kind is bool:
            body[name] = name in request.form
        elif raw:
            body[name] = number(raw, kind) if kind in (int, float) else raw
        elif name in clear:
            body[name] = None
    return body


def number(raw: str, kind: type) -> Any:
    """ASCII digits as a number of ``kind``; anything else is left as text for the check."""
    value = urlargs.integer(raw, -urlargs.MAX_ID, urlargs.MAX_ID) if kind is int else None
    if kind is float and urlargs.DECIMAL.fullmatch(raw):
        value = float(raw)
    return raw if value is None else value  # text: the admin API's check names the field
