"""Realistic records for the dashboard's tests and screenshots.

An hour of traffic over three providers: every status (an aborted call with its full
answer and the part its client got, a pending one, failures with their attempts, a
replay), reasoning, tool calls and their results, an image, embeddings; costs priced as
the gateway prices them, the providers' ids, a key with a budget. Deterministic,
relative to ``now``. Call it with a database connection open; it returns the rows and
the plaintext secrets a test must never find in a page.
"""

from __future__ import annotations

import base64
import random
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gateway import pricing
from gateway.models import ApiKey, Completion, Embedding, Model, Provider, utcnow

PROVIDER_SECRETS = {
    "openai": "sk-proj-Q7cFv2SECRETprovider0001",
    "azure-east": "3f9c2e7aSECRETazure00000000000002",
    "anthropic": "sk-ant-api03-SECRETprovider0003",
    "deepseek": "sk-ds-SECRETprovider0004",
}


@dataclass
class Seeded:
    """What the seed made: rows by role, and every secret in plain text."""

    keys: dict[str, tuple[ApiKey, str]] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    calls: dict[str, Completion] = field(default_factory=dict)
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    @property
    def secrets(self) -> list[str]:
        return [key for _, key in self.keys.values()] + list(PROVIDER_SECRETS.values())


def png(width: int = 64, height: int = 40) -> str:
    """A small gradient PNG as a data URL (an image a user might send)."""
    rows = b"".join(
        b"\x00"
        + b"".join(
            bytes((40 + 180 * x // width, 90 + 120 * y // height, 200 - 120 * x // width))
            for x in range(width)
        )
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    return "data:image/png;base64," + base64.b64encode(data + chunk(b"IEND", b"")).decode()


def seed(now: datetime | None = None) -> Seeded:
    """Fill an empty database with an hour of varied traffic."""
    now = now or utcnow()
    out = Seeded()
    for name, comment, extra in (
        ("support", "support-bot", {"last_seen": now - timedelta(minutes=1), "budget_usd": 50.0}),
        (
            "pipeline",
            "data-pipeline",
            {"rpm_limit": 600, "tpm_limit": 2_000_000, "last_seen": now - timedelta(seconds=20)},
        ),
        (
            "eval",
            "eval-harness",
            {"expires_at": now + timedelta(days=30), "last_seen": now - timedelta(minutes=2)},
        ),
        ("old", "old-prototype", {"revoked": True}),
    ):
        out.keys[name] = ApiKey.issue(comment=comment, created_at=now - timedelta(days=9), **extra)
    for name, kind, url, version in (
        ("openai", "openai", "https://api.openai.com/v1", None),
        ("azure-east", "azure", "https://east.openai.azure.com", "2024-10-21"),
        ("anthropic", "anthropic", "https://api.anthropic.com", "2023-06-01"),
        ("deepseek", "openai", "https://api.deepseek.com/v1", None),
    ):
        out.providers[name] = Provider.create(
            name=name, type=kind, base_url=url, api_key=PROVIDER_SECRETS[name], api_version=version
        )
    for label, provider, system, remote, kind, weight, prices in (
        ("gpt", "openai", "gpt-4o", "gpt-4o-2024-11-20", "chat", 3.0, (2.5, 10, 1.25, None)),
        ("gpt-azure", "azure-east", "gpt-4o", "gpt4o-prod", "chat", 1.0, (2.5, 10, None, None)),
        ("claude", "anthropic", "claude-sonnet-4", "claude-sonnet-4-20250514", "chat", 1.0,
         (3, 15, 0.3, 3.75)),
        ("reasoner", "deepseek", "deepseek-reasoner", "deepseek-reasoner", "chat", 1.0,
         (0.28, 0.42, 0.028, None)),
        ("embed", "openai", "text-embedding-3-small", "text-embedding-3-small", "embedding", 1.0,
         (0.02, 0, None, None)),
    ):  # fmt: skip
        out.models[label] = Model.create(
            provider=out.providers[provider],
            system_name=system,
            remote_id=remote,
            model_type=kind,
            weight=weight,
            context_length=128_000,
            input_price=prices[0],
            output_price=prices[1],
            cache_read_price=prices[2],
            cache_write_price=prices[3],
        )
    _traffic(out, now)
    _showcase(out, now)
    _embeddings(out, now)
    return out


def _call(out: Seeded, name: str | None, model: str, key: str, **fields: object) -> Completion:
    served = out.models[{"gpt-4o": "gpt", "claude-sonnet-4": "claude"}.get(model, "reasoner")]
    uid = uuid.uuid4().hex
    if fields.get("status") not in ("pending", "cache_hit"):
        _account(served, uid, fields)
    row = Completion.create(
        uid=uid,
        api_key=out.keys[key][0].id,
        model_id=served.id,
        provider_id=served.provider_id,
        model=model,
        api_format=fields.pop("api_format", "openai-chat"),
        **fields,
    )
    if name:
        out.calls[name] = row
    return row


def _account(served: Model, uid: str, fields: dict) -> None:
    """What the gateway adds to a final record: its cost, the provider's ids, delivery."""
    usage = fields.get("usage") or {
        "input_tokens": fields.get("prompt_tokens"),
        "output_tokens": fields.get("completion_tokens"),
    }
    prices = pricing.Prices(
        served.input_price, served.output_price, served.cache_read_price, served.cache_write_price
    )
    fields["cost"] = pricing.cost(usage, prices)
    if fields["cost"] is not None:  # the gateway keeps the usage it priced (Exchange.finish)
        fields.setdefault("usage", usage)
    fields["cost_nanos"] = pricing.nanos(fields["cost"])
    if fields.get("completion"):
        fields.setdefault("upstream_id", f"chatcmpl-{uid[:20]}")
        fields.setdefault(
            "attempts",
            [
                {
                    "provider": served.provider.name,
                    "model": served.remote_id,
                    "outcome": "ok",
                    "ms": 180,
                    "requestId": f"req_{uid[12:32]}",
                    "status": 200,
                }
            ],
        )
        if fields.get("stream"):
            text = fields["completion"][0].get("content") or ""
            fields.setdefault("delivered", {"events": 2 + len(text) // 5, "text": text})


def _traffic(out: Seeded, now: datetime) -> None:
    """Background calls spread over the hour, mostly completed."""
    rng = random.Random(4)
    questions = [
        "Summarise this support ticket in two sentences.",
        "Translate the release notes into German.",
        "Which plan fits a team of 12?",
        "Classify the sentiment of this review.",
        "Write a SQL query for monthly active users.",
    ]
    for i in range(64):
        model = rng.choice(["gpt-4o", "gpt-4o", "claude-sonnet-4", "deepseek-reasoner"])
        status = rng.choices(["completed", "failed", "aborted"], [16, 2, 1])[0]
        prompt_tokens, answer_tokens = rng.randint(80, 2400), rng.randint(20, 900)
        duration = rng.randint(600, 9000)
        failed = status == "failed"
        _call(
            out,
            None,
            model,
            rng.choice(["support", "support", "pipeline", "eval"]),
            created_at=now - timedelta(seconds=3500 - i * 54 + rng.randint(0, 30)),
            status=status,
            stream=rng.random() < 0.7,
            prompt={"messages": [{"role": "user", "content": rng.choice(questions)}]},
            completion=None if failed else [{"role": "assistant", "content": "Done."}],
            prompt_tokens=None if failed else prompt_tokens,
            completion_tokens=None if failed else answer_tokens,
            ttft=None if failed else rng.randint(180, 1400),
            duration=duration,
            error="All providers failed: timeout" if failed else None,
        )


def _showcase(out: Seeded, now: datetime) -> None:
    """The calls a person opens, oldest first, as the recorder would have numbered them."""
    story = "Once upon a time, a lighthouse keeper counted the ships. " * 6
    _call(
        out,
        "failed",
        "gpt-4o",
        "eval",
        created_at=now - timedelta(minutes=9),
        status="failed",
        prompt={"messages": [{"role": "user", "content": "Ping"}]},
        duration=10_480,
        error="All providers failed (2 attempts): openai: timeout; azure-east: HTTP 503",
        attempts=[
            {
                "provider": "openai",
                "model": "gpt-4o-2024-11-20",
                "outcome": "timeout",
                "ms": 10_002,
                "error": "timeout: no response headers before the read timeout",
            },
            {
                "provider": "azure-east",
                "model": "gpt4o-prod",
                "outcome": "http",
                "ms": 412,
                "status": 503,
                "error": "HTTP 503: The server is busy",
            },
        ],
    )
    _call(
        out,
        "reasoning",
        "deepseek-reasoner",
        "support",
        created_at=now - timedelta(minutes=6),
        status="completed",
        stream=True,
        prompt={
            "messages": [
                {"role": "system", "content": "You are a careful maths tutor."},
                {"role": "user", "content": "Is 391 a prime number?"},
            ],
            "params": {"temperature": 0.2, "max_tokens": 800},
        },
        completion=[
            {
                "role": "assistant",
                "content": "No. 391 = 17 * 23, so it is not prime.",
                "reasoning_content": "Check small primes: 391/17 = 23 exactly. So 391 = 17 * 23.",
            }
        ],
        prompt_tokens=31,
        completion_tokens=186,
        usage={
            "input_tokens": 31,
            "output_tokens": 186,
            "cache_read_tokens": 0,
            "reasoning_tokens": 142,
        },
        ttft=912,
        duration=4_204,
    )
    _call(
        out,
        "aborted",
        "gpt-4o",
        "support",
        created_at=now - timedelta(minutes=4),
        status="aborted",
        stream=True,
        prompt={"messages": [{"role": "user", "content": "Tell me a long story about the sea."}]},
        completion=[{"role": "assistant", "content": story.strip()}],
        prompt_tokens=14,
        completion_tokens=412,
        usage={"input_tokens": 14, "output_tokens": 412},
        delivered={"events": 24, "text": story[:120]},  # the client left two lines in
        ttft=388,
        duration=7_912,
    )
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    _call(
        out,
        "tools",
        "gpt-4o",
        "support",
        created_at=now - timedelta(minutes=3),
        status="completed",
        prompt={
            "messages": [
                {"role": "system", "content": "You plan trips. Use the tools for live data."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Here is my route. Weather in Hangzhou and Oslo?"},
                        {"type": "image_url", "image_url": {"url": png(96, 48), "detail": "low"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"city": "Hangzhou"}',
                            },
                        },
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": '{"temp_c": 24, "sky": "rain"}',
                },
            ],
            "tools": [weather],
            "tool_choice": "auto",
        },
        completion=[
            {
                "role": "assistant",
                "content": "Hangzhou: 24 °C and rain. Checking Oslo next.",
                "reasoning_content": "Hangzhou is answered; Oslo is still unknown, so call "
                "get_weather again before planning the route.",
                "tool_calls": [
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                ],
            }
        ],
        prompt_tokens=96,
        completion_tokens=18,
        usage={"input_tokens": 96, "output_tokens": 18, "cache_read_tokens": 64},
        ttft=540,
        duration=1_260,
    )
    _call(
        out,
        "image",
        "claude-sonnet-4",
        "eval",
        created_at=now - timedelta(minutes=2),
        status="completed",
        api_format="anthropic",
        prompt={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe the colours in this picture."},
                        {"type": "image_url", "image_url": {"url": png()}},
                    ],
                }
            ]
        },
        completion=[{"role": "assistant", "content": "A smooth gradient from teal to violet."}],
        prompt_tokens=1_210,
        completion_tokens=12,
        usage={
            "input_tokens": 1_210,
            "output_tokens": 12,
            "cache_read_tokens": 0,
            "cache_write_tokens": 1_024,
            "cache_write_1h_tokens": 512,
        },
        ttft=700,
        duration=1_930,
    )
    source = out.calls["aborted"]
    _call(
        out,
        "cache_hit",
        "gpt-4o",
        "support",
        created_at=now - timedelta(minutes=1),
        status="cache_hit",
        prompt=source.prompt,
        completion=source.completion,
        req_id="req-7f3a",
        source_completion_id=source.id,
        duration=3,
    )

    _call(
        out,
        "pending",
        "claude-sonnet-4",
        "pipeline",
        created_at=now - timedelta(seconds=20),
        status="pending",
        stream=True,
        api_format="anthropic",
        prompt={"messages": [{"role": "user", "content": "Draft the quarterly report outline."}]},
    )


def _embeddings(out: Seeded, now: datetime) -> None:
    model = out.models["embed"]
    for i, (status, text) in enumerate(
        [
            ("completed", "How do I reset my password?"),
            ("completed", ["Refund policy", "Shipping times", "Warranty terms"]),
            ("failed", "Quarterly revenue by region"),
            ("completed", "Where is my order?"),
        ]
    ):
        rows = 1 if isinstance(text, str) else len(text)
        usage = {"input_tokens": 7 * rows, "output_tokens": 0}
        prices = pricing.Prices(model.input_price, model.output_price)
        cost = None if status == "failed" else pricing.cost(usage, prices)
        out.embeddings[f"e{i}"] = Embedding.create(
            uid=uuid.uuid4().hex,
            api_key=out.keys["pipeline"][0].id,
            model_id=model.id,
            provider_id=model.provider_id,
            model="text-embedding-3-small",
            input=text,
            input_tokens=None if status == "failed" else 7 * rows,
            embedding=None if status == "failed" else [[0.0123, -0.0456, 0.0789] * 4] * rows,
            dimensions=None if status == "failed" else 12,
            status=status,
            duration=120 + 40 * i,
            cost=cost,
            cost_nanos=pricing.nanos(cost),
            error="HTTP 429: rate limited by the upstream" if status == "failed" else None,
            created_at=now - timedelta(minutes=40 - i * 9),
        )
