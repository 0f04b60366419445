"""The pricing arithmetic, on real usage objects of each provider format.

Each usage object is what the provider's API documents and sends (OpenAI with cached and
reasoning tokens, DeepSeek's cache hit/miss counts, Anthropic with cache reads, 5-minute
and 1-hour writes, Responses' token details), read by the adapters exactly as a call's
answer is read (a JSON body, and the same usage at the end of a stream), then priced.
The expected costs are worked out here by hand in exact fractions, and the costs must
match them to 1e-12 USD.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from gateway import pricing
from gateway.adapters import PROTOCOLS
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.pricing import Prices
from tests.adapter_support import accumulate, parse_stream

EXACT = Fraction(1, 10**12)

# -- the usage objects, as each provider sends them ------------------------------------

OPENAI_USAGE = {  # gpt-4o-style: 1,920 of 2,006 prompt tokens cached; o-series reasoning
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 192,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
DEEPSEEK_USAGE = {  # deepseek-reasoner: no prompt_tokens_details, hit/miss counts instead
    "prompt_tokens": 1500,
    "completion_tokens": 420,
    "total_tokens": 1920,
    "prompt_cache_hit_tokens": 1024,
    "prompt_cache_miss_tokens": 476,
    "completion_tokens_details": {"reasoning_tokens": 380},
}
ANTHROPIC_READ_AND_WRITE = {  # input_tokens excludes the cache reads and writes
    "input_tokens": 21,
    "cache_creation_input_tokens": 2051,
    "cache_read_input_tokens": 188086,
    "cache_creation": {"ephemeral_5m_input_tokens": 2051, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393,
    "service_tier": "standard",
}
ANTHROPIC_HOUR_WRITES = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 500,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 50,
}
ANTHROPIC_OLD = {  # before cache_creation existed: every write is a 5-minute one
    "input_tokens": 10,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 500,
    "output_tokens": 50,
}
RESPONSES_USAGE = {
    "input_tokens": 5320,
    "input_tokens_details": {"cached_tokens": 4864},
    "output_tokens": 1254,
    "output_tokens_details": {"reasoning_tokens": 896},
    "total_tokens": 6574,
}

GPT = Prices(input=2.5, output=10, cache_read=1.25)  # no cache-write price: input's
DEEPSEEK = Prices(input=0.28, output=0.42, cache_read=0.028)
SONNET = Prices(input=3, output=15, cache_read=0.3, cache_write=3.75)
O4 = Prices(input=1.1, output=4.4, cache_read=0.275, cache_write=None)


def per_million(tokens: int, price: str) -> Fraction:
    return tokens * Fraction(price) / 1_000_000


def body_usage(protocol: str, usage: dict) -> dict:
    """The IR usage of a JSON answer carrying ``usage``."""
    body = {
        OPENAI_CHAT: {"id": "chatcmpl-1", "choices": [], "usage": usage},
        ANTHROPIC: {"id": "msg_1", "type": "message", "content": [], "usage": usage},
        OPENAI_RESPONSES: {"id": "resp_1", "status": "completed", "output": [], "usage": usage},
    }[protocol]
    return PROTOCOLS[protocol].parse_response(body)["usage"]


def stream_usage(protocol: str, usage: dict) -> dict:
    """The IR usage of a stream that carries ``usage`` where the protocol puts it."""
    if protocol == OPENAI_CHAT:
        events = [
            {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"id": "c", "choices": [], "usage": usage},
        ]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        data += b"data: [DONE]\n\n"
    elif protocol == ANTHROPIC:
        start = {k: v for k, v in usage.items() if k != "output_tokens"} | {"output_tokens": 1}
        events = [
            ("message_start", {"type": "message_start", "message": {"id": "m", "usage": start}}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip
        data = b"".join(f"event: {k}\ndata: {json.dumps(d)}\n\n".encode() for k, d in events)
    else:
        done = {"id": "r", "status": "completed", "output": [], "usage": usage}
        event = {"type": "response.completed", "sequence_number": 1, "response": done}
        data = f"event: response.completed\ndata: {json.dumps(event)}\n\n".encode()
    return accumulate(parse_stream(protocol, data)).result()["usage"]


READERS = [pytest.param(body_usage, id="json"), pytest.param(stream_usage, id="stream")]


def assert_cost(cost: dict | None, **expected: Fraction) -> None:
    assert cost is not None
    for name, value in expected.items():
        assert abs(Fraction(cost[name]) - value) <= EXACT, (name, cost[name], float(value))
    parts = expected["input"] + expected["cacheRead"] + expected["cacheWrite"] + expected["output"]
    assert abs(Fraction(cost["total"]) - parts) <= EXACT
    assert cost["currency"] == "USD"


@pytest.mark.parametrize("read", READERS)
def test_openai_cached_and_reasoning_tokens(read) -> None:  # type: ignore[no-untyped-def]
    usage = read(OPENAI_CHAT, OPENAI_USAGE)
    assert (usage["input_tokens"], usage["cache_read_tokens"], usage["reasoning_tokens"]) == (
        2006,
        1920,
        192,
    )
    cost = pricing.cost(usage, GPT)
    assert_cost(
        cost,
        input=per_million(86, "2.5"),
        cacheRead=per_million(1920, "1.25"),
        cacheWrite=Fraction(0),
        output=per_million(300, "10"),  # reasoning is in the 300, priced as output
    )
    assert cost["total"] == 0.005615
    assert cost["prices"] == {
        "input": 2.5,
        "output": 10.0,
        "cacheRead": 1.25,
        "cacheWrite": 2.5,
        "cacheWrite1h": 5.0,
        "fallbacks": ["cacheWrite"],
    }


@pytest.mark.parametrize("read", READERS)
def test_deepseek_cache_hit_tokens(read) -> None:  # type: ignore[no-untyped-def]
    usage = read(OPENAI_CHAT, DEEPSEEK_USAGE)
    assert (usage["input_tokens"], usage["cache_read_tokens"]) == (1500, 1024)
    assert_cost(
        pricing.cost(usage, DEEPSEEK),
        input=per_million(476, "0.28"),  # the miss count DeepSeek reports
        cacheRead=per_million(1024, "0.028"),
        cacheWrite=Fraction(0),
        output=per_million(420, "0.42"),
    )


@pytest.mark.parametrize("read", READERS)
def test_anthropic_cache_reads_and_five_minute_writes(read) -> None:  # type: ignore[no-untyped-def]
    usage = read(ANTHROPIC, ANTHROPIC_READ_AND_WRITE)
    assert usage["input_tokens"] == 21 + 2051 + 188086  # the IR's input includes the cache
    assert (usage["cache_write_tokens"], usage["cache_write_1h_tokens"]) == (2051, 0)
    assert_cost(
        pricing.cost(usage, SONNET),
        input=per_million(21, "3"),
        cacheRead=per_million(188086, "0.3"),
        cacheWrite=per_million(2051, "3.75"),
        output=per_million(393, "15"),
    )


@pytest.mark.parametrize("read", READERS)
def test_anthropic_one_hour_writes_cost_twice_the_input_price(read) -> None:  # type: ignore[no-untyped-def]
    usage = read(ANTHROPIC, ANTHROPIC_HOUR_WRITES)
    assert (usage["input_tokens"], usage["cache_write_1h_tokens"]) == (3510, 2000)
    cost = pricing.cost(usage, SONNET)
    assert_cost(
        cost,
        input=per_million(10, "3"),
        cacheRead=per_million(500, "0.3"),
        cacheWrite=per_million(1000, "3.75") + per_million(2000, "6"),
        output=per_million(50, "15"),
    )
    assert cost["prices"]["cacheWrite1h"] == 6.0
    # Without the split (older API versions) every write is priced as a 5-minute one.
    old = pricing.cost(read(ANTHROPIC, ANTHROPIC_OLD), SONNET)
    assert abs(Fraction(old["cacheWrite"]) - per_million(3000, "3.75")) <= EXACT


@pytest.mark.parametrize("read", READERS)
def test_responses_input_and_output_token_details(read) -> None:  # type: ignore[no-untyped-def]
    usage = read(OPENAI_RESPONSES, RESPONSES_USAGE)
    assert (usage["cache_read_tokens"], usage["reasoning_tokens"]) == (4864, 896)
    cost = pricing.cost(usage, O4)
    assert_cost(
        cost,
        input=per_million(456, "1.1"),
        cacheRead=per_million(4864, "0.275"),
        cacheWrite=Fraction(0),
        output=per_million(1254, "4.4"),
    )


def test_a_missing_cache_price_falls_back_to_the_input_price_and_says_so() -> None:
    usage = body_usage(ANTHROPIC, ANTHROPIC_READ_AND_WRITE)
    cost = pricing.cost(usage, Prices(input=3, output=15))
    assert cost["prices"]["fallbacks"] == ["cacheRead", "cacheWrite"]
    assert cost["prices"]["cacheRead"] == cost["prices"]["cacheWrite"] == 3.0
    assert abs(Fraction(cost["cacheRead"]) - per_million(188086, "3")) <= EXACT
    assert pricing.cost(usage, SONNET)["prices"]["fallbacks"] == []


def test_no_price_or_no_count_is_no_cost_never_zero() -> None:
    usage = body_usage(OPENAI_CHAT, OPENAI_USAGE)
    assert pricing.cost(usage, None) is None
    assert pricing.cost(usage, Prices(input=None, output=None)) is None
    assert pricing.cost(usage, Prices(input=2.5, output=None)) is None  # half a price
    assert pricing.cost(None, GPT) is None
    assert pricing.cost({**usage, "output_tokens": None}, GPT) is None  # a cut stream
    assert pricing.cost({**usage, "input_tokens": None}, GPT) is None
    # Zero tokens at a real price is a real zero.
    zero = body_usage(OPENAI_CHAT, {"prompt_tokens": 0, "completion_tokens": 0})
    assert pricing.cost(zero, GPT)["total"] == 0


def test_unreported_cache_counts_are_no_cache_and_overclaimed_cache_is_never_negative() -> None:
    plain = body_usage(OPENAI_CHAT, {"prompt_tokens": 1000, "completion_tokens": 10})
    assert pricing.cost(plain, GPT)["input"] == 0.0025  # all 1,000 at the input price
    over = {**plain, "cache_read_tokens": 1200}
    cost = pricing.cost(over, GPT)
    assert cost["input"] == 0 and cost["cacheRead"] == 0.0015


def test_prices_are_read_as_written_so_totals_add_up_to_the_nano_dollar() -> None:
    # 0.1 + 0.2 != 0.3 in floats; in the account it must.
    prices = Prices(input=0.1, output=0.2)
    usage = body_usage(OPENAI_CHAT, {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000})
    cost = pricing.cost(usage, prices)
    assert (cost["input"], cost["output"], cost["total"]) == (0.1, 0.2, 0.3)
    assert pricing.nanos(cost) == 300_000_000
    # Many small costs summed as nano-USD integers stay exact.
    one = pricing.cost(body_usage(OPENAI_CHAT, {"prompt_tokens": 7, "completion_tokens": 3}), GPT)
    assert pricing.nanos(one) == 47_500  # 7 * 2.5 + 3 * 10 = 47.5 USD per million
    assert pricing.usd(pricing.nanos(one) * 1_000_000) == 47.5
    assert pricing.nanos(None) is None and pricing.usd(None) is None
