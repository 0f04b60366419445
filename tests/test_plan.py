"""What a call is given: settings from config, and what differs between chat and embeddings."""

from __future__ import annotations

import json

import pytest

from gateway.adapters import PROTOCOLS, ir
from gateway.config import DEFAULTS
from gateway.errors import ANTHROPIC, OPENAI_CHAT
from gateway.exchange import Exchange
from gateway.plan import CHAT, EMBEDDINGS, Plan, Settings
from gateway.routing import Candidate


def candidate(provider_type: str = "openai") -> Candidate:
    return Candidate(
        model_id=1,
        system_name="m",
        remote_id="remote-m",
        model_type="chat",
        weight=1.0,
        provider_id=1,
        provider_name="p",
        provider_type=provider_type,
        base_url="http://p",
        api_key=None,
        api_version=None,
        stream_usage=True,
    )


def chat_plan(client_format: str, body: dict) -> Plan:
    request = PROTOCOLS[client_format].parse_request(body)
    exchange = Exchange(api_key_id=1, model="m", api_format=client_format)
    return Plan(exchange, [candidate()], client_format, request, body, {}, CHAT)


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "chatcmpl-1",
    "model": "remote-m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}  # fmt: skip


def test_settings_come_from_config_and_an_unknown_disconnect_mode_is_refused() -> None:
    settings = Settings.from_config({**DEFAULTS, "ON_DISCONNECT": "Cancel", "MAX_DRAINS": "7"})
    assert (settings.on_disconnect, settings.max_drains) == ("cancel", 7)
    assert settings.pace.heartbeat == DEFAULTS["HEARTBEAT_INTERVAL"]
    with pytest.raises(ValueError, match="drain or cancel"):
        Settings.from_config({**DEFAULTS, "ON_DISCONNECT": "wait"})


def test_a_chat_answer_in_the_clients_format_goes_back_as_the_upstream_sent_it() -> None:
    plan = chat_plan(OPENAI_CHAT, CHAT_BODY)
    content = json.dumps(ANSWER).encode()
    response = CHAT.read(plan, candidate(), ANSWER)
    assert CHAT.reply(plan, candidate(), content, response) is content
    assert CHAT.body(plan, candidate())["model"] == "remote-m"


def test_a_chat_answer_in_another_format_is_rendered_for_the_client() -> None:
    plan = chat_plan(ANTHROPIC, {**CHAT_BODY, "max_tokens": 9})
    response = CHAT.read(plan, candidate(), ANSWER)
    rendered = json.loads(CHAT.reply(plan, candidate(), b"", response))
    assert rendered["type"] == "message" and rendered["content"][0]["text"] == "Hello"
    outcome = CHAT.outcome(response, Settings.from_config(DEFAULTS))
    assert outcome["output"][0]["content"] == "Hello"
    assert outcome["usage"] == ir.usage(input_tokens=3, output_tokens=1)


def test_an_embeddings_record_keeps_the_vectors_its_budget_allows_and_the_dimensions() -> None:
    body = {"model": "e", "input": ["a", "b"]}
    exchange = Exchange(api_key_id=1, model="e", api_format="openai-embeddings")
    plan = Plan(exchange, [candidate()], "openai-embeddings", body, body, {}, EMBEDDINGS)
    answer = {
        "data": [{"index": 1, "embedding": [3.0, 4.0]}, {"index": 0, "embedding": [1.0, 2.0]}],
        "usage": {"prompt_tokens": 2},
    }
    response = EMBEDDINGS.read(plan, candidate(), answer)
    assert EMBEDDINGS.reply(plan, candidate(), b"as sent", response) == b"as sent"
    outcome = EMBEDDINGS.outcome(
        response, Settings.from_config({**DEFAULTS, "EMBEDDING_RECORD_VALUES": 3})
    )
    # An embedding answers no tokens: 0 output is known, and the call can be priced.
    usage = ir.usage(input_tokens=2, output_tokens=0)
    assert outcome == {"output": [[1.0, 2.0]], "usage": usage, "dimensions": 2}
