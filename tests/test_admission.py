"""Admission on /v1 (Flask's test client, the fake upstream behind it).

Order: authenticate, validate, limit, route. A refused call is a 429 in the caller's
shape with Retry-After, is neither sent upstream nor recorded, and is counted in
/metrics; every answer to a known key carries the X-RateLimit-* headers; TPM is charged
with the provider's real tokens once the call is over; per-model limits apply only
where configured. Each test makes its own key, so the limits are its own. The same
rules across gunicorn workers and instances are in tests/test_server_instances.py.
"""

from __future__ import annotations

import json
import uuid

import gevent
import pytest

from gateway import metrics
from tests import test_proxy
from tests.test_proxy import ADMIN, CHAT, EMBEDDINGS, MESSAGES, RESPONSES, VALID, error_of, post
from tests.test_proxy import recorded as recorded_calls

HEADERS = (
    "X-RateLimit-Limit-RPM",
    "X-RateLimit-Remaining-RPM",
    "X-RateLimit-Limit-TPM",
    "X-RateLimit-Remaining-TPM",
)


setup = test_proxy.route  # the fixture: models fake and emb on provider "fake", a call id


def new_key(client, **limits: object) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    made = client.post("/api/admin/apiKey", json=limits, headers=ADMIN).get_json()
    return made["key"], made["id"]


def sent(fake, setup: dict) -> int:  # type: ignore[no-untyped-def]
    return len(fake.log(setup["id"]))


def rejections(key_id: int, kind: str) -> float:
    """Refusals counted so far (metrics live as long as the process: compare before/after)."""
    return metrics.REJECTIONS.labels(str(key_id), "unknown", kind)._value.get()


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES, EMBEDDINGS])
def test_rpm_refuses_past_the_limit_in_the_callers_shape_and_goes_nowhere(
    client, fake, setup, path
) -> None:  # type: ignore[no-untyped-def]
    key, key_id = new_key(client, rpmLimit=3)
    counted = rejections(key_id, "rpm")
    answers = [post(client, path, VALID[path], key) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert [a.headers["X-RateLimit-Remaining-RPM"] for a in answers] == ["2", "1", "0", "0", "0"]
    refused = answers[-1]
    kind, message, _ = error_of(refused, path)
    assert kind == "rate_limit_error" and message.endswith("too many requests per minute")
    if path != MESSAGES:
        assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["Retry-After"] == "20"  # one request back every 20 s
    assert refused.headers["X-RateLimit-Limit-RPM"] == "3"
    assert sent(fake, setup) == 3 and recorded_calls() == 3
    assert rejections(key_id, "rpm") == counted + 2


def test_every_answer_to_a_known_key_has_the_headers_and_a_401_has_none(
    client, fake, setup
) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client, rpmLimit=7, tpmLimit=900)
    answers = {
        "ok": post(client, CHAT, VALID[CHAT], key),
        "bad body": post(client, CHAT, {"model": "fake"}, key),
        "bad request id": post(client, CHAT, VALID[CHAT], key, **{"X-NexusGate-ReqId": "a b"}),
        "unknown model": post(client, CHAT, {**VALID[CHAT], "model": "nope"}, key),
    }
    assert [a.status_code for a in answers.values()] == [200, 400, 400, 404]
    for what, answer in answers.items():
        assert all(name in answer.headers for name in HEADERS), what
        assert answer.headers["X-RateLimit-Limit-TPM"] == "900", what
    # Validation comes before the limit: a bad body takes nothing; a routing miss does.
    assert answers["bad body"].headers["X-RateLimit-Remaining-RPM"] == "6"
    assert answers["unknown model"].headers["X-RateLimit-Remaining-RPM"] == "5"
    unknown_key = post(client, CHAT, VALID[CHAT], "sk-" + "0" * 32)
    assert unknown_key.status_code == 401
    assert not any(name in unknown_key.headers for name in HEADERS)


def test_tpm_is_checked_before_and_charged_with_the_real_tokens_after(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, key_id = new_key(client, tpmLimit=10)
    counted = rejections(key_id, "tpm")
    first = post(client, CHAT, VALID[CHAT], key)
    (call,) = fake.log(setup["id"])
    tokens = call["usage"]["input_tokens"] + call["usage"]["output_tokens"]
    assert tokens == 9 and first.headers["X-RateLimit-Remaining-TPM"] == "10"  # checked, not taken
    assert post(client, CHAT, VALID[CHAT], key).status_code == 200  # 1 token left: still > 0
    refused = post(client, CHAT, VALID[CHAT], key)
    assert refused.status_code == 429
    assert error_of(refused, CHAT)[1].endswith("token quota exhausted")
    assert 47 <= int(refused.headers["Retry-After"]) <= 49  # a debt of 8 at 10/60 a second
    usage = client.get(f"/api/admin/apiKey/{key}/usage", headers=ADMIN).get_json()
    assert usage["usage"]["tpm"]["current"] == 18 and usage["usage"]["tpm"]["remaining"] == 0
    assert usage["usage"]["rpm"]["current"] == 2  # the refused call took no request
    assert rejections(key_id, "tpm") == counted + 1


@pytest.mark.parametrize(
    "shape",
    ["json", "json with a slot", "json with a request id", "json with a budget", "stream"],
)
def test_a_json_call_owing_only_tokens_is_charged_once_its_answer_is_written(
    client, fake, setup, shape
) -> None:  # type: ignore[no-untyped-def]
    """A plain JSON call's tokens go to TPM when the server closes its answer (it has
    been written); a call that holds a slot or a request id, or whose key has a budget,
    settles them all before its answer goes, and a stream before its last event."""
    # 60 a minute: the bucket refills one token a second, so the 9 charged still read as
    # 9 for up to a second (at 1,000 a minute, for 60 ms: CI at load 5 read 8).
    limits: dict = {"tpmLimit": 60}
    body, headers = VALID[CHAT], {}
    if shape == "json with a slot":
        limits["maxConcurrent"] = 5
    elif shape == "json with a request id":
        headers["X-NexusGate-ReqId"] = uuid.uuid4().hex
    elif shape == "json with a budget":  # its next call, anywhere, must find the spend
        limits["budgetUsd"] = 100
    elif shape == "stream":
        body = {**body, "stream": True}
    key, _ = new_key(client, **limits)
    data = json.dumps(body).encode()
    headers["Authorization"] = f"Bearer {key}"
    answer = client.post(CHAT, data=data, headers=headers, content_type="application/json")
    assert answer.status_code == 200
    answer.get_data()  # written whole, not closed yet

    def charged() -> int:
        usage = client.get(f"/api/admin/apiKey/{key}/usage", headers=ADMIN).get_json()
        return usage["usage"]["tpm"]["current"]

    assert charged() == (0 if shape == "json" else 9)
    answer.close()
    assert charged() == 9


def test_a_failed_call_is_charged_only_what_the_upstream_reported(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client, tpmLimit=10)
    failed = post(client, CHAT, VALID[CHAT], key, **{"X-Fake-Script": "status=500"})
    assert failed.status_code == 502
    usage = client.get(f"/api/admin/apiKey/{key}/usage", headers=ADMIN).get_json()["usage"]
    assert usage["tpm"]["current"] == 0 and usage["rpm"]["current"] == 1


def test_max_concurrent_counts_calls_in_flight_and_gives_slots_back(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, key_id = new_key(client, maxConcurrent=1)
    counted = rejections(key_id, "concurrency")
    slow = gevent.spawn(
        post, client, CHAT, VALID[CHAT], key, **{"X-Fake-Script": "first_delay=0.5"}
    )
    gevent.sleep(0.2)
    busy = post(client, CHAT, VALID[CHAT], key)
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert "1 at once" in error_of(busy, CHAT)[1]
    assert all(name in busy.headers for name in HEADERS)
    assert slow.get().status_code == 200
    assert post(client, CHAT, VALID[CHAT], key).status_code == 200  # the slot came back
    # A call refused before it opened gives its slot back too.
    assert post(client, CHAT, {**VALID[CHAT], "model": "nope"}, key).status_code == 404
    assert post(client, CHAT, VALID[CHAT], key).status_code == 200
    assert rejections(key_id, "concurrency") == counted + 1


def test_a_per_model_limit_applies_to_its_model_and_names_it(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, key_id = new_key(client)
    counted = rejections(key_id, "model")
    limit = {"identifier": "fake", "limit": 2, "refill": 0.1}
    assert client.post("/api/admin/ratelimits", json=limit, headers=ADMIN).status_code == 201
    answers = [post(client, CHAT, VALID[CHAT], key) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert error_of(answers[-1], CHAT)[1] == "Rate limit exceeded for model 'fake'"
    assert answers[-1].headers["Retry-After"] == "10"  # one call back every 10 s
    # Pinning a provider does not escape the model's limit; other models are not limited.
    assert post(client, CHAT, {**VALID[CHAT], "model": "fake@fake"}, key).status_code == 429
    assert post(client, EMBEDDINGS, VALID[EMBEDDINGS], key).status_code == 200
    # Per key: another key has its own bucket.
    assert post(client, CHAT, VALID[CHAT], new_key(client)[0]).status_code == 200
    assert rejections(key_id, "model") == counted + 2


def test_a_limit_on_a_pinned_provider_adds_to_the_models(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    for identifier, limit in (("fake@fake", 1), ("fake", 3)):
        body = {"identifier": identifier, "limit": limit, "refill": 0.1}
        client.post("/api/admin/ratelimits", json=body, headers=ADMIN)
    pinned = [post(client, CHAT, {**VALID[CHAT], "model": "fake@fake"}, key) for _ in range(2)]
    assert [a.status_code for a in pinned] == [200, 429]
    assert "fake@fake" in error_of(pinned[1], CHAT)[1]
    # The system name's bucket was taken by the pinned call too: 2 of its 3 are left.
    assert [post(client, CHAT, VALID[CHAT], key).status_code for _ in range(3)] == [200, 200, 429]


def test_default_limits_every_model_without_its_own_and_nothing_is_limited_unless_set(
    client, fake, setup
) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client, rpmLimit=1000)
    # No hidden per-model default (NexusGate's lets 10 through, then 1 a second).
    assert {post(client, CHAT, VALID[CHAT], key).status_code for _ in range(15)} == {200}
    body = {"identifier": "default", "limit": 1, "refill": 0.1}
    client.post("/api/admin/ratelimits", json=body, headers=ADMIN)
    key, _ = new_key(client, rpmLimit=1000)
    assert [post(client, EMBEDDINGS, VALID[EMBEDDINGS], key).status_code for _ in range(2)] == [
        200,
        429,
    ]
    own = {"identifier": "fake", "limit": 5, "refill": 0.1}
    client.post("/api/admin/ratelimits", json=own, headers=ADMIN)
    assert {post(client, CHAT, VALID[CHAT], key).status_code for _ in range(5)} == {200}


def test_rejections_are_counted_in_metrics(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    comment = f"team-{uuid.uuid4().hex[:6]}"  # labels of this test's own
    key, key_id = new_key(client, rpmLimit=1, comment=comment)
    post(client, CHAT, VALID[CHAT], key)
    post(client, CHAT, VALID[CHAT], key)
    text = client.get("/metrics").get_data(as_text=True)
    wanted = (
        f'nexusgate_rate_limit_rejections_total{{api_key_comment="{comment}",api_key_id="{key_id}",'
        'limit_type="rpm"} 1.0'
    )
    assert wanted in text
    assert 'nexusgate_completions_total{api_format="openai-chat"' in text
    assert json.dumps(key) not in text  # keys are labelled by id and comment, never by value


def test_budget_refusals_are_counted_in_metrics_as_the_429s_are(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    comment = f"team-{uuid.uuid4().hex[:6]}"  # labels of this test's own
    key, key_id = new_key(client, budgetUsd=0, comment=comment)  # nothing to spend
    labels = (str(key_id), comment, "budget")
    assert metrics.REJECTIONS.labels(*labels)._value.get() == 0
    answers = [post(client, path, VALID[path], key) for path in (CHAT, MESSAGES)]
    assert [a.status_code for a in answers] == [402, 402]
    assert error_of(answers[1], MESSAGES)[0] == "billing_error"
    assert sent(fake, setup) == 0
    text = client.get("/metrics").get_data(as_text=True)
    wanted = (
        f'nexusgate_rate_limit_rejections_total{{api_key_comment="{comment}",api_key_id="{key_id}",'
        'limit_type="budget"} 2.0'
    )
    assert wanted in text
