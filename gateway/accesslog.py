"""gunicorn's access log with secrets taken out: ``logger_class`` in gunicorn.conf.py.

Admin routes take a gateway key by value (``/api/admin/apiKey/sk-…``,
``?apiKey=sk-…``), so a request line can hold one in full: every value the log
format can print has its gateway keys cut to their hint, and a credential header
(``{authorization}i``, ``{set-cookie}o`` in a custom format) prints as ``-``.

Only the atoms the format asks for are cleaned, when it asks: gunicorn makes one atom
per request header, response header and environ entry (about 60 a call), and cleaning
them all cost 115 µs a request, 29% of a JSON call's CPU with the access log on
(the default). Imported by gunicorn's master before gevent patches anything: only
``redact`` (pure) from the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gunicorn.glogging import Logger

from gateway import redact


class CleanAtoms(Mapping):
    """gunicorn's atoms as its ``SafeAtoms`` reads them (a header or environ name in any
    case, ``-`` for one there is none of, double quotes escaped), each cleaned of keys
    and credentials when read."""

    __slots__ = ("_raw", "_read")

    def __init__(self, atoms: Mapping) -> None:
        self._raw: Mapping = atoms._raw if isinstance(atoms, CleanAtoms) else atoms
        self._read: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        try:
            return self._read[name]
        except KeyError:
            pass
        key = name.lower() if name.startswith("{") else name
        value = _clean(key, self._raw[key]) if key in self._raw else "-"
        if isinstance(value, str):
            value = value.replace('"', '\\"')
        self._read[name] = value
        return value

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith("{"):
            name = name.lower()
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class RedactingLogger(Logger):
    """gunicorn's logger, whose access-log atoms never hold a gateway key or credential."""

    atoms_wrapper_class = CleanAtoms  # in place of gunicorn's SafeAtoms

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> Mapping:
        return CleanAtoms(super().atoms(resp, req, environ, request_time))


def _clean(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # {name}i, {name}o, {name}e: request and response headers, environ (HTTP_*).
    if name.startswith("{") and redact.credential_header(name[1:-2], value):
        return "-"
    return redact.keys_in(value)
