"""What the database outage tests share (``test_server_outage.py``,
``test_server_outage_keys.py``): the calls their clients make through both SDKs, the
gateway's settings for a quick outage, and its records read back once it is over."""

from __future__ import annotations

import time

import anthropic
import openai

from gateway.db import migrate, open_database
from tests.servers import Gateway, PostgresCluster, marker, wait_until

ANSWER_DUE = 0.55  # seconds after which a JSON answer may have reached its client
TEXT = "".join(f"tok{i} " for i in range(12))
# (client SDK, system name, stream, hang up): same format and converted, both ways.
KINDS = [
    (sdk, model, stream, hang_up)
    for sdk in ("openai", "anthropic")
    for model in ("gpt", "claude")
    for stream in (True, False)
    for hang_up in (False, True)
]

# Journaled records looked for every 0.5 s (5 s by default): the tests wait for them
# once the database is back, and a replay that never comes still fails them.
REPLAY = {"GATEWAY_JOURNAL_REPLAY_INTERVAL": "0.5"}
# Keys read again within 1 s, a dead process's rows swept within about 5 s, and the
# database given 2 s to connect and 5 to answer before it counts as down.
QUICK = {
    **REPLAY,
    "GATEWAY_CACHE_TTL": "1",
    "GATEWAY_PROCESS_HEARTBEAT": "0.5",
    "GATEWAY_PROCESS_DEAD_AFTER": "4",
    "GATEWAY_SWEEP_INTERVAL": "0.5",
    "GATEWAY_DB_CONNECT_TIMEOUT": "2",
    "GATEWAY_DB_TIMEOUT": "5",
}


def gateway_database(cluster: PostgresCluster) -> str:
    """A migrated database of the gateway's on the cluster: its URL."""
    admin = open_database(cluster.url())
    with admin.connection_context():
        admin.execute_sql("CREATE DATABASE gateway")
    admin.close_all()
    url = cluster.url("gateway")
    migrate(handle := open_database(url))
    handle.close_all()
    return url


def call(gw: Gateway, key: str, marker: str, kind: tuple) -> str:
    """One call as a client makes it; what it got: ``full``, ``hung up`` or an error."""
    sdk, model, stream, hang_up = kind
    prompt = f"{marker} tell me a story"
    timeout = 0.3 if hang_up and not stream else 30.0  # a client that gives up waiting
    sent = time.monotonic()
    try:
        if sdk == "openai":
            client = openai.OpenAI(
                base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=timeout
            )
            messages = [{"role": "user", "content": prompt}]
            if not stream:
                answer = client.chat.completions.create(model=model, messages=messages)
                return "full" if answer.choices[0].message.content == TEXT else "short"
            pieces = client.chat.completions.create(model=model, messages=messages, stream=True)
            texts = (c.choices[0].delta.content or "" for c in pieces if c.choices)
        else:
            client = anthropic.Anthropic(
                base_url=gw.url, api_key=key, max_retries=0, timeout=timeout
            )
            messages = [{"role": "user", "content": prompt}]
            if not stream:
                answer = client.messages.create(model=model, max_tokens=100, messages=messages)
                return "full" if answer.content[0].text == TEXT else "short"
            pieces = client.messages.create(
                model=model, max_tokens=100, messages=messages, stream=True
            )
            texts = (e.delta.text for e in pieces if e.type == "content_block_delta")
        text = ""
        for piece in texts:
            text += piece
            if hang_up and text.count("tok") == 3:
                pieces.close()
                return "hung up"
        return "full" if text == TEXT else "short"
    except (openai.APITimeoutError, anthropic.APITimeoutError):
        if not hang_up or stream:  # a stream's client hangs up after its third token:
            return "timeout"  # its timeout is 30 s without an answer, not a hang-up
        # The answer takes 0.6 s. A client held off the CPU past then (a loaded machine)
        # may give up on an answer the gateway had already written to it in full.
        return "hung up" if time.monotonic() - sent < ANSWER_DUE else "hung up late"
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return f"HTTP {exc.status_code}"
    except (openai.APIError, anthropic.APIError) as exc:
        return f"error {type(exc).__name__}: {exc}"


def final_records(gw: Gateway, count: int) -> list[dict]:
    """The gateway's records, once there are at least ``count`` and none is pending
    (within a minute)."""

    def all_final() -> list[dict] | None:
        rows = gw.records(limit=1000)
        if len(rows) >= count and all(r["status"] != "pending" for r in rows):
            return rows
        return None

    return wait_until(all_final, timeout=60, interval=0.5)


def marker_in(value: object) -> str:
    """The ``call-NNN`` a test's prompt named."""
    return "call-" + marker(value)


def by_call(rows: list[dict]) -> dict[str, list[dict]]:
    """Records by the call their prompt names; each call's must be one record."""
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(marker_in(row["prompt"]), []).append(row)
    assert all(len(each) == 1 for each in found.values()), "a call recorded twice"
    return found
