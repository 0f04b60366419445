"""The access log never holds a full gateway key or a credential header."""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace

import pytest
import requests
from gunicorn.config import Config
from gunicorn.glogging import Logger, SafeAtoms
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accesslog import RedactingLogger, _clean
from tests.fuzz_support import FUZZ
from tests.servers import ADMIN_SECRET

KEY = "sk-" + "0123456789abcdef" * 2
HINT = "sk-0123…cdef"


def test_every_atom_is_redacted() -> None:
    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set(
        "access_log_format",
        "%(r)s %(U)s %(q)s %(f)s %({authorization}i)s %({x-api-key}i)s %({x-note}i)s",
    )
    logger = RedactingLogger(cfg)
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": f"/api/admin/apiKey/{KEY}?apiKey={KEY}",
        "PATH_INFO": f"/api/admin/apiKey/{KEY}",
        "QUERY_STRING": f"apiKey={KEY}",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_REFERER": f"http://gw/?k={KEY}",
    }
    request = SimpleNamespace(
        headers=[
            ("AUTHORIZATION", f"Bearer {KEY}"),
            ("X-API-KEY", "the-admin-secret"),
            ("X-NOTE", KEY),
        ]
    )
    response = SimpleNamespace(status="200 OK", headers=[], sent=10)
    atoms = logger.atoms(response, request, environ, datetime.timedelta(seconds=1))
    line = cfg.access_log_format % logger.atoms_wrapper_class(atoms)
    assert KEY not in line and "the-admin-secret" not in line
    assert line == (
        f"GET /api/admin/apiKey/{HINT}?apiKey={HINT} HTTP/1.1 /api/admin/apiKey/{HINT} "
        f"apiKey={HINT} http://gw/?k={HINT} - - {HINT}"
    )


_HEADER = st.sampled_from(["Authorization", "X-Api-Key", "X-Note", "Cookie", "Host", "Referer"])
_ENVIRON = st.sampled_from(["HTTP_AUTHORIZATION", "HTTP_HOST", "REMOTE_ADDR", "HTTP_REFERER",
                            "HTTP_USER_AGENT", "PATH_INFO", "QUERY_STRING", "http_host"])  # fmt: skip
_TEXT = st.one_of(
    st.text(max_size=12),
    st.builds(lambda a, b: f"{a}{KEY}{b}", st.text(max_size=4), st.text(max_size=4)),
    st.just(f'Bearer {KEY} "quoted"'),
    st.just("Basic dXNlcjpwYXNz"),  # user:pass, the "u" atom
)
_CASED = st.one_of(st.just(str), st.just(str.lower), st.just(str.upper))
# What a format may ask for: gunicorn's atoms, headers and environ entries in any case,
# names that are not there.
_ASKED = st.one_of(
    st.sampled_from(list("hlutrsmUqHbBfaTDMLp")),
    st.builds(
        lambda name, kind, case: case(f"{{{name}}}{kind}"),
        st.one_of(_HEADER, _ENVIRON),
        st.sampled_from("ioe"),
        _CASED,
    ),
    st.text(max_size=6),
)


@settings(FUZZ, max_examples=500)
@given(
    st.dictionaries(_ENVIRON, _TEXT),
    st.lists(st.tuples(st.builds(lambda n, c: c(n), _HEADER, _CASED), _TEXT), max_size=5),
    st.lists(st.tuples(_HEADER, _TEXT), max_size=3),
    st.one_of(st.none(), st.integers(min_value=0)),
    st.lists(_ASKED, max_size=8),
)
def test_atoms_made_when_read_read_as_gunicorns_all_cleaned_first(
    environ: dict, request_headers: list, response_headers: list, sent: int | None, asked: list
) -> None:
    """``CleanAtoms`` makes and cleans an atom when the format reads it; what it reads is
    what gunicorn's ``SafeAtoms`` read over gunicorn's atoms, all cleaned first (the way
    before)."""
    cfg = Config()
    cfg.set("accesslog", "-")
    logger = RedactingLogger(cfg)
    logger.now = lambda: "[05/Dec/2026:19:30:00 +0000]"  # type: ignore[method-assign]
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": f"/x?k={KEY}", "SERVER_PROTOCOL": "HTTP/1.1",
               **environ}  # fmt: skip
    request = SimpleNamespace(headers=request_headers)
    response = SimpleNamespace(status="200 OK", headers=response_headers, sent=sent)
    took = datetime.timedelta(seconds=1, microseconds=5)
    made = Logger.atoms(logger, response, request, environ, took)
    eager = SafeAtoms({name: _clean(name, value) for name, value in made.items()})
    lazy = logger.atoms_wrapper_class(logger.atoms(response, request, environ, took))
    for name in [*asked, *made]:
        assert lazy[name] == eager[name], name
        assert (name in lazy) == ((name.lower() if name[:1] == "{" else name) in made), name
    assert dict(lazy.items()) == {name: eager[name] for name in made}


@pytest.mark.server
def test_a_real_access_log_shows_hints_only(gateway_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_ACCESS_LOG="-")
    key = gw.api("POST", "/apiKey", json={"comment": "log"})["key"]
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    for path in (f"/api/admin/apiKey/{key}", f"/api/admin/apiKey/{key}/ratelimit",
                 f"/api/admin/usage?apiKey={key}", f"/v1/models?apiKey={key.upper()}"):  # fmt: skip
        requests.get(gw.url + path, headers={**admin, "Referer": f"{gw.url}/?k={key}"}, timeout=5)
    requests.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    log = gw.log()
    assert f"/api/admin/usage?apiKey={key[:7]}…{key[-4:]}" in log  # the access log is on
    assert key not in log and key.upper() not in log.upper()
    assert ADMIN_SECRET not in log
    logging.getLogger(__name__).info("access log checked: %d lines", log.count("\n"))
