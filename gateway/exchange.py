"""One call, as a record: every fact about it, filled in stage by stage.

Like a mitmproxy flow: the view creates it, the call fills in attempts, tokens and
timings, and ``finish`` closes it exactly once. Whoever finishes it hands it to the
recorder; a second ``finish`` is refused, so a record can never get two final
states. How a call ended becomes its status in ``ending.py``. Pure code: no I/O, no
gevent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway import pricing

COMPLETION, EMBEDDING = "completion", "embedding"


def new_uid() -> str:
    """A call's uid: a UUID version 7 (RFC 9562) in 32 hex digits, time first.

    The milliseconds since the epoch lead, then 74 random bits. Records are inserted
    in uid order, as they are in id order: each goes to one place in the uid index
    (its end, once older random uids are gone), on pages the database has at hand. A
    random uid (version 4) put every insert on a page of its own anywhere in that
    index, and a batch's commit wrote them all out (issue 11, ``bench/record_write.py``:
    on SQLite at 25,000-100,000 records, 8-10% more CPU a record with about 1 KB of
    text; more for shorter calls, and more as the table grows).
    """
    value = time.time_ns() // 1_000_000 << 80 | int.from_bytes(os.urandom(10))
    return f"{value & _UUID7_CLEAR | _UUID7_SET:032x}"


# The version (7) in bits 76-79 and the variant (binary 10) in bits 62-63.
_UUID7_CLEAR = ~(0xF << 76 | 0x3 << 62)
_UUID7_SET = 0x7 << 76 | 0x2 << 62


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(eq=False, slots=True)
class Exchange:
    """Every fact about one call through the gateway.

    Slotted: with its 35 fields, a plain instance's dict was 1.5 KB of every open
    stream's memory (issue 11).
    """

    api_key_id: int
    model: str  # as the client asked, ``name@provider`` included
    api_format: str
    stream: bool = False
    prompt: Any = None
    kind: str = COMPLETION
    req_id: str | None = None  # X-NexusGate-ReqId: repeats replay this call's answer
    source_uid: str | None = None  # a cache_hit: the call whose answer it replayed
    uid: str = field(default_factory=new_uid)
    created_at: datetime = field(default_factory=_utcnow)
    started: float = field(default_factory=time.monotonic)
    model_id: int | None = None
    provider_id: int | None = None
    status: str = "pending"
    output: Any = None  # completion messages, or embedding vectors
    usage: dict | None = None
    dimensions: int | None = None
    ttft_ms: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    attempts: list[dict] = field(default_factory=list)
    answer: dict | None = None  # a req_id call's whole answer (IR), kept for its repeats
    upstream_id: str | None = None  # the provider's id of its answer
    response_model: str | None = None  # the model the provider says answered
    stop_reason: str | None = None  # why the answer ended (IR stop reason)
    cost: dict | None = None  # pricing.cost, fixed when the call is finished
    delivered: dict | None = None  # streams: {"events", "text"} the client was sent
    finished: bool = False
    # For telemetry only (not columns): the caller's W3C trace context, and how the
    # serving provider is reached.
    trace_parent: str | None = None
    trace_state: str | None = None
    provider_type: str | None = None
    base_url: str | None = None
    # The gateway's own span of this call, once the upstream was told of it (telemetry).
    trace_id: str | None = None
    span_id: str | None = None
    upstream_traceparent: str | None = None

    @property
    def elapsed_ms(self) -> int:
        """Milliseconds since the call arrived."""
        return int((time.monotonic() - self.started) * 1000)

    def first_token(self) -> None:
        """Note the time to first token, once."""
        if self.ttft_ms is None:
            self.ttft_ms = self.elapsed_ms

    def serving(
        self,
        model_id: int,
        provider_id: int,
        provider_type: str | None = None,
        base_url: str | None = None,
    ) -> None:
        """Note which candidate is being tried."""
        self.model_id, self.provider_id = model_id, provider_id
        self.provider_type, self.base_url = provider_type, base_url

    def attempt(
        self,
        provider: str,
        model: str,
        outcome: str,
        ms: int,
        request_id: str | None = None,
        **detail: Any,
    ) -> None:
        """Record one try at an upstream: ``ok`` or what went wrong, and its request id."""
        self.attempts.append(
            {
                "provider": provider,
                "model": model,
                "outcome": outcome,
                "ms": ms,
                "requestId": request_id,
                **detail,
            }
        )

    def with_attempts(self, message: str) -> str:
        """``message``, followed by what went wrong with each failed try."""
        tries = "; ".join(
            f"{a['provider']}: {a.get('error') or a['outcome']}"
            for a in self.attempts
            if a["outcome"] != "ok"
        )
        return f"{message} [{tries}]" if tries else message

    def finish(
        self,
        status: str,
        *,
        output: Any = None,
        usage: dict | None = None,
        dimensions: int | None = None,
        error: str | None = None,
        upstream_id: str | None = None,
        cost: dict | None = None,
        delivered: dict | None = None,
        duration_ms: int | None = None,
        response_model: str | None = None,
        stop_reason: str | None = None,
    ) -> bool:
        """Close the record with its final status; False if it was already closed.

        ``duration_ms`` is when the upstream's part ended (default: now).
        """
        if self.finished:
            return False
        self.finished = True
        self.status = status
        if output is not None:
            self.output = output
        if usage is not None:
            self.usage = usage
        if dimensions is not None:
            self.dimensions = dimensions
        if error is not None:
            self.error = error
        self.upstream_id, self.cost, self.delivered = upstream_id, cost, delivered
        self.response_model, self.stop_reason = response_model, stop_reason
        self.duration_ms = self.elapsed_ms if duration_ms is None else duration_ms
        return True

    @property
    def input_tokens(self) -> int | None:
        """Prompt tokens as the upstream reported them (None: unknown)."""
        return (self.usage or {}).get("input_tokens")

    @property
    def output_tokens(self) -> int | None:
        """Completion tokens as the upstream reported them (None: unknown)."""
        return (self.usage or {}).get("output_tokens")

    def row(self) -> dict[str, Any]:
        """The columns of this call's row, as they stand now."""
        common = {
            "uid": self.uid,
            "api_key": self.api_key_id,
            "model_id": self.model_id,
            "provider_id": self.provider_id,
            "model": self.model,
            "status": self.status,
            "duration": self.duration_ms,
            "error": self.error,
            "attempts": self.attempts or None,
            "cost": self.cost,
            "cost_nanos": pricing.nanos(self.cost),
            "created_at": self.created_at,
            "updated_at": _utcnow(),
            "trace_parent": self.trace_parent,
            "trace_state": self.trace_state,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "provider_type": self.provider_type,
            "base_url": self.base_url,
        }
        if self.kind == EMBEDDING:
            return {
                **common,
                "input": self.prompt,
                "input_tokens": self.input_tokens,
                "embedding": self.output,
                "dimensions": self.dimensions,
            }
        return {
            **common,
            "api_format": self.api_format,
            "stream": self.stream,
            "prompt": self.prompt,
            "completion": self.output,
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "usage": self.usage,
            "ttft": self.ttft_ms,
            "req_id": self.req_id,
            "source_uid": self.source_uid,
            "cached_response": self.answer,
            "upstream_id": self.upstream_id,
            "response_model": self.response_model,
            "stop_reason": self.stop_reason,
            "delivered": self.delivered,
        }
