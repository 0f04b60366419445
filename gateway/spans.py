"""A finished call record as an OpenTelemetry GenAI client span (plain data, no SDK).

Follows the GenAI semantic conventions (spans for inference and embeddings, as of
semantic-conventions 1.41): span name ``"{gen_ai.operation.name} {gen_ai.request.model}"``,
kind CLIENT, status per "Recording errors": left unset when the call ended without an
error, ERROR with ``error.type`` otherwise. An ``aborted`` call is an error of its own
kind (``error.type=client_disconnected``): whoever waited for the answer never got it
whole, so it must not count as a success, and the type keeps it apart from provider
failures. The gateway's own facts ride along under ``gateway.``.

Input is the row the recorder committed (``Exchange.row()`` plus ``kind``, and the
``id`` and ``swept_at`` the write read back), so a span says exactly what the database
says. A call the sweeper finalised (``failed``, ``error.type=orphaned``) whose own final
state arrives later is a second span of the same record, marked
``gateway.record.supersedes_swept``: an ended span cannot be changed, so the truth can
only follow it, recognisably. Keys that later records may carry are used when present:
``tokens``, ``cost``, ``upstream_id``, ``response_model``, ``stop_reason``,
``provider_type``, ``base_url``, ``delivered``. The opt-in message content is
``span_content``'s. Pure code: no I/O.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from gateway.span_content import content

CHAT, EMBEDDINGS = "chat", "embeddings"
# error.type values besides an upstream's HTTP status ("503") and the way its connection
# failed (connect, timeout, reset, protocol), by the start of the record's error text.
_ERROR_TYPES = (
    ("gateway shutdown", "gateway_shutdown"),
    ("call exceeded CALL_TIMEOUT", "timeout"),
    ("orphaned", "orphaned"),  # finalised by the sweeper: its process died
    ("upstream failed mid-stream", "stream_interrupted"),
    ("upstream sent an error event", "upstream_error_event"),
    ("upstream ended the stream", "stream_truncated"),
    ("gateway error", "gateway_error"),
)
ABORTED_ERROR_TYPE = "client_disconnected"
# Our provider types as the convention's well-known gen_ai.provider.name values; an
# OpenAI-compatible host the convention names is known by its host.
_PROVIDER_NAMES = {
    "openai": "openai",
    "openai-responses": "openai",
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "ollama": "ollama",
}
_PROVIDER_HOSTS = {
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "api.moonshot.ai": "moonshot_ai",
    "api.moonshot.cn": "moonshot_ai",
    "generativelanguage.googleapis.com": "gcp.gemini",
}
# IR stop reasons as the convention's finish reasons.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_call",
    "content_filter": "content_filter",
    "refusal": "content_filter",
}
_REQUEST_PARAMS = {  # record params -> attribute, type
    "max_tokens": ("gen_ai.request.max_tokens", int),
    "temperature": ("gen_ai.request.temperature", float),
    "top_p": ("gen_ai.request.top_p", float),
    "top_k": ("gen_ai.request.top_k", float),
    "frequency_penalty": ("gen_ai.request.frequency_penalty", float),
    "presence_penalty": ("gen_ai.request.presence_penalty", float),
    "seed": ("gen_ai.request.seed", int),
}
# W3C Trace Context, as the SDK's propagator reads it (a later version may add fields).
_TRACEPARENT = re.compile(
    r"^\s*(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?\s*$"
)
_EPOCH = datetime(1970, 1, 1)
_STATUS_TEXT_LIMIT = 1024


@dataclass(frozen=True)
class GenAISpan:
    """What the SDK needs to emit one finished call as a span."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: bool = False
    description: str | None = None  # the status description of an error
    trace_parent: str | None = None
    trace_state: str | None = None


def build(
    row: Mapping[str, Any],
    *,
    trace_parent: str | None = None,
    trace_state: str | None = None,
    capture_content: bool = False,
    content_limit: int = 0,
) -> GenAISpan:
    """The span of a final record; ``content_limit`` cuts each message part (0: never)."""
    embedding = row.get("kind") == "embedding" or "embedding" in row
    operation = EMBEDDINGS if embedding else CHAT
    attempts = row.get("attempts") or []
    last = attempts[-1] if attempts else {}
    model = last.get("model") or row["model"]  # what the provider was asked for
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider_name(row.get("provider_type"), row.get("base_url")),
        "gen_ai.request.model": model,
    }
    attrs.update(_server(row.get("base_url")))
    if embedding:
        attrs["gen_ai.embeddings.dimension.count"] = row.get("dimensions")
    else:
        attrs.update(_request_params(row.get("prompt")))
        if row.get("stream"):
            attrs["gen_ai.request.stream"] = True
            if row.get("ttft") is not None:
                attrs["gen_ai.response.time_to_first_chunk"] = row["ttft"] / 1000
    attrs["gen_ai.response.id"] = row.get("upstream_id")
    attrs["gen_ai.response.model"] = row.get("response_model")
    finish = _FINISH_REASONS.get(row.get("stop_reason"), row.get("stop_reason"))
    attrs["gen_ai.response.finish_reasons"] = [finish] if finish else None
    attrs.update(_usage(row))
    kind = error_type(row)
    attrs["error.type"] = kind
    attrs.update(_gateway(row, attempts, last))
    if capture_content and not embedding:
        attrs.update(content(row, finish, content_limit))
    start = _nanoseconds(row["created_at"])
    end = start + int(row.get("duration") or 0) * 1_000_000
    description = None
    if kind is not None:
        description = (row.get("error") or "")[:_STATUS_TEXT_LIMIT] or None
    return GenAISpan(
        name=f"{operation} {model}",
        start_ns=start,
        end_ns=end,
        attributes={k: v for k, v in attrs.items() if v is not None},
        error=kind is not None,
        description=description,
        trace_parent=trace_parent,
        trace_state=trace_state,
    )


def child_context(trace_parent: str | None, span_id: str) -> tuple[str, str]:
    """The gateway span's trace id, and the ``traceparent`` that names it as the parent.

    Sent upstream, it makes the provider's spans children of the gateway's span
    (``span_id``), itself a child of the caller's (``trace_parent``, when valid by the
    W3C rules: the gateway's span then joins the caller's trace and keeps its sampling
    flag). Without a valid one, the gateway's span starts a new, sampled trace.
    """
    found = _TRACEPARENT.match(trace_parent or "")
    valid = (
        found is not None
        and found["version"] != "ff"
        and not (found["version"] == "00" and found["rest"])
        and found["trace"] != "0" * 32
        and found["span"] != "0" * 16
    )
    if valid:
        assert found is not None
        trace_id, flags = found["trace"], found["flags"]
    else:
        trace_id, flags = secrets.token_hex(16), "01"
    return trace_id, f"00-{trace_id}-{span_id}-{flags}"


def provider_name(provider_type: str | None, base_url: str | None) -> str:
    """``gen_ai.provider.name`` for a provider of ours, by its host when the convention knows it."""
    host = (urlsplit(base_url).hostname or "") if base_url else ""
    if host in _PROVIDER_HOSTS:
        return _PROVIDER_HOSTS[host]
    if host.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    return _PROVIDER_NAMES.get(provider_type or "", provider_type or "_OTHER")


def error_type(row: Mapping[str, Any]) -> str | None:
    """``error.type`` of a record: None for a call that ended without an error."""
    status = row.get("status")
    if status == "aborted":
        return ABORTED_ERROR_TYPE
    if status != "failed":
        return None
    error = row.get("error") or ""
    for prefix, kind in _ERROR_TYPES:
        if error.startswith(prefix):
            return kind
    attempts = row.get("attempts") or []
    outcome = attempts[-1].get("outcome") if attempts else None
    if outcome == "http" and attempts[-1].get("status"):
        return str(attempts[-1]["status"])
    if outcome not in (None, "ok"):
        return str(outcome)
    return "_OTHER"


def supersedes_swept(row: Mapping[str, Any]) -> bool:
    """True for a call's own final row that replaced the one the sweeper wrote for it."""
    return row.get("swept_at") is not None and not row.get("swept")


def _server(base_url: str | None) -> dict[str, Any]:
    if not base_url:
        return {}
    parts = urlsplit(base_url)
    if not parts.hostname:
        return {}
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return {"server.address": parts.hostname, "server.port": port}


def _request_params(prompt: Any) -> dict[str, Any]:
    if not isinstance(prompt, Mapping):
        return {}
    given = {**(prompt.get("extraBody") or {}), **(prompt.get("params") or {})}
    attrs: dict[str, Any] = {}
    for name, (attribute, kind) in _REQUEST_PARAMS.items():
        value = given.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[attribute] = kind(value)
    stop = given.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = stop
    choices = given.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        attrs["gen_ai.request.choice.count"] = choices
    return attrs


def _usage(row: Mapping[str, Any]) -> dict[str, Any]:
    """Token counts: the record's ``tokens`` (issue 10), else its IR ``usage``, else columns."""
    tokens = row.get("tokens")
    if isinstance(tokens, Mapping):
        counts = [
            tokens.get(k) for k in ("input", "output", "cacheRead", "cacheWrite", "reasoning")
        ]
    else:
        usage = row.get("usage") if isinstance(row.get("usage"), Mapping) else {}
        counts = [
            usage.get("input_tokens", row.get("prompt_tokens", row.get("input_tokens"))),
            usage.get("output_tokens", row.get("completion_tokens")),
            usage.get("cache_read_tokens"),
            usage.get("cache_write_tokens"),
            usage.get("reasoning_tokens"),
        ]
    names = (
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_creation.input_tokens",
        "gen_ai.usage.reasoning.output_tokens",
    )
    # Unknown stays unknown: an absent attribute, never 0.
    return {name: int(n) for name, n in zip(names, counts, strict=True) if n is not None}


def _gateway(row: Mapping[str, Any], attempts: list[dict], last: Mapping) -> dict[str, Any]:
    cost = row.get("cost") if isinstance(row.get("cost"), Mapping) else {}
    delivered = row.get("delivered") if isinstance(row.get("delivered"), Mapping) else {}
    return {
        "gateway.record.id": row.get("id"),
        "gateway.record.uid": row.get("uid"),
        "gateway.record.supersedes_swept": True if supersedes_swept(row) else None,
        "gateway.status": row.get("status"),
        "gateway.api_format": row.get("api_format"),
        "gateway.api_key.id": row.get("api_key"),
        "gateway.model": row.get("model"),
        "gateway.model.id": row.get("model_id"),
        "gateway.provider.id": row.get("provider_id"),
        "gateway.provider.name": last.get("provider"),
        "gateway.attempts": len(attempts),
        "gateway.ttft_ms": row.get("ttft"),
        "gateway.req_id": row.get("req_id"),
        "gateway.source.uid": row.get("source_uid"),  # a cache_hit: the record it replayed
        "gateway.upstream.request_id": last.get("requestId"),
        "gateway.cost.total": float(cost["total"]) if cost.get("total") is not None else None,
        "gateway.cost.currency": cost.get("currency") if cost.get("total") is not None else None,
        "gateway.delivered.events": delivered.get("events"),
    }


def _nanoseconds(value: datetime | str) -> int:
    """A naive UTC timestamp (or its ISO text, as the journal keeps it) in ns since 1970."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return (value - _EPOCH) // timedelta(microseconds=1) * 1000
