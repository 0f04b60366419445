"""POST /v1/embeddings through real gunicorn, the openai SDK and the fake upstream.

One gateway per backend serves the whole module; each test routes its own system
name, so tests keep apart. The record budget is tiny here (10 numbers) so that a
three-vector batch shows the cut.
"""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from tests.servers import Gateway

pytestmark = pytest.mark.server

GATEWAY_ENV = {"GATEWAY_EMBEDDING_RECORD_VALUES": "10", "GATEWAY_READ_TIMEOUT": "1.5"}


def vector(i: int, dims: int) -> list[float]:
    """The fake upstream's vector for input ``i`` (its own formula)."""
    return [round((i + 1) * 0.1 + d * 0.01, 4) for d in range(dims)]


def route(gw: Gateway, fake, script: str = "", provider_type: str = "openai") -> dict:  # type: ignore[no-untyped-def]
    name = f"emb-{uuid.uuid4().hex[:8]}"
    call_id = uuid.uuid4().hex
    remote = f"{name};id={call_id}{';' if script else ''}{script}"
    r = gw.setup_route(
        fake.url,
        provider_type=provider_type,
        system_name=name,
        remote_id=remote,
        model_type="embedding",
    )
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=r["key"], max_retries=0)
    return {**r, "name": name, "id": call_id, "client": client}


def final(gw: Gateway, name: str) -> dict:
    (row,) = gw.wait_final(1, table="embeddings", model=name)
    return row


@pytest.mark.parametrize("provider_type", ["openai", "azure", "ollama", "openai-responses"])
def test_sdk_gets_its_vectors_and_the_record_holds_them(
    module_gateway: Gateway, fake, provider_type: str
) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, provider_type=provider_type)
    answer = r["client"].embeddings.create(
        model=r["name"], input=["alpha beta", "gamma"], dimensions=4, user="u-1"
    )
    (sent,) = fake.log(r["id"])
    assert [item.embedding for item in answer.data] == [
        pytest.approx(vector(0, 4)),
        pytest.approx(vector(1, 4)),
    ]
    assert answer.usage.prompt_tokens == sent["usage"]["input_tokens"] == 3
    assert sent["body"]["dimensions"] == 4 and sent["body"]["user"] == "u-1"
    assert sent["body"]["encoding_format"] == "base64"  # the SDK's default: decoded for the record
    if provider_type == "azure":
        deployment = r["model"]["remoteId"]
        assert sent["path"].endswith("/embeddings") and deployment in sent["path"]
        assert sent["query"].startswith("api-version=")
        assert sent["headers"]["api-key"] == "upstream-secret"
    else:
        assert sent["path"] == "/v1/embeddings"
        assert sent["headers"]["authorization"] == "Bearer upstream-secret"

    row = final(module_gateway, r["name"])
    assert row["status"] == "completed" and row["error"] is None
    assert row["input"] == ["alpha beta", "gamma"]
    assert row["inputTokens"] == 3 and row["dimensions"] == 4
    assert row["embedding"] == [pytest.approx(vector(0, 4)), pytest.approx(vector(1, 4))]
    assert row["providerId"] == r["provider"]["id"] and row["modelId"] == r["model"]["id"]
    assert [a["outcome"] for a in row["attempts"]] == ["ok"]
    assert row["duration"] >= 0


def test_float_encoding_and_a_single_string(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "dims=3")
    answer = r["client"].embeddings.create(
        model=r["name"], input="one two three", encoding_format="float"
    )
    assert answer.data[0].embedding == pytest.approx(vector(0, 3))
    assert fake.log(r["id"])[0]["body"]["encoding_format"] == "float"
    row = final(module_gateway, r["name"])
    assert (row["input"], row["inputTokens"], row["dimensions"]) == ("one two three", 3, 3)
    assert row["embedding"] == [pytest.approx(vector(0, 3))]


def test_a_batch_past_the_budget_keeps_whole_vectors(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake)
    answer = r["client"].embeddings.create(model=r["name"], input=["a", "b", "c"], dimensions=4)
    assert len(answer.data) == 3  # the client always gets everything
    row = final(module_gateway, r["name"])
    assert row["dimensions"] == 4 and row["inputTokens"] == 3
    assert row["embedding"] == [pytest.approx(vector(0, 4)), pytest.approx(vector(1, 4))]


def test_unknown_token_count_is_recorded_as_unknown(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "usage=0")
    resp = r["client"].embeddings.with_raw_response.create(model=r["name"], input="x")
    assert resp.headers["content-type"].startswith("application/json")
    row = final(module_gateway, r["name"])
    assert row["status"] == "completed" and row["inputTokens"] == -1  # NULL in the table


def test_failover_to_the_next_provider(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "status=503")
    good = module_gateway.api(
        "POST",
        "/providers",
        json={"name": f"good-{r['id'][:8]}", "type": "openai", "baseUrl": fake.url + "/v1"},
    )
    model = module_gateway.api(
        "POST",
        "/models",
        json={
            "providerId": good["id"],
            "systemName": r["name"],
            "remoteId": f"emb;id={r['id']}-good",
            "modelType": "embedding",
        },
    )
    # Weight 0 sorts last: the failing provider is tried first, for sure.
    module_gateway.api(
        "PUT",
        f"/models/by-system-name/{r['name']}/weights",
        json={
            "weights": [
                {"modelId": r["model"]["id"], "weight": 1},
                {"modelId": model["id"], "weight": 0},
            ]
        },
    )
    answer = r["client"].embeddings.create(model=r["name"], input="x", encoding_format="float")
    assert len(answer.data) == 1
    row = final(module_gateway, r["name"])
    assert row["status"] == "completed" and row["providerId"] == good["id"]
    assert [(a["outcome"], a.get("status")) for a in row["attempts"]] == [
        ("http", 503),
        ("http", 503),
        ("ok", 200),
    ]


def test_every_candidate_failing_is_a_502_and_a_failed_record(
    module_gateway: Gateway, fake
) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "status=500")
    with pytest.raises(openai.APIStatusError) as info:
        r["client"].embeddings.create(model=r["name"], input="x")
    assert info.value.status_code == 502
    assert info.value.body["code"] == "all_providers_failed"
    row = final(module_gateway, r["name"])
    assert row["status"] == "failed" and "All upstream providers failed" in row["error"]
    assert [a["status"] for a in row["attempts"]] == [500, 500]
    assert row["embedding"] is None and row["inputTokens"] == -1
    assert len(fake.log(r["id"])) == 2


def test_an_upstream_4xx_is_passed_on_as_sent(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "status=400")
    with pytest.raises(openai.BadRequestError) as info:
        r["client"].embeddings.create(model=r["name"], input="x")
    assert info.value.body["message"] == "fake error 400"
    row = final(module_gateway, r["name"])
    assert row["status"] == "failed" and len(row["attempts"]) == 1


def test_an_upstream_that_never_answers_is_a_504(module_gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "header_delay=2")  # READ_TIMEOUT is 1.5 s here
    with pytest.raises(openai.APIStatusError) as info:
        r["client"].embeddings.create(model=r["name"], input="x")
    assert info.value.status_code == 504
    row = final(module_gateway, r["name"])
    assert row["status"] == "failed"
    assert [a["outcome"] for a in row["attempts"]] == ["timeout", "timeout"]


def test_a_client_that_leaves_while_waiting_is_aborted_with_the_answer(
    module_gateway: Gateway, fake
) -> None:  # type: ignore[no-untyped-def]
    r = route(module_gateway, fake, "header_delay=0.6")
    impatient = r["client"].with_options(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        impatient.embeddings.create(model=r["name"], input="a b", dimensions=2)
    assert time.monotonic() - started < 0.6  # it left before the answer came
    row = final(module_gateway, r["name"])
    assert row["status"] == "aborted" and "client disconnected" in row["error"]
    assert row["embedding"] == [pytest.approx(vector(0, 2))] and row["inputTokens"] == 2
    (sent,) = fake.log(r["id"])
    assert sent["outcome"] == "complete"
