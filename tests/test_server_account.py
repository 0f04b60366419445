"""The account through gunicorn and the official SDKs: tokens, cost, ids, what was delivered.

Each client format calls each provider format while the fake upstream reports cache
reads, cache writes (1-hour ones too, for Anthropic), reasoning tokens, its own response
id and request id; the record must hold exactly those tokens, a cost worked out here
in exact fractions, and those ids. A price changed afterwards leaves the records as
they were; an unpriced model costs null. A client that hangs up after k text pieces
has ``delivered.text`` within one event of what its SDK gave it, while the record keeps
the whole answer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import socket
import time
import uuid
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import anthropic
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import pairs_support as p
from tests.pairs_support import ANTHROPIC, CHAT, CLIENTS, RESPONSES
from tests.servers import Gateway, post_on_socket, wait_until

pytestmark = pytest.mark.server

# A client that stops reading is dropped. 3 s, not 1: the 16 MB answer below must have
# arrived whole first, which took more than a second on a loaded machine (CI, load 6-8).
GATEWAY_ENV = {"GATEWAY_CLIENT_WRITE_TIMEOUT": "3"}
EXACT = Fraction(1, 10**12)
PATHS = {CHAT: "/v1/chat/completions", ANTHROPIC: "/v1/messages", RESPONSES: "/v1/responses"}
CACHE = "cache=3;cache_write=2;cache_1h=1;reasoning=2;chunks=4"
# Usage shapes: (provider type, fake script, its prices).
SHAPES = {
    "openai": ("openai", "", {"inputPrice": 2.5, "outputPrice": 10, "cacheReadPrice": 1.25}),
    "deepseek": (
        "openai",
        "usage_style=deepseek",
        {"inputPrice": 0.28, "outputPrice": 0.42, "cacheReadPrice": 0.028},
    ),
    "anthropic": (
        "anthropic",
        "",
        {"inputPrice": 3, "outputPrice": 15, "cacheReadPrice": 0.3, "cacheWritePrice": 3.75},
    ),
    "responses": (
        "openai-responses",
        "",
        {"inputPrice": 1.1, "outputPrice": 4.4, "cacheReadPrice": 0.275},
    ),
    "azure": ("azure", "", {"inputPrice": 2, "outputPrice": 8}),
}


@pytest.fixture(scope="module")
def routes(module_gateway: Gateway, fake) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """A priced model per usage shape, on the fake upstream."""
    out = {}
    for shape, (provider_type, _, prices) in SHAPES.items():
        route = module_gateway.setup_route(
            fake.url, provider_type=provider_type, system_name=f"acct-{shape}"
        )
        module_gateway.api("PUT", f"/models/{route['model']['id']}", json=prices)
        out[shape] = route
    return out


def sdk(gw: Gateway, client: str, key: str) -> Any:
    if client == ANTHROPIC:
        return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def record(gw: Gateway, key_id: int) -> dict:
    (row,) = gw.wait_final(1, apiKeyId=key_id)
    assert row == gw.api("GET", f"/completions/{row['id']}")  # the listing carries it all
    return row


def expected_tokens(shape: str, sent: dict) -> dict:
    """What the fake reported, in the record's token classes (None: it did not say)."""
    return {
        "input": sent["usage"]["input_tokens"],  # the fake's count includes the cache
        "output": sent["usage"]["output_tokens"],
        "cacheRead": 3,
        "cacheWrite": None if shape == "deepseek" else 2,  # DeepSeek does not report writes
        "cacheWrite1h": 1 if shape == "anthropic" else None,
        "reasoning": None if shape == "anthropic" else 2,  # Anthropic does not split it out
    }


def expected_cost(tokens: dict, prices: dict) -> dict[str, Fraction]:
    """The cost, worked out by hand: per million tokens, cache prices falling back to input."""

    def price(name: str) -> Fraction:
        return Fraction(str(prices.get(name, prices["inputPrice"])))

    write, hour = tokens["cacheWrite"] or 0, tokens["cacheWrite1h"] or 0
    uncached = tokens["input"] - tokens["cacheRead"] - write
    parts = {
        "input": uncached * price("inputPrice"),
        "cacheRead": tokens["cacheRead"] * price("cacheReadPrice"),
        "cacheWrite": (write - hour) * price("cacheWritePrice") + hour * 2 * price("inputPrice"),
        "output": tokens["output"] * price("outputPrice"),
    }
    parts = {k: v / 1_000_000 for k, v in parts.items()}
    return {**parts, "total": sum(parts.values())}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("client", CLIENTS)
def test_tokens_cost_and_ids_are_exactly_what_the_provider_reported(
    module_gateway: Gateway, fake, routes, client: str, shape: str, stream: bool
) -> None:  # type: ignore[no-untyped-def]
    gw = module_gateway
    _, style, prices = SHAPES[shape]
    key = gw.api("POST", "/apiKey", json={"comment": "account"})
    call, answer_id = uuid.uuid4().hex, f"up-{uuid.uuid4().hex[:8]}"
    script = f"id={call};{CACHE};{style};response_id={answer_id};request_id=rq-{call}"
    body = p.request(client, f"acct-{shape}", tools=False)
    answer = p.call(client, sdk(gw, client, key["key"]), body, stream, {"X-Fake-Script": script})
    (sent,) = fake.log(call)
    row = record(gw, key["id"])

    assert row["status"] == "completed"
    tokens = expected_tokens(shape, sent)
    assert row["tokens"] == tokens
    assert answer.usage[:2] == (tokens["input"], tokens["output"])  # the client saw the same
    cost, exact = row["cost"], expected_cost(tokens, prices)
    for name, value in exact.items():
        assert abs(Fraction(cost[name]) - value) <= EXACT, (name, cost[name], float(value))
    missing = [n for n in ("cacheRead", "cacheWrite") if f"{n}Price" not in prices]
    assert cost["prices"]["fallbacks"] == missing
    assert cost["currency"] == "USD"

    assert row["upstreamId"] == answer_id == sent["response_id"]
    (attempt,) = row["attempts"]
    # The fake sends it under the provider type's own header (request-id for Anthropic,
    # apim-request-id for Azure, x-request-id for OpenAI's): each was read.
    assert attempt["requestId"] == sent["request_id"] == f"rq-{call}"
    if stream:
        assert row["delivered"]["text"] == answer.text == row["completion"][0]["content"]
        assert row["delivered"]["events"] > 0
    else:
        assert row["delivered"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("shape", ["openai", "anthropic", "responses"])
@pytest.mark.parametrize("client", CLIENTS)
def test_counts_and_a_model_name_no_record_can_hold_are_stored_unknown(
    module_gateway: Gateway, fake, routes, client: str, shape: str, stream: bool
) -> None:  # type: ignore[no-untyped-def]
    # A faulty upstream: an input count past any column's integer (PostgreSQL's ends at
    # 2**31 - 1, SQLite's at 2**63 - 1), a negative output count, a 300-character model
    # name (the column holds 255). The database refused such a final row, and the call
    # stayed pending while its process lived; a negative count was priced as a credit.
    gw = module_gateway
    key = gw.api("POST", "/apiKey", json={"comment": "faulty counts"})
    call = uuid.uuid4().hex
    named = "m" * 300
    script = f"id={call};input_tokens={2**63};output_tokens=-1000000;response_model={named}"
    body = {**p.request(client, f"acct-{shape}", tools=False), "stream": stream}
    answer = requests.post(
        gw.url + PATHS[client],
        json=body,
        headers={"Authorization": f"Bearer {key['key']}", "X-Fake-Script": script},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text  # the client gets what was answered
    assert "tok4" in answer.text
    (sent,) = fake.log(call)
    assert sent["outcome"] == "complete"
    row = record(gw, key["id"])

    assert row["status"] == "completed"
    assert row["tokens"]["input"] is None and row["tokens"]["output"] is None
    assert row["cost"] is None  # never a credit, never 0
    assert row["responseModel"] == named[:255]
    assert row["completion"][0]["content"] == "".join(f"tok{i} " for i in range(5))


def test_a_price_change_leaves_old_records_as_they_were(
    module_gateway: Gateway, fake, routes
) -> None:  # type: ignore[no-untyped-def]
    gw = module_gateway
    route = gw.setup_route(fake.url, system_name="acct-reprice")
    model = route["model"]["id"]
    gw.api("PUT", f"/models/{model}", json={"inputPrice": 1, "outputPrice": 2})
    key = gw.api("POST", "/apiKey", json={"comment": "reprice"})
    client = sdk(gw, CHAT, key["key"])
    client.chat.completions.create(
        model="acct-reprice", messages=[{"role": "user", "content": "a b"}]
    )
    (first,) = gw.wait_final(1, apiKeyId=key["id"])
    gw.api("PUT", f"/models/{model}", json={"inputPrice": 100, "outputPrice": 200})
    client.chat.completions.create(
        model="acct-reprice", messages=[{"role": "user", "content": "a b"}]
    )
    # In the order the calls came: ids follow the order the recorder wrote them in.
    rows = sorted(gw.wait_final(2, apiKeyId=key["id"]), key=lambda r: r["createdAt"])
    assert rows[0] == {**first, "updatedAt": rows[0]["updatedAt"]}  # not one field moved
    assert rows[0]["cost"]["prices"]["input"] == 1.0
    assert rows[1]["cost"]["prices"]["input"] == 100.0
    assert rows[1]["cost"]["total"] == pytest.approx(rows[0]["cost"]["total"] * 100)

    # /metrics counts what the records say each call cost (worker processes' counters
    # merged; another worker's within metrics.FLUSH_EVERY of its call, hence the wait).
    def spent() -> dict[tuple[str, str | None], float]:
        text = requests.get(f"{gw.url}/metrics").text
        return {
            (s.name, s.labels.get("model")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    total = sum(row["cost"]["total"] for row in rows)
    output = sum(row["cost"]["output"] for row in rows)
    wait_until(
        lambda: (
            spent().get(("nexusgate_cost_total_usd_total", "acct-reprice")) == pytest.approx(total)
        ),
        timeout=5,
    )
    assert spent()["nexusgate_cost_completion_usd_total", "acct-reprice"] == pytest.approx(output)


@pytest.mark.parametrize("client", CLIENTS)
def test_an_unpriced_model_costs_null_never_zero(
    module_gateway: Gateway, fake, client: str
) -> None:  # type: ignore[no-untyped-def]
    gw = module_gateway
    route = gw.setup_route(fake.url, system_name=f"acct-free-{client}")
    body = p.request(client, f"acct-free-{client}", tools=False)
    p.call(client, sdk(gw, client, route["key"]), body, False, {})
    key_id = gw.api("GET", "/apiKey")[-1]["id"]
    row = record(gw, key_id)
    assert row["status"] == "completed" and row["tokens"]["input"] > 0
    assert row["cost"] is None


# -- what the client was sent --------------------------------------------------------


def read_then_hang_up(client: str, sdk_: Any, model: str, pieces: int, script: str) -> str:
    """Stream, read ``pieces`` text pieces as the SDK gives them, then close the connection."""
    headers = {"X-Fake-Script": script}
    seen: list[str] = []
    if client == CHAT:
        stream = sdk_.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            extra_headers=headers,
        )
        texts = (c.choices[0].delta.content for c in stream if c.choices)
    elif client == ANTHROPIC:
        stream = sdk_.messages.create(
            model=model,
            max_tokens=100,
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            extra_headers=headers,
        )
        texts = (
            e.delta.text
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
    else:
        stream = sdk_.responses.create(model=model, input="go", stream=True, extra_headers=headers)
        texts = (e.delta for e in stream if e.type == "response.output_text.delta")
    for text in texts:
        if text:
            seen.append(text)
        if len(seen) == pieces:
            break
    stream.close()
    return "".join(seen)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "openai-responses"])
@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_that_hangs_up_was_delivered_what_it_read_and_the_record_is_whole(
    module_gateway: Gateway, fake, client: str, provider: str
) -> None:  # type: ignore[no-untyped-def]
    gw = module_gateway
    name = f"acct-hangup-{provider}"
    if name not in {m["systemName"] for m in gw.api("GET", "/models")}:
        gw.setup_route(fake.url, provider_type=provider, system_name=name)
    key = gw.api("POST", "/apiKey", json={"comment": "hang-up"})
    call = uuid.uuid4().hex
    received = read_then_hang_up(
        client, sdk(gw, client, key["key"]), name, 3, f"id={call};chunks=30;delay=0.05"
    )
    closed = time.monotonic()  # one clock for every process of the machine
    assert received == "tok0 tok1 tok2 "
    row = record(gw, key["id"])
    pieces = [f"tok{i} " for i in range(30)]
    assert row["status"] == "aborted"
    assert row["completion"][0]["content"] == "".join(pieces)  # the drain read it to its end
    assert wait_until(lambda: fake.log(call)[0]["outcome"] == "complete")
    # Written before the hang-up was known: what was read, what the upstream had sent
    # by the time the client had closed (read or not: a starved client reads late), and
    # at most one piece more (written after its FIN, before the reset that answers it).
    sent = sum(at < closed for at in fake.log(call)[0]["text_at"])
    assert sent >= 3  # the three the client read
    delivered = row["delivered"]["text"]
    assert delivered in ["".join(pieces[:n]) for n in range(3, sent + 2)], (delivered, sent)


# Each client format's route and a body for it, for calls made without an SDK.
EACH_FORMAT_RAW = pytest.mark.parametrize(
    ("client", "path", "body"),
    [
        (CHAT, "/v1/chat/completions", {"messages": [{"role": "user", "content": "go"}]}),
        (
            ANTHROPIC,
            "/v1/messages",
            {"max_tokens": 50, "messages": [{"role": "user", "content": "go"}]},
        ),
        (RESPONSES, "/v1/responses", {"input": "go"}),
    ],
)


def events_in(raw: bytes) -> int:
    """SSE events (frames with data) in a client's raw stream; comments are not events."""
    frames = raw.replace(b"\r\n", b"\n").split(b"\n\n")
    return sum(1 for f in frames if any(line.startswith(b"data:") for line in f.split(b"\n")))


@EACH_FORMAT_RAW
def test_a_whole_stream_was_delivered_event_for_event(
    module_gateway: Gateway, fake, routes, client: str, path: str, body: dict
) -> None:  # type: ignore[no-untyped-def]
    gw = module_gateway
    key = gw.api("POST", "/apiKey", json={"comment": "whole"})
    resp = requests.post(
        gw.url + path,
        json={"model": "acct-anthropic", "stream": True, **body},
        headers={"Authorization": f"Bearer {key['key']}", "X-Fake-Script": "chunks=7"},
        timeout=10,
    )
    assert resp.status_code == 200
    row = record(gw, key["id"])
    assert row["status"] == "completed"
    assert row["delivered"] == {
        "events": events_in(resp.content),
        "text": row["completion"][0]["content"],
    }
    assert row["delivered"]["text"] == "".join(f"tok{i} " for i in range(7))


def test_an_http_1_0_client_gets_the_whole_stream_unchunked(
    module_gateway: Gateway, fake, routes
) -> None:  # type: ignore[no-untyped-def]
    # HTTP/1.0 (as nginx proxies by default): no chunked framing, the body ends with the
    # connection. The pieces written straight from the producer (paced, so the body
    # waits for each) must carry no chunk framing either, and all count as delivered.
    gw = module_gateway
    key = gw.api("POST", "/apiKey", json={"comment": "http/1.0"})
    payload = json.dumps(
        {"model": "acct-openai", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.0\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key['key']}\r\nX-Fake-Script: chunks=7;delay=0.02\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + payload)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, body = raw.split(b"\r\n\r\n", 1)
    assert status.startswith(b"HTTP/1.0 200") and b"chunked" not in status.lower()
    assert body.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(frame[6:]) for frame in body.split(b"\n\n")[:-2]]  # not [DONE]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(f"tok{i} " for i in range(7))
    row = record(gw, key["id"])
    assert row["status"] == "completed"
    assert row["delivered"] == {"events": events_in(body), "text": text}


def stalled_read(
    gw: Gateway, path: str, body: dict, key: str, script: str, settled: Callable[[], object]
) -> bytes:
    """Send a streaming call, read nothing until ``settled()`` returns, then read what is there.

    A tiny receive buffer makes the gateway's writes block; past its write timeout it
    drops the client, and whatever it had written is still in the kernels' buffers.
    Waiting for the record to be final, not for a fixed time, is what makes sure the
    gateway gave up on this client before it reads anything, however loaded the machine.
    """
    headers = {"X-Fake-Script": script, "Connection": "close"}
    with post_on_socket(gw, path, body, key, headers, rcvbuf=4096) as sock:
        settled()
        sock.settimeout(10)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def text_of_stream(client: str, raw: bytes) -> str:
    """The answer text in the complete SSE events of a raw chunked HTTP response."""
    body, text = _unchunk(raw.split(b"\r\n\r\n", 1)[1]), ""
    for frame in body.split(b"\n\n")[:-1]:  # the last one is cut short, or empty
        data = b"".join(line[5:].strip() for line in frame.split(b"\n") if line[:5] == b"data:")
        if not data or data == b"[DONE]":
            continue
        event = json.loads(data)
        if client == CHAT and event.get("choices"):
            text += event["choices"][0]["delta"].get("content") or ""
        elif client == ANTHROPIC and event["type"] == "content_block_delta":
            text += event["delta"].get("text", "")
        elif client == RESPONSES and event["type"] == "response.output_text.delta":
            text += event["delta"]
    return text


def _unchunk(data: bytes) -> bytes:
    out = b""
    while b"\r\n" in data:
        size, _, rest = data.partition(b"\r\n")
        length = int(size.split(b";")[0] or b"0", 16)
        out, data = out + rest[:length], rest[length + 2 :]
        if length == 0 or len(rest) < length:
            break
    return out


@EACH_FORMAT_RAW
def test_delivered_counts_what_was_written_not_what_was_queued(
    module_gateway: Gateway, fake, routes, client: str, path: str, body: dict
) -> None:  # type: ignore[no-untyped-def]
    # The upstream answers 16 MB at once: all of it is queued for the client within a
    # second, while the client reads none. Only what the gateway managed to write before
    # its write timeout (GATEWAY_CLIENT_WRITE_TIMEOUT=3) reached the client: the kernels'
    # buffers' worth, a few MB on loopback.
    gw = module_gateway
    key = gw.api("POST", "/apiKey", json={"comment": "stalled"})
    body = {"model": "acct-openai", "stream": True, **body}
    settled = functools.partial(gw.wait_final, 1, apiKeyId=key["id"], timeout=30)
    raw = stalled_read(gw, path, body, key["key"], "chunks=4000;pad=4000", settled)
    got = text_of_stream(client, raw)
    row = record(gw, key["id"])
    # The whole answer had arrived before the client was dropped: completed, as the
    # status rule has it; delivered tells the rest.
    assert row["status"] == "completed"
    whole = "".join(f"tok{i}{'.' * 4000} " for i in range(4000))
    assert row["completion"][0]["content"] == whole
    assert 0 < len(got) < len(whole) / 2
    assert row["delivered"]["text"] == got


# -- the monthly budget, across instances ----------------------------------------------

# A budget of 4.5 calls at $0.01 each (5 + 5 tokens at $1,000 per million).
BUDGET_CALLS = 4.5
CALL = [{"role": "user", "content": "one two"}]


def test_a_budget_spent_through_one_instance_refuses_in_the_other(
    gateway_factory, redis_server, fake
) -> None:  # type: ignore[no-untyped-def]
    a = gateway_factory(REDIS_URL=redis_server.url)
    b = gateway_factory(REDIS_URL=redis_server.url)
    key = _budgeted_key(a, fake, usd=0.005)
    assert key["budgetUsd"] == 0.005
    sdk(a, CHAT, key["key"]).chat.completions.create(model="budgeted", messages=CALL)
    (first,) = a.wait_final(1, apiKeyId=key["id"])
    assert first["cost"]["total"] == 0.01  # (5 + 5 tokens) x $0.001: over the budget

    with pytest.raises(openai.APIStatusError) as refused:
        sdk(b, CHAT, key["key"]).chat.completions.create(model="budgeted", messages=CALL)
    error = refused.value.response.json()["error"]
    assert refused.value.status_code == 402
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert "spent $0.010000 of its $0.005 budget" in error["message"]
    assert int(refused.value.response.headers["Retry-After"]) > 0  # the next month
    with pytest.raises(anthropic.APIStatusError) as refused:
        sdk(b, ANTHROPIC, key["key"]).messages.create(
            model="budgeted", max_tokens=10, messages=CALL
        )
    assert refused.value.status_code == 402
    assert refused.value.body["error"]["type"] == "billing_error"
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(b, RESPONSES, key["key"]).responses.create(model="budgeted", input="one two")
    assert refused.value.status_code == 402
    assert len(a.records(apiKeyId=key["id"])) == 1  # refused calls are not recorded

    # A larger budget lets the key through again, at once.
    a.api("PUT", f"/apiKey/{key['id']}/budget", json={"budgetUsd": 1})
    wait_until(lambda: _try(b, key["key"], CALL), timeout=10)
    assert len(b.wait_final(2, apiKeyId=key["id"])) == 2


def _try(gw: Gateway, key: str, messages: list) -> bool:
    """One call; False while refused (a key's change reaches a worker within CACHE_TTL)."""
    try:
        sdk(gw, CHAT, key).chat.completions.create(model="budgeted", messages=messages)
    except openai.APIStatusError:
        return False
    return True


def _budgeted_key(gw: Gateway, fake, usd: float = BUDGET_CALLS / 100) -> dict:  # type: ignore[no-untyped-def]
    """A key with a budget of ``usd`` (BUDGET_CALLS calls) for model ``budgeted``, whose
    CALL costs $0.01."""
    route = gw.setup_route(fake.url, system_name="budgeted")
    gw.api("PUT", f"/models/{route['model']['id']}", json={"inputPrice": 1000, "outputPrice": 1000})
    return gw.api("POST", "/apiKey", json={"comment": "budget", "budgetUsd": usd})


def _admitted_until_refused(gw: Gateway, key: str) -> int:
    """Calls until one is refused for the budget (402); how many were admitted."""
    admitted = 0

    def refused() -> bool:
        nonlocal admitted
        try:
            sdk(gw, CHAT, key).chat.completions.create(model="budgeted", messages=CALL)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402, exc.response.text
            return True
        admitted += 1
        return False

    wait_until(refused, timeout=20, interval=0.05)
    return admitted


def _spend_the_budget(gw: Gateway, key: dict) -> None:
    """Calls until the key's budget refuses; their records final."""
    assert _admitted_until_refused(gw, key["key"]) == 5  # the fifth crosses it
    gw.wait_final(5, apiKeyId=key["id"])


def test_a_restarted_redis_takes_the_month_s_spend_from_the_records(
    gateway_factory, redis_server, fake
) -> None:  # type: ignore[no-untyped-def]
    # Redis given 1 s, not 0.05: a loaded machine timed it out, and the limits failed
    # open (9 calls admitted against a budget of 4.5, before any restart).
    gw = gateway_factory(REDIS_URL=redis_server.url, GATEWAY_REDIS_TIMEOUT="1")
    key = _budgeted_key(gw, fake)
    _spend_the_budget(gw, key)
    redis_server.stop()
    redis_server.start()  # empty: this machine's Redis keeps nothing on disk
    # The first call finds the spend unknown to the store and is admitted while the
    # records' figure is read in the background; one more may pass on a busy machine.
    assert _admitted_until_refused(gw, key["key"]) <= 2


def test_without_redis_a_budget_holds_in_every_worker_process(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    a = gateway_factory()
    key = _budgeted_key(a, fake)
    _spend_the_budget(a, key)
    # Another worker process (another instance, a recycled or restarted worker) starts
    # with nothing spent in its memory: it takes the records' figure.
    b = gateway_factory()
    assert _admitted_until_refused(b, key["key"]) <= 2
    a.stop()
    c = gateway_factory()
    assert _admitted_until_refused(c, key["key"]) <= 2


def test_spend_of_calls_made_while_redis_was_known_away_is_counted_once_it_answers(
    gateway_factory, redis_server, fake
) -> None:  # type: ignore[no-untyped-def]
    # In Redis the spend is raised to the records' figure every 10 minutes: here only
    # because calls finished while Redis was known away.
    gw = gateway_factory(
        REDIS_URL=redis_server.url, GATEWAY_REDIS_TIMEOUT="0.2", GATEWAY_REDIS_RETRY_AFTER="1"
    )
    key = _budgeted_key(gw, fake)
    client = sdk(gw, CHAT, key["key"])
    for _ in range(3):
        client.chat.completions.create(model="budgeted", messages=CALL)
    redis_server.command("CLIENT", "PAUSE", "1000")
    # The first times out (Redis is then known away for a second), the second does not
    # try: both are admitted, answered and recorded; what they cost is not sent.
    for _ in range(2):
        client.chat.completions.create(model="budgeted", messages=CALL)
    gw.wait_final(5, apiKeyId=key["id"])
    assert gw.metric("gateway_limiter_fail_open_total") >= 2
    time.sleep(3)  # Redis answers again; its worker tries a second after its last failure
    # $0.05 recorded against a $0.045 budget: the next call is refused.
    assert _admitted_until_refused(gw, key["key"]) == 0


def test_a_client_that_stops_reading_does_not_hold_its_record_past_shutdown(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    # The answer is whole and the call is finishing, waiting for its client's copy to be
    # written; the client reads nothing, and its write would block for a minute. At
    # shutdown the worker stops calls at 2/3 of graceful_timeout (here 6 s after SIGTERM):
    # the record must be written then, saying what the client got, not when gunicorn
    # kills the handler at graceful_timeout (nor never, if the arbiter's SIGKILL wins).
    # The record holds a 16 MB answer, whose write alone takes most of a second: the
    # watcher polls for final rows only (an empty list while pending), and the bound is
    # the kill (9 s), which a record written only then cannot beat; it is read against
    # the poll that found the row, not its end (reading the row is 16 MB too: a loaded
    # CI run read 9.26 s).
    gw = gateway_factory(GATEWAY_GRACEFUL_TIMEOUT="9")
    reader = gateway_factory()  # another instance on the same database, to watch it
    route = gw.setup_route(fake.url, system_name="stalled")
    body = {"model": "stalled", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    call = uuid.uuid4().hex
    script = f"id={call};chunks=4000;pad=4000"
    headers = {"X-Fake-Script": script}
    path = "/v1/chat/completions"
    with post_on_socket(gw, path, body, route["key"], headers, rcvbuf=4096):
        wait_until(lambda: fake.log(call) and fake.log(call)[0]["outcome"] == "complete")
        time.sleep(0.5)  # the producer is in its last step now
        assert reader.records()[0]["status"] == "pending"
        stopping = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        asked = stopping

        def final_row() -> list[dict]:
            nonlocal asked
            asked = time.monotonic()  # the answer's 16 MB take a loaded machine a while
            return reader.records(status="completed,failed,aborted")

        (row,) = wait_until(final_row, timeout=9, interval=0.05)
        assert asked - stopping < 9  # final at the worker's deadline (6 s), not at 9
    assert row["status"] == "completed"
    assert 0 < len(row["delivered"]["text"]) < len(row["completion"][0]["content"])
