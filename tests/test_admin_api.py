"""The admin JSON API: NexusGate's paths and fields, validation, secrets never in full."""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway import redact
from gateway.callrows import snapshot
from gateway.config import ROOT
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion, Embedding, utcnow
from gateway.recorder import write_rows
from tests.conftest import _test_app
from tests.servers import ADMIN_SECRET, away, pg_lock_awaited, unreachable, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


@pytest.fixture
def admin(client):  # type: ignore[no-untyped-def]
    """Call the admin API; return (status, json)."""

    def call(method: str, path: str, **kwargs: object) -> tuple[int, object]:
        resp = client.open(f"/api/admin{path}", method=method, headers=ADMIN, **kwargs)
        return resp.status_code, None if resp.status_code == 204 else resp.get_json()

    return call


def provider(admin, **fields: object) -> dict:  # type: ignore[no-untyped-def]
    body = {
        "name": "p1",
        "type": "openai",
        "baseUrl": "https://api.example.com/v1",
        "apiKey": "sk-provider-secret-1234",
        **fields,
    }
    status, data = admin("POST", "/providers", json=body)
    assert status == 200, data
    return data


def test_the_admin_secret_is_required(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/admin/").status_code == 401
    assert client.get("/api/admin/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/admin/", headers={"x-api-key": ADMIN_SECRET}).get_json() is True
    assert client.get("/api/admin/", headers=ADMIN).get_json() is True


def test_rev_answers_the_commit_it_runs_unknown_by_default(admin, client) -> None:  # type: ignore[no-untyped-def]
    # NexusGate's dashboard shows the backend's commit from here, in its version footer.
    assert admin("GET", "/rev") == (200, {"version": "unknown"})
    assert client.get("/api/admin/rev").status_code == 401


def test_rev_reads_commit_sha_as_text(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("COMMIT_SHA", "0123456")  # digits only: still the text, not a number
    with _test_app(database_url, tmp_path) as app:
        answer = app.test_client().get("/api/admin/rev", headers=ADMIN)
    assert (answer.status_code, answer.get_json()) == (200, {"version": "0123456"})


def test_the_readme_s_admin_api_table_names_every_route(app) -> None:  # type: ignore[no-untyped-def]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Admin API\n", 1)[1].split("\n## ", 1)[0]
    names = {"external_id": "id", "system_name": "name"}  # as the README writes them
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("admin_api.") and rule.rule != "/api/admin/":
            path = re.sub(
                r"<(?:\w+:)?(\w+)>",
                lambda m: "<" + names.get(m[1], "id" if m[1].endswith("_id") else m[1]) + ">",
                rule.rule.removeprefix("/api/admin"),
            )
            assert re.search(re.escape(path) + "[`?]", section), f"README: no {path}"


def test_a_database_that_does_not_answer_is_a_503_in_the_api_s_shape(  # type: ignore[no-untyped-def]
    admin, database_url: str
) -> None:
    with away(unreachable(database_url)):
        for method, path in [("GET", "/"), ("GET", "/apiKey"), ("POST", "/apiKey")]:
            status, body = admin(method, path, json={"comment": "x"} if method == "POST" else None)
            assert (status, body) == (
                503,
                {"error": "The database does not answer; try again later"},
            )
    assert admin("GET", "/")[0] == 200


def test_key_lifecycle_and_the_key_is_shown_once(admin, client) -> None:  # type: ignore[no-untyped-def]
    status, created = admin(
        "POST",
        "/apiKey",
        json={"comment": "app", "rpmLimit": 10, "expiresAt": "2099-01-01T00:00:00Z"},
    )
    assert status == 200
    key = created["key"]
    assert key.startswith("sk-") and len(key) == 35
    assert (created["rpmLimit"], created["tpmLimit"], created["comment"]) == (10, 50000, "app")
    assert created["expiresAt"] == "2099-01-01T00:00:00.000Z"

    status, listed = admin("GET", "/apiKey")
    assert [k["id"] for k in listed] == [created["id"]]
    assert key not in str(listed) and listed[0]["key"] == redact.hint(key)
    assert admin("GET", f"/apiKey/{key}")[1]["id"] == created["id"]
    assert admin("GET", f"/apiKey/{created['id']}")[1]["comment"] == "app"

    assert admin("PUT", f"/apiKey/{key}/ratelimit", json={"rpmLimit": 5, "tpmLimit": 100})[0] == 200
    assert admin("GET", f"/apiKey/{key}")[1]["tpmLimit"] == 100
    assert admin("GET", f"/apiKey/{key}")[1]["budgetUsd"] is None
    assert admin("PUT", f"/apiKey/{key}/budget", json={"budgetUsd": 12.5})[1]["budgetUsd"] == 12.5
    assert admin("GET", f"/apiKey/{key}")[1]["budgetUsd"] == 12.5
    assert admin("PUT", f"/apiKey/{key}/budget", json={"budgetUsd": None})[0] == 200
    assert admin("GET", f"/apiKey/{key}")[1]["budgetUsd"] is None

    # The key works until it is revoked.
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    status, revoked = admin("DELETE", f"/apiKey/{key}")
    assert status == 200 and revoked["revoked"] is True
    assert admin("GET", "/apiKey")[1] == []
    assert [k["revoked"] for k in admin("GET", "/apiKey?includeRevoked=true")[1]] == [True]


def test_revoking_an_unknown_key_is_404_and_inserts_nothing(admin, db) -> None:  # type: ignore[no-untyped-def]
    status, body = admin("DELETE", "/apiKey/sk-00000000000000000000000000000000")
    assert status == 404 and body == {"error": "Key not found"}
    assert ApiKey.select().count() == 0


def test_a_final_slash_reaches_the_same_route_as_nexusgate_s_server(client) -> None:  # type: ignore[no-untyped-def]
    # NexusGate's server (Elysia, strictPath off) answers /x and /x/ alike; here /x/ was
    # a 404 and /api/admin an HTML 308.
    def answer(method: str, path: str, **kwargs: object) -> tuple[int, object]:
        resp = client.open(path, method=method, headers=ADMIN, **kwargs)
        return resp.status_code, resp.get_json()

    assert answer("GET", "/api/admin") == (200, True)
    assert client.get("/api/admin").status_code == 401  # the guard still runs
    created = answer("POST", "/api/admin/apiKey/", json={"comment": "slash"})[1]
    assert answer("GET", "/api/admin/apiKey/")[1][0]["id"] == created["id"]
    assert answer("GET", f"/api/admin/apiKey/{created['key']}/usage/")[0] == 200
    assert answer("GET", "/api/admin/rev/") == (200, {"version": "unknown"})
    p = answer("POST", "/api/admin/providers/", json={"name": "s", "baseUrl": "https://x"})[1]
    assert answer("GET", f"/api/admin/providers/{p['id']}/") == answer(
        "GET", f"/api/admin/providers/{p['id']}"
    )
    assert answer("GET", "/api/admin/completions/")[1]["total"] == 0


@pytest.mark.parametrize("path", ["/apiKey//usage", "/apiKey/%2F/usage", "//providers"])
def test_a_path_with_an_empty_segment_is_a_json_404_not_a_redirect(admin, path: str) -> None:  # type: ignore[no-untyped-def]
    # werkzeug's merge_slashes answered these with an HTML 308 to another route (found
    # by the admin fuzzer: /apiKey/%2F/usage was sent on to /apiKey/usage).
    status, body = admin("GET", path)
    assert status == 404 and "error" in body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rpmLimit": 0}, "rpmLimit must be at least 1"),
        ({"tpmLimit": "many"}, "tpmLimit must be an integer"),
        ({"expiresAt": "tomorrow"}, "expiresAt must be an ISO 8601 date-time"),
        ({"comment": 3}, "comment must be a string"),
    ],
)
def test_key_fields_are_validated(admin, body: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    assert admin("POST", "/apiKey", json=body) == (400, {"error": message})


def test_malformed_admin_json_is_400(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/api/admin/apiKey", data="{nope", headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and "not valid JSON" in resp.get_json()["error"]


def test_operator_ensure_by_external_id_is_idempotent(admin) -> None:  # type: ignore[no-untyped-def]
    status, first = admin("PUT", "/apiKey/by-external-id/ns%2Fapp", json={"comment": "from k8s"})
    assert status == 200 and first["created"] is True and first["key"].startswith("sk-")
    status, again = admin("PUT", "/apiKey/by-external-id/ns%2Fapp", json={"rpmLimit": 7})
    assert status == 200 and again["created"] is False and again["id"] == first["id"]
    assert first["key"] not in str(again)
    assert admin("GET", "/apiKey/by-external-id/ns%2Fapp")[1]["rpmLimit"] == 7
    assert [k["externalId"] for k in admin("GET", "/apiKey/managed")[1]] == ["ns/app"]
    admin("DELETE", f"/apiKey/{first['id']}")
    # Ensuring a revoked key brings it back.
    admin("PUT", "/apiKey/by-external-id/ns%2Fapp", json={})
    assert admin("GET", "/apiKey/by-external-id/ns%2Fapp")[1]["revoked"] is False


def test_names_in_a_path_are_decoded_once(admin) -> None:  # type: ignore[no-untyped-def]
    # Flask decodes the path: a name holding '%' sequences is sent with its '%' as %25,
    # and must arrive as written, not decoded a second time ("a%41b" is not "aAb").
    name = "a%41b%2Fc 100%"
    sent = "a%2541b%252Fc%20100%25"
    p = provider(admin)
    model = admin("POST", "/models", json={"providerId": p["id"], "systemName": name})[1]
    admin("POST", "/models", json={"providerId": p["id"], "systemName": "aAb/c 100%"})
    pairs = admin("GET", f"/models/by-system-name/{sent}")[1]
    assert [pair["model"]["id"] for pair in pairs] == [model["id"]]
    weights = {"weights": [{"modelId": model["id"], "weight": 2}]}
    status, pairs = admin("PUT", f"/models/by-system-name/{sent}/weights", json=weights)
    assert status == 200 and [pair["model"]["weight"] for pair in pairs] == [2.0]

    status, ensured = admin("PUT", f"/apiKey/by-external-id/{sent}", json={})
    assert status == 200 and ensured["externalId"] == name
    assert admin("GET", f"/apiKey/by-external-id/{sent}")[1]["externalId"] == name
    assert admin("GET", "/apiKey/by-external-id/aAb%2Fc%20100%25")[0] == 404

    limit = {"identifier": name, "limit": 1, "refill": 1}
    assert admin("POST", "/ratelimits", json=limit)[0] == 201
    assert admin("GET", f"/ratelimits/{sent}")[1]["identifier"] == name
    assert admin("DELETE", f"/ratelimits/{sent}")[0] == 204


def test_provider_crud_and_the_provider_key_is_masked(admin) -> None:  # type: ignore[no-untyped-def]
    created = provider(admin)
    assert created["apiKey"] == "sk-…1234"
    assert "sk-provider-secret-1234" not in str(admin("GET", "/providers")[1])
    assert admin("POST", "/providers", json={"name": "p1", "baseUrl": "https://x"})[0] == 409
    status, updated = admin(
        "PUT",
        f"/providers/{created['id']}",
        json={"baseUrl": "https://other.example/v1", "streamUsage": False},
    )
    assert (
        status == 200
        and updated["baseUrl"] == "https://other.example/v1"
        and updated["streamUsage"] is False
    )
    assert admin("DELETE", f"/providers/{created['id']}") == (200, {"success": True})
    assert admin("GET", f"/providers/{created['id']}")[0] == 404
    # A deleted provider's name can be used again.
    assert provider(admin)["name"] == "p1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"name": "x", "baseUrl": "ftp://x"},
            "baseUrl must be an http(s) URL of at most 255 characters",
        ),
        (
            {"name": "x", "baseUrl": "https://x", "type": "bedrock"},
            "type must be one of openai, openai-responses, anthropic, azure, ollama",
        ),
        ({"baseUrl": "https://x"}, "name is required"),
        ({"name": "", "baseUrl": "https://x"}, "name must be 1 to 63 characters"),
    ],
)
def test_provider_fields_are_validated(admin, body: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    assert admin("POST", "/providers", json=body) == (400, {"error": message})


def test_models_weights_and_routing_cache(admin, client) -> None:  # type: ignore[no-untyped-def]
    p1, p2 = provider(admin, name="a"), provider(admin, name="b")
    status, m1 = admin(
        "POST",
        "/models",
        json={"providerId": p1["id"], "systemName": "gpt", "remoteId": "gpt-remote"},
    )
    assert status == 200 and m1["weight"] == 1.0 and m1["modelType"] == "chat"
    m2 = admin("POST", "/models", json={"providerId": p2["id"], "systemName": "gpt", "weight": 3})[
        1
    ]
    assert admin("POST", "/models", json={"providerId": p1["id"], "systemName": "gpt"})[0] == 409
    assert admin("POST", "/models", json={"providerId": 999, "systemName": "x"})[0] == 404
    assert admin("GET", "/models/system-names")[1] == ["gpt"]
    pairs = admin("GET", "/models/by-system-name/gpt")[1]
    assert [(p["model"]["id"], p["provider"]["name"]) for p in pairs] == [
        (m1["id"], "a"),
        (m2["id"], "b"),
    ]

    status, _ = admin(
        "PUT",
        "/models/by-system-name/gpt/weights",
        json={"weights": [{"modelId": m1["id"], "weight": 0}]},
    )
    assert status == 200 and admin("GET", f"/models/{m1['id']}")[1]["weight"] == 0
    other = admin("POST", "/models", json={"providerId": p1["id"], "systemName": "other"})[1]
    assert (
        admin(
            "PUT",
            "/models/by-system-name/gpt/weights",
            json={"weights": [{"modelId": other["id"], "weight": 1}]},
        )[0]
        == 400
    )
    assert admin("PUT", f"/models/{m1['id']}", json={"providerId": p2["id"]})[0] == 400

    # /v1/models reflects admin writes at once.
    names = {m["id"] for m in client.get("/v1/models").get_json()["data"]}
    assert names == {"gpt", "other"}
    admin("PUT", f"/models/{other['id']}", json={"remoteId": "old", "inputPrice": 5, "weight": 3})
    admin("DELETE", f"/models/{other['id']}")
    assert {m["id"] for m in client.get("/v1/models").get_json()["data"]} == {"gpt"}
    # Re-creating a deleted model brings the row back rather than failing, as new: none
    # of the deleted model's settings (its calls would go to the old remote id).
    again = admin("POST", "/models", json={"providerId": p1["id"], "systemName": "other"})[1]
    assert again["id"] == other["id"] and again["deleted"] is False
    assert (again["remoteId"], again["inputPrice"], again["weight"]) == (None, None, 1.0)


def test_a_deleted_model_s_name_can_be_taken_again(admin, client) -> None:  # type: ignore[no-untyped-def]
    """Only live models hold their name: a deleted one's may be given to another model
    (renamed to it), and created again once that one is deleted too."""
    p = provider(admin)
    body = {"providerId": p["id"], "systemName": "gpt", "remoteId": "old", "inputPrice": 5}
    old = admin("POST", "/models", json=body)[1]
    admin("DELETE", f"/models/{old['id']}")
    other = admin("POST", "/models", json={"providerId": p["id"], "systemName": "other"})[1]
    status, renamed = admin("PUT", f"/models/{other['id']}", json={"systemName": "gpt"})
    assert status == 200 and renamed["systemName"] == "gpt", renamed
    # While it lives, the name is its own.
    assert admin("POST", "/models", json={"providerId": p["id"], "systemName": "gpt"})[0] == 409
    spare = admin("POST", "/models", json={"providerId": p["id"], "systemName": "spare"})[1]
    assert admin("PUT", f"/models/{spare['id']}", json={"systemName": "gpt"})[0] == 409
    pairs = admin("GET", "/models/by-system-name/gpt")[1]
    assert [pair["model"]["id"] for pair in pairs] == [other["id"]]

    # Two deleted rows hold the name now: created again, it is a model as new, once.
    admin("DELETE", f"/models/{other['id']}")
    status, again = admin("POST", "/models", json={"providerId": p["id"], "systemName": "gpt"})
    assert status == 200 and again["deleted"] is False
    assert (again["remoteId"], again["inputPrice"], again["weight"]) == (None, None, 1.0)
    pairs = admin("GET", "/models/by-system-name/gpt")[1]
    assert [pair["model"]["id"] for pair in pairs] == [again["id"]]
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["gpt", "spare"]


def _records(db, key_id: int, statuses: list[str]) -> list[Exchange]:  # type: ignore[no-untyped-def]
    calls = []
    for i, status in enumerate(statuses):
        ex = Exchange(
            api_key_id=key_id, model=f"m{i % 2}", api_format="openai-chat", prompt={"messages": []}
        )
        if status != "pending":
            ex.finish(
                status,
                usage={"input_tokens": 10, "output_tokens": i} if status != "failed" else None,
            )
        calls.append(ex)
    write_rows([snapshot(ex) for ex in calls])
    return calls


def test_completions_list_filters_and_its_total_honours_them(admin, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="a" * 64, key_hint="sk-a…aaaa")
    other = ApiKey.create(key_hash="b" * 64, key_hint="sk-b…bbbb")
    _records(db, key.id, ["completed", "aborted", "failed", "pending", "completed"])
    _records(db, other.id, ["completed"])

    status, page = admin("GET", "/completions")
    assert status == 200 and page["total"] == 6 and page["from"] == 0
    assert [r["createdAt"] for r in page["data"]] == sorted(
        (r["createdAt"] for r in page["data"]), reverse=True
    )
    assert admin("GET", f"/completions?apiKeyId={key.id}")[1]["total"] == 5
    assert admin("GET", "/completions?status=completed")[1]["total"] == 3
    assert admin("GET", f"/completions?apiKeyId={key.id}&model=m1")[1]["total"] == 2
    page = admin("GET", f"/completions?apiKeyId={key.id}&offset=1&limit=2")[1]
    assert (page["total"], len(page["data"]), page["from"]) == (5, 2, 1)

    failed = admin("GET", "/completions?status=failed")[1]["data"][0]
    assert (failed["promptTokens"], failed["completionTokens"], failed["ttft"]) == (-1, -1, -1)
    pending = admin("GET", "/completions?status=pending")[1]["data"][0]
    assert pending["duration"] == -1

    one = admin("GET", f"/completions/{failed['id']}")[1]
    assert one["status"] == "failed" and one["uid"] == failed["uid"]
    assert admin("DELETE", f"/completions/{failed['id']}")[1]["deleted"] is True
    assert admin("GET", f"/completions/{failed['id']}")[0] == 404
    assert admin("GET", "/completions")[1]["total"] == 5
    assert admin("GET", "/completions?limit=x")[0] == 400


def test_usage_sums_known_tokens_of_completed_and_aborted_calls(admin, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="c" * 64, key_hint="sk-c…cccc")
    _records(db, key.id, ["completed", "aborted", "failed", "pending"])
    usage = admin("GET", "/usage")[1]  # NexusGate's two fields, and the costs beside them
    assert (usage["total_prompt_tokens"], usage["total_completion_tokens"]) == (20, 1)


def test_embeddings_usage_sums_known_input_tokens_of_live_records(admin, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="e" * 64, key_hint="sk-e…eeee")
    other = ApiKey.create(key_hash="f" * 64, key_hint="sk-f…ffff")
    for owner, tokens, status, deleted in [
        (key, 7, "completed", False),
        (key, None, "failed", False),  # unknown: not counted as -1 (NexusGate's did)
        (key, 100, "completed", True),  # deleted: not counted
        (other, 5, "completed", False),
    ]:
        Embedding.create(
            uid=uuid.uuid4().hex, api_key=owner.id, model="emb", status=status,
            input_tokens=tokens, deleted=deleted,
        )  # fmt: skip
    assert admin("GET", "/embeddings/usage") == (200, {"total_input_tokens": 12})
    assert admin("GET", f"/embeddings/usage?apiKeyId={key.id}")[1] == {"total_input_tokens": 7}
    assert admin("GET", "/embeddings/usage?apiKeyId=999")[1] == {"total_input_tokens": 0}
    for bad in ("x", "0", str(BIG), "\u0661"):
        status, body = admin("GET", f"/embeddings/usage?apiKeyId={bad}")
        assert status == 400 and "apiKeyId" in body["error"], bad


def test_deleting_an_embedding_answers_success_as_nexusgate(admin, db) -> None:  # type: ignore[no-untyped-def]
    # NexusGate answers {success: true} here (the row only for /completions/<id>).
    key = ApiKey.create(key_hash="g" * 64, key_hint="sk-g…gggg")
    row = Embedding.create(uid=uuid.uuid4().hex, api_key=key.id, model="emb", status="completed")
    assert admin("GET", f"/embeddings/{row.id}")[1]["deleted"] is False
    assert admin("DELETE", f"/embeddings/{row.id}") == (200, {"success": True})
    assert admin("GET", f"/embeddings/{row.id}") == (404, {"error": "Embedding not found"})
    assert admin("DELETE", f"/embeddings/{row.id}") == (404, {"error": "Embedding not found"})
    assert Embedding.get_by_id(row.id).deleted is True  # soft: the row stays


# -- hostile input: never a 5xx, always a message ----------------------------------------

BIG = 2**63
NAN_BODY = b'{"name": "p", "baseUrl": "https://x.example", "comment": NaN}'


def test_ids_in_paths_beyond_the_column_or_not_ascii_are_not_found(admin) -> None:  # type: ignore[no-untyped-def]
    for path in ("/providers/{}", "/models/{}", "/completions/{}", "/embeddings/{}"):
        for bad in (BIG, 2**64 + 1, 10**30, 0, "\u0661\u0662", "\uff11", "-1", "1.5"):
            for method in ("GET", "DELETE"):
                status, body = admin(method, path.format(bad))
                assert status in (404, 405), (method, path, bad, status, body)
    for bad in (str(BIG - 1), str(BIG), "9" * 40, "\u0661", "\u00b2"):  # by id, or by key
        assert admin("GET", f"/apiKey/{bad}")[0] == 404
        assert (
            admin("PUT", f"/apiKey/{bad}/ratelimit", json={"rpmLimit": 1, "tpmLimit": 1})[0] == 404
        )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=-1", "limit must be an integer from 1 to 1000"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("limit=1001", "limit must be an integer from 1 to 1000"),
        ("limit=x", "limit must be an integer from 1 to 1000"),
        ("offset=-1", "offset must be an integer from 0"),
        (f"offset={BIG}", "offset must be an integer from 0"),
        ("offset=%D9%A1", "offset must be an integer from 0"),  # Arabic-Indic one
        ("offset=1_0", "offset must be an integer from 0"),
        (f"apiKeyId={BIG}", "apiKeyId must be an integer from 1"),
        ("apiKeyId=%EF%BC%91", "apiKeyId must be an integer from 1"),  # fullwidth one
        ("modelId=0", "modelId must be an integer from 1"),
        ("status=done", "status must be one of pending, completed"),
        ("model=%00", "must not contain NUL"),
    ],
)
def test_paging_and_filters_are_checked(admin, query: str, message: str) -> None:  # type: ignore[no-untyped-def]
    for table in ("completions", "embeddings"):
        status, body = admin("GET", f"/{table}?{query}")
        assert status == 400 and message in body["error"], (table, body)


@pytest.mark.parametrize(
    "path",
    [
        "/models?modelType=chats",
        "/models/system-names?modelType=Embedding",
        "/models/by-system-name/gpt?modelType=x",
        "/apiKey?includeRevoked=maybe",
        "/apiKey/managed?includeRevoked=2",
    ],
)
def test_a_query_value_nexusgate_checks_is_refused_not_ignored(admin, path: str) -> None:  # type: ignore[no-untyped-def]
    # NexusGate's schemas refuse these (422); ignoring them answered as if unasked.
    status, body = admin("GET", path)
    name = path.split("?")[1].split("=")[0]
    assert status == 400 and body["error"].startswith(f"{name} must be"), body


def test_query_flags_and_model_types_as_nexusgate_sends_them(admin) -> None:  # type: ignore[no-untyped-def]
    p = provider(admin)
    admin(
        "POST", "/models", json={"providerId": p["id"], "systemName": "e", "modelType": "embedding"}
    )
    admin("POST", "/models", json={"providerId": p["id"], "systemName": "c"})
    assert [m["systemName"] for m in admin("GET", "/models?modelType=embedding")[1]] == ["e"]
    assert admin("GET", "/models/system-names?modelType=chat")[1] == ["c"]
    assert admin("GET", "/models/system-names?modelType=")[1] == ["c", "e"]
    key = admin("POST", "/apiKey", json={})[1]
    admin("DELETE", f"/apiKey/{key['id']}")
    for value, shown in [("true", 1), ("TRUE", 1), ("1", 1), ("false", 0), ("0", 0), ("", 0)]:
        assert len(admin("GET", f"/apiKey?includeRevoked={value}")[1]) == shown, value


def test_paging_within_bounds_is_served(admin) -> None:  # type: ignore[no-untyped-def]
    assert admin("GET", f"/completions?limit=1000&offset={BIG - 1}")[1]["data"] == []
    assert admin("GET", "/embeddings?limit=1&offset=0")[1] == {"data": [], "total": 0, "from": 0}


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/apiKey", {"rpmLimit": None}, "rpmLimit must not be null"),
        ("POST", "/apiKey", {"rpmLimit": 2**31}, "rpmLimit must be at most 2147483647"),
        ("POST", "/apiKey", {"tpmLimit": 10**30}, "tpmLimit must be at most 2147483647"),
        ("POST", "/apiKey", {"tpmLimit": 5.5}, "tpmLimit must be an integer"),
        ("POST", "/apiKey", {"expiresAt": "10000-01-01T00:00:00Z"}, "ISO 8601"),
        ("POST", "/apiKey", {"expiresAt": "0001-01-01T00:00:00+01:00"}, "ISO 8601"),
        ("POST", "/apiKey", {"expiresAt": "1969-12-31T23:59:59Z"}, "1970 and 9999"),
        ("POST", "/apiKey", {"expiresAt": "\u0662\u0660\u0663\u0660-01-01"}, "ISO 8601"),
        ("POST", "/apiKey", {"comment": "x" * 4097}, "comment must be 0 to 4096 characters"),
        ("PUT", "/apiKey/by-external-id/ns%2Fa", {"rpmLimit": None}, "rpmLimit must not be null"),
        ("PUT", "/apiKey/by-external-id/" + "e" * 128, {}, "externalId must be 1 to 127"),
        ("POST", "/providers", {"name": "p", "baseUrl": None}, "baseUrl is required"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://x", "type": None}, "type must not be null"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://x", "streamUsage": None}, "streamUsage must not be null"),
        ("POST", "/providers", {"name": "p" * 64, "baseUrl": "https://x"}, "name must be 1 to 63"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://" + "x" * 250}, "baseUrl must be 1 to 255"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://"}, "baseUrl must be an http(s) URL"),
        ("POST", "/providers", {"name": "p\u0000", "baseUrl": "https://x"}, None),  # U+FFFD: stored
        ("POST", "/providers", {"name": "p\n", "baseUrl": "https://x"}, "name must not contain control"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://x", "apiVersion": "v" * 32}, "apiVersion must be 0 to 31"),
        ("POST", "/providers", {"name": "p", "baseUrl": "https://x", "apiKey": 5}, "apiKey must be a string"),
        ("POST", "/models", {"providerId": BIG, "systemName": "m"}, f"providerId must be at most {BIG - 1}"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "weight": None}, "weight must not be null"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "weight": 1e300}, "weight must be at most 1000000"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "inputPrice": -1}, "inputPrice must be at least 0"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "contextLength": 2**31}, "contextLength must be at most"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "remoteId": "r" * 128}, "remoteId must be 0 to 127"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "modelType": "image"}, "modelType must be one of chat, embedding"),
        ("PUT", "/models/by-system-name/m/weights", {"weights": [{"modelId": BIG, "weight": 1}]}, "weights must be a list"),
        ("PUT", "/models/by-system-name/m/weights", {"weights": [{"modelId": 1, "weight": 1e300}]}, "weights must be a list"),
        ("PUT", "/models/by-system-name/m/weights", {"weights": [{"modelId": 1, "weight": True}]}, "weights must be a list"),
        ("PUT", "/apiKey/1/ratelimit", {"rpmLimit": 1, "tpmLimit": None}, "tpmLimit is required"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "cacheReadPrice": -0.1}, "cacheReadPrice must be at least 0"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "cacheWritePrice": "1"}, "cacheWritePrice must be a number"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "cacheWritePrice": 1e7}, "cacheWritePrice must be at most 1000000"),
        ("POST", "/apiKey", {"budgetUsd": -1}, "budgetUsd must be at least 0"),
        ("POST", "/apiKey", {"budgetUsd": 1e10}, "budgetUsd must be at most 1000000000"),
        # Too small for PostgreSQL's real ("value out of range: underflow"): a 500 once.
        ("POST", "/apiKey", {"budgetUsd": 5e-324}, "budgetUsd must be 0 or at least 1e-30"),
        ("POST", "/models", {"providerId": 1, "systemName": "m", "inputPrice": 1e-39}, "inputPrice must be 0 or at least"),
        ("POST", "/apiKey", {"budgetUsd": 1e-30}, None),
        ("POST", "/apiKey", {"budgetUsd": 0}, None),
        ("PUT", "/apiKey/1/budget", {}, "budgetUsd is required"),
        ("PUT", "/apiKey/1/budget", {"budgetUsd": True}, "budgetUsd must be a number"),
    ],
)  # fmt: skip
def test_every_admin_field_is_checked_against_its_column(
    admin, db, method: str, path: str, body: dict, message: str | None
) -> None:  # type: ignore[no-untyped-def]
    ApiKey.issue()  # key 1, for the ratelimit case
    status, answer = admin(method, path, json=body)
    if message is None:
        assert status == 200, answer
        return
    assert status == 400, answer
    assert message in answer["error"], answer


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "p", "baseUrl": "https://x.example", "comment": NaN}',
        b'{"name": "p", "baseUrl": "https://x.example", "comment": Infinity}',
        b'{"weights": [{"modelId": 1, "weight": Infinity}]}',
        b'{"weights": [{"modelId": 1, "weight": 1e999}]}',
        b'{"name": "\xed\xa0\x80", "baseUrl": "https://x.example"}',
        b'{"name": "p", "baseUrl": "https://x.example", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_admin_bodies_are_strict_json(client, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    for path in ("/providers", "/models/by-system-name/m/weights"):
        method = "POST" if path == "/providers" else "PUT"
        resp = client.open(
            f"/api/admin{path}",
            method=method,
            data=raw,
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        assert resp.status_code == 400, resp.text
        assert "not valid JSON" in resp.get_json()["error"]


def test_infinite_prices_and_weights_never_reach_the_table_or_break_a_page(
    admin, client, db
) -> None:  # type: ignore[no-untyped-def]
    p = provider(admin)
    model = admin("POST", "/models", json={"providerId": p["id"], "systemName": "m"})[1]
    assert admin("PUT", f"/models/{model['id']}", json={"inputPrice": 1e308 * 10})[0] == 400  # inf
    # A row written before these checks existed still shows.
    from gateway.models import Model

    Model.update(weight=float("inf"), input_price=float("inf")).where(
        Model.id == model["id"]
    ).execute()
    assert admin("GET", "/models")[0] == 200
    with client.session_transaction() as session:
        session.clear()
    client.post("/login", data={"secret": ADMIN_SECRET, "csrf_token": _csrf(client)})
    assert client.get("/providers").status_code == 200


def _csrf(client) -> str:  # type: ignore[no-untyped-def]
    client.get("/login")
    with client.session_transaction() as session:
        return session["csrf"]


def test_concurrent_creates_of_one_name_one_wins_the_other_gets_409(admin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Both requests passed the "is the name free?" check before either inserted: the
    # partial unique index decides, and the loser is told so, not given a 500.
    from gateway import registry

    monkeypatch.setattr(registry, "_unique_provider_name", lambda name, other_than=None: None)
    assert admin("POST", "/providers", json={"name": "p", "baseUrl": "https://x.example"})[0] == 200
    status, body = admin("POST", "/providers", json={"name": "p", "baseUrl": "https://y.example"})
    assert (status, body) == (409, {"error": "Provider 'p' already exists"})
    other = admin("POST", "/providers", json={"name": "q", "baseUrl": "https://x.example"})[1]
    status, body = admin("PUT", f"/providers/{other['id']}", json={"name": "p"})
    assert (status, body) == (409, {"error": "Provider 'p' already exists"})
    model = {"providerId": other["id"], "systemName": "m"}
    assert admin("POST", "/models", json=model)[0] == 200
    monkeypatch.setattr(registry.Model, "get_or_none", classmethod(lambda cls, *a: None))
    status, body = admin("POST", "/models", json=model)
    assert (status, body) == (409, {"error": "Model 'm' already exists on this provider"})


def test_many_concurrent_creates_of_one_name(app, admin) -> None:  # type: ignore[no-untyped-def]
    import gevent

    def create(i: int) -> int:
        with app.test_client() as client:
            body = {"name": "race", "baseUrl": f"https://{i}.example"}
            return client.post("/api/admin/providers", json=body, headers=ADMIN).status_code

    statuses = sorted(g.value for g in gevent.joinall([gevent.spawn(create, i) for i in range(12)]))
    assert statuses == [200] + [409] * 11


def test_many_concurrent_identical_renames_all_succeed(app, admin) -> None:  # type: ignore[no-untyped-def]
    # Each read the provider under its old name, then found the new one taken: by the
    # provider itself, renamed by another meanwhile (a probe: 2 of 48 got 409).
    import gevent

    renamed = provider(admin, name="before")

    def rename(_: int) -> int:
        with app.test_client() as client:
            path = f"/api/admin/providers/{renamed['id']}"
            return client.put(path, json={"name": "after"}, headers=ADMIN).status_code

    statuses = [g.value for g in gevent.joinall([gevent.spawn(rename, i) for i in range(24)])]
    assert statuses == [200] * 24
    assert admin("GET", f"/providers/{renamed['id']}")[1]["name"] == "after"


def test_weights_set_at_once_in_opposite_orders_both_apply_whole(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # Each request's transaction locked its models in the order it listed them: two
    # at once, in opposite orders, deadlocked on PostgreSQL, and one was answered 503
    # "the database does not answer" (32 of 40 pairs in a probe, a second lost each).
    import gevent
    import requests

    gw = gateway_factory(workers=2)
    ids = []
    for i in range(4):
        made = gw.api("POST", "/providers", json={"name": f"w{i}", "baseUrl": "https://x.example"})
        ids.append(
            gw.api("POST", "/models", json={"providerId": made["id"], "systemName": "w"})["id"]
        )
    url = f"{gw.url}/api/admin/models/by-system-name/w/weights"

    def put(order: list[int], weight: int) -> int:
        with requests.Session() as session:
            body = {"weights": [{"modelId": m, "weight": weight} for m in order]}
            return session.put(url, json=body, headers=ADMIN, timeout=30).status_code

    for _ in range(10):
        pair = [gevent.spawn(put, ids, 1), gevent.spawn(put, ids[::-1], 2)]
        assert [g.value for g in gevent.joinall(pair)] == [200, 200]
        weights = {m["model"]["weight"] for m in gw.api("GET", "/models/by-system-name/w")}
        assert weights in ({1.0}, {2.0})  # one request's weights, never a mix


def test_the_model_filter_is_one_rule_for_the_api_and_the_dashboard(admin, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="d" * 64, key_hint="sk-d…dddd")
    for model in ("gpt-4o", "gpt-4o@azure", "gpt-4o-mini", "GPT-4O", "GPT-4O@azure"):
        ex = Exchange(api_key_id=key.id, model=model, api_format="openai-chat")
        ex.finish("completed")
        write_rows([snapshot(ex)])
    listed = admin("GET", "/completions?model=gpt-4o")[1]
    assert sorted(r["model"] for r in listed["data"]) == ["gpt-4o", "gpt-4o@azure"]
    assert listed["total"] == 2
    assert admin("GET", "/completions?model=gpt")[1]["total"] == 0  # not a prefix match
    # System names differ by case, pinned or not (a case-blind LIKE listed GPT-4O@azure).
    assert admin("GET", "/completions?model=GPT-4O")[1]["total"] == 2


def test_nul_anywhere_in_a_url_is_400(admin) -> None:  # type: ignore[no-untyped-def]
    for path in (
        "/models/by-system-name/a%00b",
        "/apiKey/by-external-id/a%00b",
        "/models?modelType=%00",
    ):
        status, body = admin("GET", path)
        assert status == 400 and "NUL" in body["error"], path


# -- traffic control: usage, limits, per-model limits, throttling --------------------


def test_key_usage_is_read_from_the_shared_buckets(admin) -> None:  # type: ignore[no-untyped-def]
    from gateway.limiter import limiter

    created = admin("POST", "/apiKey", json={"rpmLimit": 6, "tpmLimit": 600})[1]
    started = time.monotonic()
    limiter.admit(created["id"], 6, 600)
    limiter.admit(created["id"], 6, 600)
    limiter.charge(created["id"], 600, 250)

    def read(key: str) -> dict:
        status, usage = admin("GET", f"/apiKey/{key}/usage")
        assert status == 200
        # The buckets refill as time passes (600 a minute: 10 tokens a second), on the
        # store's clock: what was used reads back less by at most what refilled since.
        refilled = math.ceil(10 * (time.monotonic() - started))
        tpm = usage["usage"]["tpm"]
        assert 250 - refilled <= tpm["current"] <= 250 and tpm["remaining"] == 600 - tpm["current"]
        assert time.monotonic() - started < 10  # else an rpm token would have come back too
        tpm["current"], tpm["remaining"] = 250, 350
        return usage

    usage = read(created["key"])
    assert usage == {
        "key": created["key"][:7] + "…" + created["key"][-4:],
        "limits": {"rpm": 6, "tpm": 600},
        "usage": {
            "rpm": {"current": 2, "limit": 6, "remaining": 4},
            "tpm": {"current": 250, "limit": 600, "remaining": 350},
        },
    }
    assert read(str(created["id"])) == usage  # by id too
    assert admin("GET", "/apiKey/sk-" + "0" * 32 + "/usage")[0] == 404


def test_new_limits_apply_at_once_even_to_a_cached_key(admin, client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gateway import auth

    monkeypatch.setattr(auth.keys, "ttl", 3600.0)  # only an announcement can refresh it
    created = admin("POST", "/apiKey", json={"rpmLimit": 50})[1]
    headers = {"Authorization": f"Bearer {created['key']}"}
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    first = client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.headers["X-RateLimit-Limit-RPM"] == "50"
    status, answer = admin(
        "PUT",
        f"/apiKey/{created['id']}/ratelimit",
        json={"rpmLimit": 1, "tpmLimit": 9, "maxConcurrent": 2},
    )
    assert status == 200 and (answer["rpmLimit"], answer["maxConcurrent"]) == (1, 2)
    second = client.post("/v1/chat/completions", json=body, headers=headers)
    assert second.headers["X-RateLimit-Limit-RPM"] == "1"
    assert admin("GET", f"/apiKey/{created['id']}")[1]["maxConcurrent"] == 2
    admin(
        "PUT",
        f"/apiKey/{created['id']}/ratelimit",
        json={"rpmLimit": 1, "tpmLimit": 9, "maxConcurrent": None},
    )
    assert admin("GET", f"/apiKey/{created['id']}")[1]["maxConcurrent"] is None
    admin("DELETE", f"/apiKey/{created['id']}")
    assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 401


def test_a_revocation_is_announced_as_one_and_still_as_the_key_s_hash(admin) -> None:  # type: ignore[no-untyped-def]
    """New limits announce the key's hash (its last state serves while the database is
    away); a revocation, or an expiry set in the past, announces ``REVOKED`` + hash
    first (refused at once), then the hash alone, on which a previous version forgets
    the key (it takes the first for a hash it does not know)."""
    from gateway import registry
    from gateway.auth import REVOKED
    from gateway.db import database
    from gateway.limiter import limiter

    heard: list[str | None] = []
    limiter.on_key_change(heard.append)
    try:
        created = admin("POST", "/apiKey", json={"comment": "announced"})[1]
        digest = ApiKey.hash(created["key"])
        admin("PUT", f"/apiKey/{created['id']}/ratelimit", json={"rpmLimit": 5, "tpmLimit": 9})
        assert heard == [digest]
        with database.connection_context():
            row = ApiKey.get_by_id(created["id"])
            registry.edit_key(row, {"expires_at": datetime(2099, 1, 1)})
            assert heard[1:] == [digest]  # an expiry still ahead: the key still works
            registry.edit_key(row, {"expires_at": datetime(2000, 1, 1)})
        assert heard[2:] == [REVOKED + digest, digest]
        admin("DELETE", f"/apiKey/{created['id']}")
        assert heard[4:] == [REVOKED + digest, digest]
    finally:
        limiter._changes._listeners.remove(heard.append)


def test_per_model_limits_crud_as_nexusgate(admin) -> None:  # type: ignore[no-untyped-def]
    assert admin("GET", "/ratelimits") == (200, {"default": None})  # no hidden default
    limit = {"identifier": "gpt-4o@openai", "limit": 5, "refill": 0.5, "idleTime": 9}
    assert admin("POST", "/ratelimits", json=limit) == (
        201,
        {"identifier": "gpt-4o@openai", "limit": 5, "refill": 0.5},
    )
    assert admin("POST", "/ratelimits", json=limit)[0] == 409
    assert (
        admin("POST", "/ratelimits", json={"identifier": "a/b", "limit": 1, "refill": 1})[0] == 201
    )
    assert admin("GET", "/ratelimits")[1] == {
        "default": None,
        "a/b": {"limit": 1, "refill": 1.0},
        "gpt-4o@openai": {"limit": 5, "refill": 0.5},
    }
    assert admin("GET", "/ratelimits/gpt-4o%40openai")[1]["limit"] == 5
    assert admin("GET", "/ratelimits/a%2Fb")[1]["identifier"] == "a/b"
    for bad in ({"identifier": "x", "limit": 0, "refill": 1}, {"identifier": "x", "limit": 1, "refill": 0.01},
                {"identifier": "", "limit": 1, "refill": 1}, {"limit": 1, "refill": 1}):  # fmt: skip
        assert admin("POST", "/ratelimits", json=bad)[0] == 400, bad
    assert admin("DELETE", "/ratelimits/gpt-4o@openai")[0] == 204
    assert admin("DELETE", "/ratelimits/gpt-4o@openai")[0] == 404
    assert admin("GET", "/ratelimits/gpt-4o@openai")[0] == 404
    default = {"identifier": "default", "limit": 10, "refill": 1}
    admin("POST", "/ratelimits", json=default)
    assert admin("GET", "/ratelimits")[1]["default"] == {"limit": 10, "refill": 1.0}


def test_wrong_admin_secrets_are_throttled_per_client_address(app, client) -> None:  # type: ignore[no-untyped-def]
    def ask(secret: str, address: str = "198.51.100.1", **headers: str):  # type: ignore[no-untyped-def]
        return client.get(
            "/api/admin/",
            headers={"Authorization": f"Bearer {secret}", **headers},
            environ_base={"REMOTE_ADDR": address},
        )

    for _ in range(30):  # right secrets do not count
        assert ask(ADMIN_SECRET).status_code == 200
    assert [ask("guess").status_code for _ in range(10)] == [401] * 10
    throttled = ask("guess")
    assert throttled.status_code == 429 and 5 <= int(throttled.headers["Retry-After"]) <= 6
    assert "Too many wrong admin secrets" in throttled.get_json()["error"]
    assert ask(ADMIN_SECRET).status_code == 429  # not even checked: a guess cannot be confirmed
    assert ask("guess", "198.51.100.2").status_code == 401  # another address
    # X-Forwarded-For is not believed from an untrusted peer: a client cannot escape by it...
    assert ask("guess", **{"X-Forwarded-For": "203.0.113.50"}).status_code == 429
    # ... and is from a proxy named in TRUSTED_PROXIES.
    app.config["TRUSTED_PROXIES"] = "198.51.100.0/24"
    assert ask(ADMIN_SECRET, **{"X-Forwarded-For": "203.0.113.50"}).status_code == 200


def _deleted_at_once(app, paths: list[str]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Each path DELETEd by two requests at once: the statuses, per path."""
    import gevent

    def delete(path: str) -> int:
        with app.test_client() as client:
            return client.delete(f"/api/admin{path}", headers=ADMIN).status_code

    pairs = [[gevent.spawn(delete, p), gevent.spawn(delete, p)] for p in paths]
    gevent.joinall([g for pair in pairs for g in pair], raise_error=True)
    return [sorted(g.value for g in pair) for pair in pairs]


def test_of_two_deletes_of_one_provider_or_model_at_once_one_deleted_it(app, admin) -> None:  # type: ignore[no-untyped-def]
    # Both read the row, then both soft-deleted it by id: two 200s for one deletion. The
    # loser must be told it found nothing, as a DELETE after a DELETE is.
    kept = provider(admin, name="kept")
    paths = []
    for i in range(20):
        made = provider(admin, name=f"twice{i}")
        model = admin("POST", "/models", json={"providerId": kept["id"], "systemName": f"m{i}"})
        paths += [f"/providers/{made['id']}", f"/models/{model[1]['id']}"]
    statuses = _deleted_at_once(app, paths)
    assert [s for s in statuses if s != [200, 404]] == [], statuses


def _old_records(key_id: int, count: int) -> list[str]:
    """``count`` completions and as many embeddings, made 400 days ago: their paths."""
    then = utcnow() - timedelta(days=400)
    paths = []
    made = {"api_key": key_id, "model": "m", "status": "completed", "created_at": then}
    for table, name, extra in (
        (Completion, "completions", {"api_format": "openai-chat"}),
        (Embedding, "embeddings", {}),
    ):
        for _ in range(count):
            row = table.create(uid=uuid.uuid4().hex, updated_at=then, **made, **extra)
            paths.append(f"/{name}/{row.id}")
    return paths


def test_of_two_deletes_of_one_record_at_once_one_deleted_it(app, db) -> None:  # type: ignore[no-untyped-def]
    # As for providers: both read the live record, both soft-deleted it, two 200s.
    key = ApiKey.create(key_hash="h" * 64, key_hint="sk-h…hhhh")
    statuses = _deleted_at_once(app, _old_records(key.id, 20))
    assert [s for s in statuses if s != [200, 404]] == [], statuses


def test_a_record_retention_takes_first_is_404(admin, db, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The DELETE read the live record, retention deleted it (whole) before the soft
    # delete's UPDATE, which changed nothing, and the read back of the row found none:
    # a 500 (CompletionDoesNotExist), for completions and embeddings, on both backends.
    from gateway.db import database
    from tests.test_retention import make_retention

    key = ApiKey.create(key_hash="i" * 64, key_hint="sk-i…iiii")
    paths = _old_records(key.id, 1)
    job = make_retention(tmp_path, clock=utcnow(), RETENTION_DAYS=30)
    execute_sql = database.obj.execute_sql
    ran = []

    def retention_first(sql: str, params: object = None) -> object:
        if sql.startswith("UPDATE") and not ran:
            ran.append(sql)
            job.run()
        return execute_sql(sql, params)

    monkeypatch.setattr(database.obj, "execute_sql", retention_first)
    assert admin("DELETE", paths[0]) == (404, {"error": "Completion not found"})
    ran.clear()
    assert admin("DELETE", paths[1]) == (404, {"error": "Embedding not found"})
    assert len(ran) == 1 and Completion.select().count() == Embedding.select().count() == 0


class _Deadlocker:
    """A connection of the test's own that makes an admin request's transaction the
    victim of real deadlocks: it holds model ``b``, waits until the request (which locks
    ``a`` then ``b``) waits for it, then asks for ``a``. PostgreSQL's check runs first
    in the backend that waited first, the request's, and gives its transaction up."""

    def __init__(self, database_url: str, a: int, b: int) -> None:
        import psycopg

        self.a = a
        self.conn = psycopg.connect(database_url, autocommit=True)
        self.conn.execute("BEGIN")
        self.conn.execute("UPDATE models SET weight = 9 WHERE id = %s", (b,))
        self.conn.execute("SAVEPOINT held")  # ``a`` is let go back to here, ``b`` kept

    def once(self) -> None:
        """Wait for the request to wait for ``b``; take ``a``: a deadlock it loses (had
        this side lost it, DeadlockDetected would be raised here)."""
        wait_until(lambda: pg_lock_awaited(self.conn))
        self.conn.execute("UPDATE models SET weight = 9 WHERE id = %s", (self.a,))
        self.conn.execute("ROLLBACK TO SAVEPOINT held")

    def end(self) -> None:
        """Let every lock go."""
        self.conn.execute("ROLLBACK")
        self.conn.close()


def _weights_in_a_deadlock(app, admin, database_url: str, deadlocks: int):  # type: ignore[no-untyped-def]
    """The answer to a PUT of two models' weights made the victim of ``deadlocks``
    deadlocks in a row."""
    import gevent

    a, b = (
        admin(
            "POST",
            "/models",
            json={"providerId": provider(admin, name=f"dl{i}")["id"], "systemName": "dl"},
        )[1]["id"]
        for i in range(2)
    )
    other = _Deadlocker(database_url, a, b)

    def put():  # type: ignore[no-untyped-def]
        with app.test_client() as client:
            body = {"weights": [{"modelId": a, "weight": 2}, {"modelId": b, "weight": 3}]}
            return client.put(
                "/api/admin/models/by-system-name/dl/weights", json=body, headers=ADMIN
            )

    request = gevent.spawn(put)
    try:
        for _ in range(deadlocks):
            other.once()
    finally:
        other.end()
    return request.get(timeout=30)


def test_a_deadlocked_admin_change_is_run_again_not_an_outage(
    app, admin, database_url, caplog
) -> None:  # type: ignore[no-untyped-def]
    # PostgreSQL gave the request's transaction up (40P01) and the admin API answered 503
    # "The database does not answer", logging an outage: it answered, and the change,
    # run again, goes through.
    from gateway import db

    if not db.is_postgres():
        pytest.skip("PostgreSQL's deadlocks")
    caplog.set_level(logging.INFO, logger="gateway.admin_api.blueprint")
    resp = _weights_in_a_deadlock(app, admin, database_url, 1)
    assert resp.status_code == 200, resp.get_json()
    assert caplog.text.count("dl/weights: deadlock; run again") == 1
    assert sorted(m["model"]["weight"] for m in resp.get_json()) == [2.0, 3.0]
    assert "does not answer" not in caplog.text and db.reachable()


def test_an_admin_change_deadlocked_every_time_is_a_503_that_says_so(
    app, admin, database_url, caplog
) -> None:  # type: ignore[no-untyped-def]
    from gateway import db

    if not db.is_postgres():
        pytest.skip("PostgreSQL's deadlocks")
    from gateway.db import CONFLICT_RETRIES

    caplog.set_level(logging.INFO, logger="gateway.admin_api.blueprint")
    resp = _weights_in_a_deadlock(app, admin, database_url, 1 + CONFLICT_RETRIES)
    assert caplog.text.count("dl/weights: deadlock; run again") == CONFLICT_RETRIES
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert "deadlock" in resp.get_json()["error"]
    assert "does not answer" not in resp.get_json()["error"] + caplog.text
    assert db.reachable()


def test_an_admin_change_past_the_lock_timeout_is_a_503_that_says_so(
    app, admin, database_url, caplog
) -> None:  # type: ignore[no-untyped-def]
    # A row held by another transaction past DB_TIMEOUT (PostgreSQL's lock_timeout,
    # 55P03): not run again, it would only wait as long again; not an outage either.
    import psycopg

    from gateway import db

    if not db.is_postgres():
        pytest.skip("PostgreSQL's lock_timeout")
    made = provider(admin)
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("UPDATE providers SET comment = 'held' WHERE id = %s", (made["id"],))
        started = time.monotonic()
        status, body = admin("PUT", f"/providers/{made['id']}", json={"comment": "mine"})
        waited = time.monotonic() - started
        other.execute("ROLLBACK")
    assert (status, body) == (
        503,
        {"error": "The change collided with another made at once (lock timeout); try again"},
    )
    assert waited < 2 * app.config["DB_TIMEOUT"]  # once, not again
    assert "does not answer" not in caplog.text and db.reachable()
