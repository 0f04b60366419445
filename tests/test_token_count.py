"""``POST /v1/messages/count_tokens``: the provider's count, or an estimate, never a record.

The estimate first, on prompts whose count is worked out by hand; then the route over
HTTP (Flask's test client, the fake upstream behind it), which counts the prompt's
words + 3 as Anthropic's endpoint would, and hostile bodies thrown at it (no 5xx,
nothing recorded); then the anthropic SDK through gunicorn.
"""

from __future__ import annotations

import json

import anthropic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import metrics, token_count
from gateway.db import database
from gateway.errors import InvalidRequest
from gateway.models import Completion
from gateway.recorder import recorder
from tests import fuzz_support as f
from tests.servers import ADMIN_SECRET, Gateway
from tests.test_fuzz_public import FIELDS, MESSAGES

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
PATH = "/v1/messages/count_tokens"
ASK = {"messages": [{"role": "user", "content": "how many tokens is this"}]}


def ir(body: dict) -> dict:
    return token_count.parse({"model": "m", **body})


# -- the estimate -------------------------------------------------------------------


def test_the_estimate_counts_text_by_script_images_messages_and_tools() -> None:
    # 24 ASCII characters: 6 tokens; +3 per message and +3 for the request.
    assert token_count.estimate(ir(ASK)) == 6 + 3 + 3
    # CJK: a token a character (8 here, the full-width question mark too); other
    # non-ASCII: two characters a token.
    chinese = "今天天气怎么样\uff1f"
    assert token_count.estimate(ir({"messages": [{"role": "user", "content": chinese}]})) == 8 + 6
    assert token_count.estimate(ir({"messages": [{"role": "user", "content": "éèàç"}]})) == 2 + 6
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    pic = ir({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "abcd"}]}]})
    assert token_count.estimate(pic) == 1600 + 1 + 6
    tools = ir(
        {
            **ASK,
            "system": "be brief",  # 8 characters: 2 tokens
            "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        }
    )
    schema = json.dumps(tools["tools"], separators=(",", ":"))
    assert token_count.estimate(tools) == 6 + 2 + -(-len(schema) // 4) + 6 + 300


def test_the_estimate_reads_tool_calls_and_results_inside_the_conversation() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "abcd"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "c", "name": "look", "input": {"q": 1}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "c", "content": "12345678"}],
            },
        ]
    }
    # abcd: 1; "look": 1, '{"q":1}': 2; the result: 2; 3 messages + the request: 12.
    assert token_count.estimate(ir(body)) == 1 + 1 + 2 + 2 + 12


def test_a_count_is_checked_as_a_messages_body_without_max_tokens() -> None:
    assert token_count.parse({"model": "m", **ASK})["messages"]
    with pytest.raises(InvalidRequest, match="messages is required"):
        token_count.parse({"model": "m"})


# -- the route -----------------------------------------------------------------------


@pytest.fixture
def routes(client, fake) -> dict:  # type: ignore[no-untyped-def]
    """``claude`` on an anthropic provider, ``gpt`` on an openai one, ``both`` on both."""
    ids = {}
    for name, kind, url in (("a", "anthropic", fake.url), ("o", "openai", f"{fake.url}/v1")):
        provider = client.post(
            "/api/admin/providers",
            json={"name": name, "type": kind, "baseUrl": url, "apiKey": "upstream-key"},
            headers=ADMIN,
        ).get_json()
        ids[name] = provider["id"]
    for system, provider, weight in (
        ("claude", "a", 1),
        ("gpt", "o", 1),
        ("both", "o", 1000),
        ("both", "a", 1),
    ):
        client.post(
            "/api/admin/models",
            json={"providerId": ids[provider], "systemName": system, "weight": weight},
            headers=ADMIN,
        )
    # Limits no test reaches (the fuzzer counts hundreds of times with this key).
    limits = {"rpmLimit": 10**9, "tpmLimit": 10**9}
    key = client.post("/api/admin/apiKey", json=limits, headers=ADMIN).get_json()["key"]
    return {"key": key}


def count(client, key: str | None, body: object, **headers: str):  # type: ignore[no-untyped-def]
    if key is not None:
        headers["x-api-key"] = key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(PATH, data=data, headers=headers, content_type="application/json")


def test_an_anthropic_provider_counts_and_nothing_is_recorded(client, fake, routes) -> None:  # type: ignore[no-untyped-def]
    fake.reset()
    resp = count(client, routes["key"], {"model": "claude", **ASK}, **{"anthropic-beta": "x"})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"input_tokens": 5 + 3}  # the fake's count: words + 3
    assert resp.headers["X-Token-Count-Source"] == "provider"
    (sent,) = fake.log()
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["body"] == {"model": "claude", **ASK}  # as the client sent it
    assert sent["headers"]["x-api-key"] == "upstream-key"  # the provider's key, not the client's
    assert sent["headers"]["anthropic-beta"] == "x"
    assert recorder.flush(5)
    with database.connection_context():
        assert Completion.select().count() == 0


def test_other_provider_types_are_estimated_and_say_so(client, fake, routes) -> None:  # type: ignore[no-untyped-def]
    fake.reset()
    resp = count(client, routes["key"], {"model": "gpt", **ASK})
    assert resp.get_json() == {"input_tokens": token_count.estimate(ir(ASK))}
    assert resp.headers["X-Token-Count-Source"] == "estimate"
    assert fake.log() == []
    # Among several candidates, an anthropic one is asked whatever the weights say.
    resp = count(client, routes["key"], {"model": "both", **ASK})
    assert resp.headers["X-Token-Count-Source"] == "provider"


def test_a_provider_that_cannot_count_is_estimated_one_that_refuses_is_passed_on(
    client, fake, routes
) -> None:  # type: ignore[no-untyped-def]
    down = count(
        client, routes["key"], {"model": "claude", **ASK}, **{"X-Fake-Script": "status=529"}
    )
    assert down.status_code == 200
    assert down.headers["X-Token-Count-Source"] == "estimate"
    refused = count(client, routes["key"], {"model": "claude", "stream": True, **ASK})
    assert refused.status_code == 400  # the fake, as Anthropic, refuses a field it lacks
    assert refused.get_json()["type"] == "error"
    assert "stream: Extra inputs" in refused.get_json()["error"]["message"]


@pytest.mark.parametrize(
    ("key", "body", "status", "kind"),
    [
        (None, {"model": "claude", **ASK}, 401, "authentication_error"),
        ("good", {"model": "claude"}, 400, "invalid_request_error"),
        ("good", {"model": "claude", "messages": "hi"}, 400, "invalid_request_error"),
        ("good", b"{not json", 400, "invalid_request_error"),
        ("good", {"model": "nobody", **ASK}, 404, "not_found_error"),
    ],
)
def test_refusals_in_anthropics_shape(
    client, fake, routes, key: str | None, body: object, status: int, kind: str
) -> None:  # type: ignore[no-untyped-def]
    fake.reset()
    resp = count(client, routes["key"] if key else None, body)
    assert resp.status_code == status
    assert resp.get_json()["type"] == "error" and resp.get_json()["error"]["type"] == kind
    assert fake.log() == []


def test_counts_take_from_the_keys_rpm_and_nothing_from_its_tpm(client, fake, routes) -> None:  # type: ignore[no-untyped-def]
    made = client.post("/api/admin/apiKey", json={"rpmLimit": 2}, headers=ADMIN).get_json()
    key, key_id = made["key"], made["id"]
    counted = metrics.REJECTIONS.labels(str(key_id), "unknown", "rpm")._value.get()
    answers = [count(client, key, {"model": "claude", **ASK}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining-RPM"] for a in answers] == ["1", "0", "0"]
    assert {a.headers["X-RateLimit-Remaining-TPM"] for a in answers} == {"50000"}
    refused = answers[-1]
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert metrics.REJECTIONS.labels(str(key_id), "unknown", "rpm")._value.get() == counted + 1
    assert recorder.flush(5)
    with database.connection_context():
        assert Completion.select().count() == 0


@pytest.mark.server
def test_the_anthropic_sdk_counts_through_gunicorn(gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    route = gateway.setup_route(fake.url, provider_type="anthropic", system_name="claude")
    other = gateway.setup_route(fake.url, provider_type="openai", system_name="gpt")
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=route["key"], max_retries=0)
    counted = sdk.messages.count_tokens(model="claude", **ASK)
    assert counted.input_tokens == 8
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=other["key"], max_retries=0)
    raw = sdk.messages.with_raw_response.count_tokens(model="gpt", **ASK)
    assert raw.headers["X-Token-Count-Source"] == "estimate"
    assert raw.parse().input_tokens == 12
    assert gateway.records() == []


def test_fuzz_count_tokens_never_fails_and_never_records(client, fake, routes) -> None:  # type: ignore[no-untyped-def]
    fields = {k: v for k, v in FIELDS[MESSAGES].items() if k not in ("max_tokens", "stream")}
    fields["model"] = st.sampled_from(["claude", "gpt", "both", "nobody"])
    statuses: list[int] = []

    @given(f.body_bytes({"model": "claude", **ASK}, fields), f.headers)
    def one(raw: bytes, headers: dict[str, str]) -> None:
        resp = client.post(
            PATH,
            data=raw,
            headers={**headers, "x-api-key": routes["key"]},
            content_type="application/json",
        )
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300])
        if resp.status_code == 200:
            assert isinstance(resp.get_json()["input_tokens"], int)
        statuses.append(resp.status_code)

    f.run(one, f.EXAMPLES_SERVER)
    assert 200 in statuses and 400 in statuses
    assert recorder.flush(5)
    with database.connection_context():
        assert Completion.select().count() == 0
