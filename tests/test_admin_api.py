"""The admin JSON API: NexusGate's paths and fields, validation, secrets never in full."""

from __future__ import annotations

import pytest

from gateway.exchange import Exchange
from gateway.models import ApiKey
from gateway.recorder import snapshot, write_rows
from tests.servers import ADMIN_SECRET

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


@pytest.fixture
def admin(client):  # type: ignore[no-untyped-def]
    """Call the admin API; return (status, json)."""

    def call(method: str, path: str, **kwargs: object) -> tuple[int, object]:
        resp = client.open(f"/api/admin{path}", method=method, headers=ADMIN, **kwargs)
        return resp.status_code, resp.get_json()

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
    assert status == 201, data
    return data


def test_the_admin_secret_is_required(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/admin/").status_code == 401
    assert client.get("/api/admin/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/admin/", headers={"x-api-key": ADMIN_SECRET}).get_json() is True
    assert client.get("/api/admin/", headers=ADMIN).get_json() is True


def test_key_lifecycle_and_the_key_is_shown_once(admin, client) -> None:  # type: ignore[no-untyped-def]
    status, created = admin(
        "POST",
        "/apiKey",
        json={"comment": "app", "rpmLimit": 10, "expiresAt": "2099-01-01T00:00:00Z"},
    )
    assert status == 201
    key = created["key"]
    assert key.startswith("sk-") and len(key) == 35
    assert (created["rpmLimit"], created["tpmLimit"], created["comment"]) == (10, 50000, "app")
    assert created["expiresAt"] == "2099-01-01T00:00:00.000Z"

    status, listed = admin("GET", "/apiKey")
    assert [k["id"] for k in listed] == [created["id"]]
    assert key not in str(listed) and listed[0]["key"] == ApiKey.hint(key)
    assert admin("GET", f"/apiKey/{key}")[1]["id"] == created["id"]
    assert admin("GET", f"/apiKey/{created['id']}")[1]["comment"] == "app"

    assert admin("PUT", f"/apiKey/{key}/ratelimit", json={"rpmLimit": 5, "tpmLimit": 100})[0] == 200
    assert admin("GET", f"/apiKey/{key}")[1]["tpmLimit"] == 100

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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rpmLimit": 0}, "rpmLimit must be at least 1"),
        ({"tpmLimit": "many"}, "tpmLimit must be an integer"),
        ({"expiresAt": "tomorrow"}, "expiresAt must be an ISO 8601 date-time"),
        ({"comment": 3}, "comment must be a str"),
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
    assert status == 201 and first["created"] is True and first["key"].startswith("sk-")
    status, again = admin("PUT", "/apiKey/by-external-id/ns%2Fapp", json={"rpmLimit": 7})
    assert status == 200 and again["created"] is False and again["id"] == first["id"]
    assert first["key"] not in str(again)
    assert admin("GET", "/apiKey/by-external-id/ns%2Fapp")[1]["rpmLimit"] == 7
    assert [k["externalId"] for k in admin("GET", "/apiKey/managed")[1]] == ["ns/app"]
    admin("DELETE", f"/apiKey/{first['id']}")
    # Ensuring a revoked key brings it back.
    admin("PUT", "/apiKey/by-external-id/ns%2Fapp", json={})
    assert admin("GET", "/apiKey/by-external-id/ns%2Fapp")[1]["revoked"] is False


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
    assert status == 201 and m1["weight"] == 1.0 and m1["modelType"] == "chat"
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
    admin("DELETE", f"/models/{other['id']}")
    assert {m["id"] for m in client.get("/v1/models").get_json()["data"]} == {"gpt"}
    # Re-creating a deleted model brings the row back rather than failing.
    again = admin("POST", "/models", json={"providerId": p1["id"], "systemName": "other"})[1]
    assert again["id"] == other["id"] and again["deleted"] is False


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
    assert admin("GET", "/usage")[1] == {"total_prompt_tokens": 20, "total_completion_tokens": 1}
