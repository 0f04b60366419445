"""A finished call's account: the facts its record takes off its answer and its client.

What the answer says (the operation's ``outcome``: text, usage, ...), what the call
cost, the provider's id of its answer, and what a stream's client was sent of it. The
cost is priced once, here, at the prices the catalog gave this worker for the candidate
that answered. Read once per call, by ``Call._finalise``, never per chunk. Pure: the
call passes in what it has (the answer's IR response, the candidate, the delivery its
``Downstream`` counted) and gets the fields ``Exchange.finish`` takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import pricing
from gateway.adapters import ir, wire

if TYPE_CHECKING:
    from gateway.plan import Chat, Embeddings, Settings
    from gateway.routing import Candidate


def read(
    response: dict | None,
    operation: Chat | Embeddings,
    settings: Settings,
    candidate: Candidate | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the record takes of the answer (text, usage, ...) and its account (cost, the
    provider's id)."""
    outcome = operation.outcome(response, settings) if response else {}
    return outcome, priced(response, outcome.get("usage"), candidate)


def priced(
    response: dict | None, usage: dict | None, candidate: Candidate | None
) -> dict[str, Any]:
    """The record's account: its cost and the provider's id (``delivered``: what its
    client was sent)."""
    prices = None
    if candidate is not None:
        prices = pricing.Prices(
            candidate.input_price,
            candidate.output_price,
            candidate.cache_read_price,
            candidate.cache_write_price,
        )
    return {
        "cost": pricing.cost(usage, prices),
        "upstream_id": wire.provider_text((response or {}).get("id")),
    }


def delivered(response: dict | None, events: int, chars: int) -> dict[str, Any]:
    """What a stream's client got: ``events`` written, and the answer's first ``chars``
    characters of text."""
    text = ir.text_of(response["content"]) if response else ""
    return {"events": events, "text": text[:chars]}
