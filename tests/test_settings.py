"""The settings API (NexusGate HEAD's shape), its reserved keys, and the dashboard's reads of it."""

from __future__ import annotations

import re
import time
from collections import Counter

import gevent
import requests

from gateway import auth
from gateway.db import database
from gateway.models import Setting
from tests.dashboard_seed import seed
from tests.servers import ADMIN_SECRET, Gateway
from tests.test_dashboard import login, text

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


def call(client, method: str, path: str, **kwargs: object) -> tuple[int, object]:  # type: ignore[no-untyped-def]
    resp = client.open(f"/api/admin/settings{path}", method=method, headers=ADMIN, **kwargs)
    return resp.status_code, resp.get_json()


def test_settings_crud_with_json_values(client) -> None:  # type: ignore[no-untyped-def]
    assert call(client, "GET", "") == (200, [])
    for value in ({"a": [1, 2.5, None]}, "text", 7, True, None):
        status, row = call(client, "PUT", "/my.flag", json={"value": value})
        assert status == 200 and row["key"] == "my.flag" and row["value"] == value
        assert row["updatedAt"].endswith("Z")
    call(client, "PUT", "/alpha", json={"value": 1})
    status, rows = call(client, "GET", "")
    assert status == 200 and [r["key"] for r in rows] == ["alpha", "my.flag"]
    assert call(client, "GET", "/alpha")[1]["value"] == 1
    assert call(client, "DELETE", "/alpha")[1]["key"] == "alpha"
    assert call(client, "GET", "/alpha") == (404, {"error": "Setting not found"})
    assert call(client, "DELETE", "/alpha")[0] == 404


def test_bad_settings_are_400(client) -> None:  # type: ignore[no-untyped-def]
    assert call(client, "PUT", "/x", json={"nothing": 1}) == (400, {"error": "value is required"})
    assert call(client, "PUT", "/x", data=b"{bad", content_type="application/json")[0] == 400
    assert call(client, "PUT", "/" + "k" * 64, json={"value": 1})[0] == 400
    status, body = call(client, "PUT", "/x", json={"value": "v" * 70_000})
    assert status == 400 and "at most" in body["error"]
    assert call(client, "PUT", "/timezone", json={"value": "Mars/Olympus"})[0] == 400
    assert call(client, "PUT", "/timezone", json={"value": 8})[0] == 400
    assert call(client, "PUT", "/overviewRange", json={"value": "3h"})[0] == 400
    for value in ({"range": "1h"}, ["1h"]):  # unhashable: a 500 before
        assert call(client, "PUT", "/overviewRange", json={"value": value})[0] == 400
    assert call(client, "GET", "")[1] == []


def test_the_generated_admin_secret_is_never_readable_or_writable(app, client) -> None:  # type: ignore[no-untyped-def]
    with database.connection_context():
        secret = auth.ensure_generated_secret()
    key = auth.GENERATED_SECRET
    assert call(client, "GET", "")[1] == []
    assert call(client, "GET", f"/{key}")[0] == 404
    assert call(client, "PUT", f"/{key}", json={"value": "mine"})[0] == 403
    assert call(client, "DELETE", f"/{key}")[0] == 403
    everything = client.get("/api/admin/settings", headers=ADMIN).text
    assert secret not in everything
    with database.connection_context():
        assert Setting.read(key) == secret


def test_the_dashboard_uses_the_time_zone_and_overview_range_settings(client) -> None:  # type: ignore[no-untyped-def]
    with database.connection_context():
        seeded = seed()
    login(client)
    row = seeded.calls["aborted"]
    assert "Times in UTC" in text(client.get(f"/requests/{row.id}"))
    assert call(client, "PUT", "/timezone", json={"value": "Asia/Shanghai"})[0] == 200
    page = text(client.get(f"/requests/{row.id}"))
    assert "Times in Asia/Shanghai" in page
    local = row.created_at.hour + 8
    assert f"{(local - 1) % 12 + 1}:{row.created_at:%M:%S}" in page

    assert re.search(r'<option value="1h"\s+selected', client.get("/").text)
    assert call(client, "PUT", "/overviewRange", json={"value": "24h"})[0] == 200
    assert re.search(r'<option value="24h"\s+selected', client.get("/").text)
    assert re.search(r'<option value="5m"\s+selected', client.get("/?range=5m").text)


def _race_puts_and_deletes(gw: Gateway, seconds: float = 4.0) -> tuple[Counter, list[str]]:
    """One client putting a setting and two deleting it, at once, for ``seconds`` or
    until one is answered wrongly: the answers by method and status, and what was wrong."""
    url = f"{gw.url}/api/admin/settings/raced"
    answers: Counter = Counter()
    wrong: list[str] = []
    end = time.monotonic() + seconds

    def client(method: str) -> None:
        with requests.Session() as session:
            session.headers.update(ADMIN)
            while time.monotonic() < end and not wrong:
                resp = session.request(method, url, json={"value": 7})
                answers[method, resp.status_code] += 1
                if resp.status_code == 200:
                    body = resp.json()
                    if (body["key"], body["value"]) != ("raced", 7):
                        wrong.append(f"{method}: {body}")
                elif (method, resp.status_code) != ("DELETE", 404):
                    wrong.append(f"{method}: {resp.status_code} {resp.text}")

    gevent.joinall([gevent.spawn(client, m) for m in ("PUT", "DELETE", "DELETE")], raise_error=True)
    return answers, wrong


def test_a_put_racing_a_delete_of_its_setting_answers_what_it_wrote(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # The PUT wrote, a DELETE in another worker took the row, then the PUT read it back
    # for its answer: a 500 for a write that was made (44 of 235 PUTs in a probe).
    answers, wrong = _race_puts_and_deletes(gateway_factory(workers=2))
    assert not wrong, (wrong, answers)
    assert answers["PUT", 200] > 10 and answers["DELETE", 200] > 10, answers


def test_of_deletes_racing_for_one_setting_one_deleted_it(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # Both read the row, then both deleted it by id: two 200s for one row deleted (75
    # for 50 rows put in a probe). The loser must be told it found nothing, as a
    # DELETE after a DELETE is.
    answers, wrong = _race_puts_and_deletes(gateway_factory(workers=2))
    assert not wrong, (wrong, answers)
    assert answers["PUT", 200] >= answers["DELETE", 200] > 10, answers
