"""What a call is given: the view's Plan, the Operation of its kind, the worker's Settings.

The view decides the ``Plan``: the Exchange to fill in, the candidates in order, the
client's format, request (IR for chat formats) and body, the headers to forward, and the
operation. An operation is everything that differs between a chat call and an
embeddings call: the body sent upstream, reading the upstream's JSON answer, the
client's answer, the stream translator (chat only) and what the record keeps.
``Settings`` say how calls behave; they are read from config once per worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.adapters import (
    PROTOCOLS,
    PROVIDER_PROTOCOLS,
    embeddings,
    record,
    upstream_body,
    wire,
)
from gateway.adapters.translator import StreamTranslator
from gateway.downstream import Pace
from gateway.exchange import Exchange

if TYPE_CHECKING:
    from gateway.admission import Permit
    from gateway.routing import Candidate

DISCONNECT_MODES = ("drain", "cancel")


@dataclass(frozen=True)
class Settings:
    """How this worker's calls behave (config keys in ``from_config``)."""

    on_disconnect: str
    drain_timeout: float
    max_drains: int
    call_timeout: float
    tries_per_provider: int
    backoff: tuple[float, float]
    embedding_record_values: int
    pace: Pace

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """The settings an app's config gives (ValueError for an unknown disconnect mode)."""
        mode = str(cfg["ON_DISCONNECT"]).lower()
        if mode not in DISCONNECT_MODES:
            raise ValueError(f"GATEWAY_ON_DISCONNECT must be drain or cancel, not {mode!r}")
        return cls(
            on_disconnect=mode,
            drain_timeout=float(cfg["DRAIN_TIMEOUT"]),
            max_drains=int(cfg["MAX_DRAINS"]),
            call_timeout=float(cfg["CALL_TIMEOUT"]),
            tries_per_provider=int(cfg["TRIES_PER_PROVIDER"]),
            backoff=(float(cfg["BACKOFF_MIN"]), float(cfg["BACKOFF_MAX"])),
            embedding_record_values=int(cfg["EMBEDDING_RECORD_VALUES"]),
            pace=Pace(
                heartbeat=float(cfg["HEARTBEAT_INTERVAL"]),
                probe_interval=float(cfg["PROBE_INTERVAL"]),
                write_timeout=float(cfg["CLIENT_WRITE_TIMEOUT"]),
            ),
        )


class Chat:
    """A chat call in any client format, through the IR when the provider speaks another."""

    endpoint = "chat"

    def body(self, plan: Plan, candidate: Candidate) -> dict:
        """The JSON sent to ``candidate``."""
        return upstream_body(
            plan.client_format,
            PROVIDER_PROTOCOLS[candidate.provider_type],
            plan.body,
            plan.request,
            candidate.remote_id,
            stream_usage=candidate.stream_usage,
        )

    def read(self, plan: Plan, candidate: Candidate, data: Any) -> dict:
        """The upstream's JSON answer as an IR response (ValueError and kin if unusable)."""
        return PROTOCOLS[PROVIDER_PROTOCOLS[candidate.provider_type]].parse_response(data)

    def reply(self, plan: Plan, candidate: Candidate, content: bytes, response: dict) -> bytes:
        """The client's answer: the upstream's own bytes when the formats match."""
        if PROVIDER_PROTOCOLS[candidate.provider_type] == plan.client_format:
            return content
        return json.dumps(
            PROTOCOLS[plan.client_format].render_response(response, plan.request)
        ).encode()

    def translator(self, plan: Plan, candidate: Candidate) -> StreamTranslator:
        """The translator of a stream from ``candidate`` to the client."""
        return StreamTranslator(
            plan.client_format, PROVIDER_PROTOCOLS[candidate.provider_type], plan.request
        )

    def outcome(self, response: dict, settings: Settings) -> dict[str, Any]:
        """What the record keeps of an IR response."""
        return {
            "output": record.completion(response),
            "usage": response["usage"],
            "response_model": wire.provider_text(response.get("model")),
            "stop_reason": response.get("stop_reason"),
        }


class Embeddings:
    """An embeddings call: never streamed; every provider type speaks OpenAI's format, so
    the upstream's answer is the client's, and only the record needs reading it."""

    endpoint = "embeddings"

    def body(self, plan: Plan, candidate: Candidate) -> dict:
        """The client's body, naming the provider's model."""
        return embeddings.build_request(plan.body, candidate.remote_id)

    def read(self, plan: Plan, candidate: Candidate, data: Any) -> dict:
        """The upstream's answer read for the record (ValueError if unusable)."""
        return embeddings.parse_response(data)

    def reply(self, plan: Plan, candidate: Candidate, content: bytes, response: dict) -> bytes:
        """The upstream's own bytes."""
        return content

    def outcome(self, response: dict, settings: Settings) -> dict[str, Any]:
        """The vectors the record keeps (EMBEDDING_RECORD_VALUES), tokens and dimensions."""
        vectors = embeddings.record_vectors(response["vectors"], settings.embedding_record_values)
        usage = {**response["usage"], "output_tokens": 0}  # an embedding answers no tokens
        return {"output": vectors, "usage": usage, "dimensions": response["dimensions"]}


CHAT, EMBEDDINGS = Chat(), Embeddings()


@dataclass
class Plan:
    """Everything a call needs, decided by the view."""

    exchange: Exchange
    candidates: list[Candidate]
    client_format: str
    request: dict  # the parsed request: IR for chat formats
    body: dict  # the client's JSON, for same-format passthrough
    headers: dict[str, str]  # client headers to forward
    operation: Chat | Embeddings
    permit: Permit | None = None  # what admission granted (None: a call without limits)

    def settle(self, answer: dict | None, usage: dict | None, cost: dict | None) -> None:
        """Settle what the call owes its permit (``admission``), once: before its record
        is final, with its ``usage`` and ``cost``."""
        if self.permit is not None:
            self.permit.settle(self.exchange, answer, usage, cost)

    def count(self) -> None:
        """The call's Exchange is final: count it (``admission``)."""
        if self.permit is not None:
            self.permit.count(self.exchange)
