"""One try of a call at one candidate: its request sent, its answer read as far as a try goes.

``send`` notes the candidate on the call's Exchange, builds the upstream request from
the plan (the operation's body; the client's headers, telemetry's and the endpoint's
auth), posts it and reads the answer: a stream to its first event past those that open
it with nothing a client could use (``StreamTranslator.preface``), a JSON answer whole.
Each try is noted on the Exchange (``Exchange.attempt``): ``ok``, or what failed and
the upstream's request id. A failure raises, for ``routing.failover`` to try the next
candidate; the response is closed on every way out but success. Run once per try by
``Call``, never per chunk.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway import jsoncodec
from gateway.adapters import wire
from gateway.adapters.translator import StreamTranslator
from gateway.telemetry import telemetry
from gateway.upstream import Events, Response, UpstreamError, endpoint, upstream

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.plan import Plan
    from gateway.routing import Candidate

# What one try opens: a stream (response, translator, events) or a JSON answer (bytes, parsed).
Opened = tuple[Response, StreamTranslator, Events] | tuple[bytes, Any]


def send(plan: Plan, candidate: Candidate) -> Opened:
    """One try: send, then read to the first event (stream) or the whole answer."""
    exchange = plan.exchange
    stream = exchange.stream
    exchange.serving(
        candidate.model_id, candidate.provider_id, candidate.provider_type, candidate.base_url
    )
    operation = plan.operation
    url, auth = endpoint(
        candidate.provider_type,
        candidate.base_url,
        candidate.api_key,
        candidate.api_version,
        candidate.remote_id,
        operation.endpoint,
    )
    body = jsoncodec.encode(operation.body(plan, candidate))
    started = time.monotonic()
    resp = None
    try:
        headers = {**plan.headers, **telemetry.upstream_headers(exchange), **auth}
        resp = upstream.post(url, headers, body, stream=stream)
        if stream:
            translator = operation.translator(plan, candidate)
            opened: Opened = (
                resp,
                translator,
                resp.events(translator.accepts, translator.refusal, translator.preface),
            )
        else:
            opened = resp.answer(lambda data: operation.read(plan, candidate, data))
    except UpstreamError as exc:
        if resp is not None:
            resp.close()
        request_id = exc.request_id or (resp.request_id if resp is not None else None)
        _note(
            exchange,
            candidate,
            started,
            exc.kind,
            request_id,
            status=exc.status,
            error=exc.describe(),
        )
        raise
    except BaseException:
        if resp is not None:
            resp.close()
        raise
    _note(exchange, candidate, started, "ok", resp.request_id, status=resp.status)
    return opened


def _note(
    exchange: Exchange,
    candidate: Candidate,
    started: float,
    outcome: str,
    request_id: str | None,
    **detail: Any,
) -> None:
    ms = int((time.monotonic() - started) * 1000)
    exchange.attempt(
        candidate.provider_name,
        candidate.remote_id,
        outcome,
        ms,
        wire.provider_text(request_id),
        **detail,
    )
