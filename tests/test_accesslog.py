"""The access log never holds a full gateway key or a credential header."""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace

import pytest
import requests
from gunicorn.config import Config
from gunicorn.glogging import SafeAtoms
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accesslog import CleanAtoms, RedactingLogger, _clean
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


# gunicorn's atom names as its atoms() makes them (headers and environ lowercased), and
# as a format may ask for them (in any case, or ones that are not there).
_MADE = st.one_of(
    st.sampled_from(list("hlutrsmUqHbBfaTDMLp")),
    st.builds(
        lambda name, kind: f"{{{name}}}{kind}",
        st.sampled_from(["authorization", "x-api-key", "x-note", "cookie", "http_host", "raw"]),
        st.sampled_from("ioe"),
    ),
)
_ASKED = st.one_of(_MADE, _MADE.map(str.upper), st.text(max_size=6))
_VALUES = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=12),
    st.builds(lambda a, b: f"{a}{KEY}{b}", st.text(max_size=4), st.text(max_size=4)),
    st.just(f'Bearer {KEY} "quoted"'),
)


@settings(FUZZ, max_examples=500)
@given(st.dictionaries(_MADE, _VALUES), st.lists(_ASKED, max_size=8))
def test_atoms_cleaned_when_read_read_as_atoms_all_cleaned_first(raw: dict, asked: list) -> None:
    """``CleanAtoms`` cleans an atom when the format reads it; what it reads is what
    gunicorn's ``SafeAtoms`` read over atoms all cleaned first (the way before)."""
    eager = SafeAtoms({name: _clean(name, value) for name, value in raw.items()})
    lazy = CleanAtoms(raw)
    for name in [*asked, *raw]:
        assert lazy[name] == eager[name], name
        assert (name in lazy) == ((name.lower() if name[:1] == "{" else name) in raw), name
    assert dict(lazy.items()) == {name: eager[name] for name in raw}


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
