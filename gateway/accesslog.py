"""gunicorn's access log with secrets taken out: ``logger_class`` in gunicorn.conf.py.

Admin routes take a gateway key by value (``/api/admin/apiKey/sk-…``,
``?apiKey=sk-…``), so a request line can hold one in full: every value the log
format can print has its gateway keys cut to their hint, and a credential header
(``{authorization}i``, ``{set-cookie}o`` in a custom format) prints as ``-``.

Only the atoms the format reads are made and cleaned, when it reads them: gunicorn
makes one per request header, response header and environ entry (about 60 a call,
where its default format prints 9), and making and cleaning them all took 137 µs a
request in a tight loop (gunicorn's own logger 44, this one 24); with the access log on
(the default) a JSON call cost 0.18 ms more CPU than with it off. Imported by
gunicorn's master before gevent patches anything: only ``redact`` (pure) from the
gateway, and ``logstreams`` once the master starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gunicorn.glogging import Logger

from gateway import redact


class CleanAtoms(Mapping):
    """The atoms of one request's access-log line, as gunicorn's ``SafeAtoms`` reads them
    (a header or environ name in any case, ``-`` for one there is none of, double quotes
    escaped), each made and cleaned of keys and credentials when the format reads it.

    The atoms of gunicorn's default format, and a header's or an environ entry's, are
    made here as gunicorn's ``Logger.atoms`` makes them; any other (``%(D)s``...) comes
    from ``Logger.atoms`` itself, made whole once.
    """

    __slots__ = ("_environ", "_logger", "_made", "_read", "_req", "_resp", "_time")

    def __init__(self, logger: Logger, resp: Any, req: Any, environ: dict, request_time: Any):
        self._logger, self._resp, self._req = logger, resp, req
        self._environ, self._time = environ, request_time
        self._made: dict | None = None  # Logger.atoms, once an atom not made here is read
        self._read: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        try:
            return self._read[name]
        except KeyError:
            pass
        key = name.lower() if name.startswith("{") else name
        value = self._atom(key)
        value = "-" if value is _NONE else _clean(key, value)
        if isinstance(value, str):
            value = value.replace('"', '\\"')
        self._read[name] = value
        return value

    def _atom(self, key: str) -> Any:
        """Atom ``key`` as ``Logger.atoms`` makes it, or ``_NONE``."""
        environ = self._environ
        if key.startswith("{") and key[-2:-1] == "}":
            wanted, kind = key[1:-2], key[-1]
            if kind == "i":
                headers = getattr(self._req, "headers", self._req)
                return _last(headers, wanted)
            if kind == "o":
                return _last(self._resp.headers, wanted)
            if kind == "e":
                return _last(environ, wanted)
        simple = _SIMPLE.get(key)
        if simple is not None:
            return simple(self, environ)
        return self._every().get(key, _NONE)

    def _every(self) -> dict:
        """Every atom, as ``Logger.atoms`` makes them (made once)."""
        if self._made is None:
            self._made = Logger.atoms(
                self._logger, self._resp, self._req, self._environ, self._time
            )
        return self._made

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith("{"):
            name = name.lower()
        return name in self._every()

    def __iter__(self) -> Iterator[str]:
        return iter(self._every())

    def __len__(self) -> int:
        return len(self._every())

    def __bool__(self) -> bool:  # logging asks, formatting a record: not a reason to make all
        return True


_NONE = object()  # no such atom: the line shows "-"


def _last(pairs: Any, wanted: str) -> Any:
    """The value of the last of ``pairs`` (a mapping or (name, value) pairs) whose name,
    lowercased, is ``wanted``: what a dict of them keyed by lowercased name holds."""
    found = _NONE
    for name, value in pairs.items() if hasattr(pairs, "items") else pairs:
        if name.lower() == wanted:
            found = value
    return found


def _status(atoms: CleanAtoms, environ: dict) -> Any:
    status = atoms._resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _sent(atoms: CleanAtoms, environ: dict) -> Any:
    sent = getattr(atoms._resp, "sent", None)
    return (sent is not None and str(sent)) or "-"


# gunicorn's default format's atoms, as Logger.atoms makes them.
_SIMPLE = {
    "h": lambda atoms, environ: environ.get("REMOTE_ADDR", "-"),
    "l": lambda atoms, environ: "-",
    "u": lambda atoms, environ: atoms._logger._get_user(environ) or "-",
    "t": lambda atoms, environ: atoms._logger.now(),
    "r": lambda atoms, environ: (
        f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}"
    ),
    "s": _status,
    "b": _sent,
    "f": lambda atoms, environ: environ.get("HTTP_REFERER", "-"),
    "a": lambda atoms, environ: environ.get("HTTP_USER_AGENT", "-"),
}


class RedactingLogger(Logger):
    """gunicorn's logger, whose access-log atoms never hold a gateway key or credential,
    and whose lines in the master never wait for a slow reader (``logstreams``)."""

    def never_wait_for_readers(self, backlog: int) -> None:
        """From now on this process's log lines never wait for a slow reader of stdout
        or stderr, up to ``backlog`` bytes each (``logstreams``): gunicorn.conf.py's
        ``on_starting``, in the master. A reload's new handlers write to ``sys.stdout``
        and ``sys.stderr``, outlets by then."""
        from gateway import logstreams

        logstreams.install(backlog)

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> Mapping:
        return CleanAtoms(self, resp, req, environ, request_time)

    @staticmethod
    def atoms_wrapper_class(atoms: Mapping) -> Mapping:  # in place of gunicorn's SafeAtoms
        return atoms


def _clean(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # {name}i, {name}o, {name}e: request and response headers, environ (HTTP_*).
    if name.startswith("{") and redact.credential_header(name[1:-2], value):
        return "-"
    return redact.keys_in(value)
