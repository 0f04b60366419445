"""Sessions: the public and admin APIs never open one, so they never reach the database for it."""

from __future__ import annotations

import gevent
import pytest

from gateway.db import database
from gateway.sessions import sessionless
from tests.servers import ADMIN_SECRET


@pytest.fixture
def connects(app, monkeypatch: pytest.MonkeyPatch) -> list[str]:  # type: ignore[no-untyped-def]
    """Connections the request itself opens (background greenlets are not counted)."""
    me = gevent.getcurrent()
    opened: list[str] = []
    real = database.obj.connect

    def connect(*args: object, **kwargs: object) -> object:
        if gevent.getcurrent() is me:
            opened.append("connect")
        return real(*args, **kwargs)

    monkeypatch.setattr(database.obj, "connect", connect)
    return opened


def test_api_paths_open_no_session_and_no_connection(app, client, connects) -> None:  # type: ignore[no-untyped-def]
    """Defect 5: deriving the session key reached the database on every request."""
    assert not app.config.get("SECRET_KEY")
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/nope").status_code == 404
    assert connects == []
    assert not app.secret_key, "the session key was derived for an API request"
    # The dashboard still has its session (and reads the database).
    assert client.get("/login").status_code == 200
    assert app.secret_key and connects


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1", True),
        ("/v1/chat/completions", True),
        ("/healthz", True),
        ("/metrics", True),
        ("/api/admin/apiKey", True),
        ("/api/usage", True),
        ("/", False),
        ("/login", False),
        ("/v1beta", False),
        ("/apis", False),
        ("/requests/1", False),
    ],
)
def test_which_paths_are_sessionless(path: str, expected: bool) -> None:
    assert sessionless(path) is expected


def test_the_admin_api_works_without_a_session(client) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    assert client.get("/api/admin/", headers=headers).get_json() is True
    assert "Set-Cookie" not in client.get("/api/admin/", headers=headers).headers
