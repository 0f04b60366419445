"""Cross-origin calls to the APIs: what a browser is told, and what it is not.

The app with its default (``*``, NexusGate's) through Flask's test client, then the
middleware alone around a stand-in app for a list of origins and hostile preflights.
``test_browser`` has a real browser make a cross-origin call.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cors import Cors
from tests.conftest import ADMIN_SECRET, _test_app

APP = "https://app.example.com"
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
TOKEN = set(string.ascii_letters + string.digits + "!#$%&'*+.^_`|~-")  # a header name's


def test_an_api_answer_to_another_origin_says_it_may_be_read(client) -> None:  # type: ignore[no-untyped-def]
    answer = client.post(CHAT, json=BODY, headers={"Origin": APP, "Authorization": "Bearer x"})
    assert answer.status_code == 401  # errors too: the app must read why
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    exposed = answer.headers["Access-Control-Expose-Headers"]
    assert "X-RateLimit-Remaining-RPM" in exposed and "Retry-After" in exposed
    admin = client.get("/api/admin/apiKey", headers={"Origin": APP, **ADMIN})
    assert admin.status_code == 200 and admin.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in admin.headers  # a header, never a cookie


def test_a_preflight_is_answered_here_and_goes_nowhere(client) -> None:  # type: ignore[no-untyped-def]
    asked = "authorization, content-type, x-stainless-os"
    preflight = client.options(
        CHAT,
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert preflight.status_code == 204 and preflight.data == b""
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == asked
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    listed = client.get("/api/admin/completions", headers=ADMIN).get_json()
    assert listed["total"] == 0  # not a call: nothing recorded


def test_the_dashboard_and_origin_less_requests_get_no_cors_headers(client) -> None:  # type: ignore[no-untyped-def]
    assert (
        "Access-Control-Allow-Origin" not in client.get("/login", headers={"Origin": APP}).headers
    )
    assert "Access-Control-Allow-Origin" not in client.post(CHAT, json=BODY).headers


def test_allowed_origins_set_empty_allows_no_origin(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path
) -> None:
    """``ALLOWED_ORIGINS=`` is "none", as the README says: an empty value was taken for
    an unset one, and every origin was allowed (``*``)."""
    monkeypatch.setenv("ALLOWED_ORIGINS", "")
    with _test_app(database_url, tmp_path) as app:
        answer = app.test_client().post(CHAT, json=BODY, headers={"Origin": APP})
    assert answer.status_code == 401
    assert "Access-Control-Allow-Origin" not in answer.headers


def _app(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("405 METHOD NOT ALLOWED", [("Content-Type", "text/plain")])
    return [b"stand-in"]


def _ask(cors: Cors, origin: str, method: str = "GET", **headers: str) -> tuple[str, dict]:
    seen: dict = {}

    def start_response(status, sent, exc_info=None):  # type: ignore[no-untyped-def]
        seen.update(status=status, headers=dict(sent))

    environ = {"REQUEST_METHOD": method, "PATH_INFO": "/v1/models", "HTTP_ORIGIN": origin}
    environ.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
    b"".join(cors(environ, start_response))
    return seen["status"], seen["headers"]


def test_a_list_of_origins_allows_those_only_and_says_it_varies() -> None:
    cors = Cors(_app, f"{APP}, https://b.example/")
    status, headers = _ask(cors, "https://b.example")
    assert headers["Access-Control-Allow-Origin"] == "https://b.example"
    assert headers["Vary"] == "Origin"
    status, headers = _ask(
        cors, "https://evil.example", "OPTIONS", access_control_request_method="POST"
    )
    assert status.startswith("405") and "Access-Control-Allow-Origin" not in headers
    assert headers["Vary"] == "Origin"  # a cache must not give this answer to an allowed one
    # Configured as a person types it, matched as a browser sends it, echoed as sent.
    typed = Cors(_app, "HTTPS://App.Example.com:443/, http://localhost:80")
    assert _ask(typed, APP)[1]["Access-Control-Allow-Origin"] == APP
    assert _ask(typed, "http://localhost")[1]["Access-Control-Allow-Origin"] == "http://localhost"
    assert "Access-Control-Allow-Origin" not in _ask(typed, "http://localhost:8080")[1]
    for off in ("", None):
        status, headers = _ask(Cors(_app, off), APP)
        assert "Access-Control-Allow-Origin" not in headers


@given(st.text())
def test_a_preflight_s_asked_headers_come_back_as_header_names_only(asked: str) -> None:
    status, headers = _ask(
        Cors(_app, "*"),
        APP,
        "OPTIONS",
        access_control_request_method="POST",
        access_control_request_headers=asked,
    )
    assert status == "204 No Content"
    assert set(headers["Access-Control-Allow-Headers"]) <= TOKEN | {",", " "}
