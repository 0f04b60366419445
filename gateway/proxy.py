"""The public API: ``/v1/*``, ``/api/usage``, ``/metrics``, ``/healthz``.

Every call view looks the same: authenticate, validate, limit, route, adapt, open,
return. The work is in ``adapters`` (formats), ``admission`` (limits, request ids),
``replay`` (repeats), ``routing`` (candidates), ``calls`` (the call) and ``recorder``
(the record). Errors raised here are rendered in the caller's protocol by
``render_error``; every /v1 answer to a known key carries its X-RateLimit-* headers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway import admission, auth, dedup, jsonio, metrics, redact, replay, stats, token_count
from gateway.adapters import PROTOCOLS, embeddings, record
from gateway.call import Call
from gateway.calls import calls
from gateway.errors import (
    ANTHROPIC,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MalformedJSON,
    PayloadTooLarge,
    ServiceUnavailable,
    error_body,
)
from gateway.exchange import EMBEDDING, Exchange
from gateway.limiter import limiter
from gateway.plan import CHAT, EMBEDDINGS, Plan
from gateway.routing import Candidate, catalog, weighted_order

log = logging.getLogger(__name__)

bp = Blueprint("proxy", __name__)

FORMAT_BY_PATH = {
    "/v1/chat/completions": OPENAI_CHAT,
    "/v1/messages": ANTHROPIC,
    "/v1/messages/count_tokens": ANTHROPIC,
    "/v1/responses": OPENAI_RESPONSES,
}
# Client headers never forwarded upstream, besides credentials (``redact``): ours,
# hop-by-hop, and ones the upstream request sets itself. The rest is forwarded, as
# NexusGate does: providers add headers (``anthropic-beta``) faster than an
# allow-list could follow them.
_NOT_FORWARDED = frozenset(
    {
        "host", "connection", "content-length", "content-type", "cookie", "anthropic-version",
        "accept", "accept-encoding", "accept-language", "origin", "referer", "keep-alive",
        "te", "trailer", "transfer-encoding", "upgrade", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "priority", "expect",
    }
)  # fmt: skip
_NOT_FORWARDED_PREFIXES = ("x-nexusgate-", "sec-fetch-", "sec-ch-ua", "proxy-")


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _complete(OPENAI_CHAT)


@bp.post("/v1/messages")
def messages() -> Response:
    return _complete(ANTHROPIC)


@bp.post("/v1/responses")
def responses() -> Response:
    return _complete(OPENAI_RESPONSES)


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """Anthropic's token count: the provider's own, or an estimate; never recorded."""
    caller = _authenticate()
    body = _json_body()
    ir = token_count.parse(body)
    # Admitted as every call is (it may reach the provider, as Anthropic limits it by
    # RPM too), then given back: a count is neither recorded nor charged to TPM.
    permit = _admit(caller, ir["model"], stream=False)
    try:
        tokens, source = token_count.count(
            _candidates(ir["model"], "chat"),
            body,
            ir,
            forwarded_headers(request.headers),
            float(current_app.config["COUNT_TOKENS_TIMEOUT"]),
        )
    finally:
        permit.cancel()
    answer = jsonio.response({"input_tokens": tokens})
    answer.headers[token_count.SOURCE_HEADER] = source
    return answer


@bp.post("/v1/embeddings", strict_slashes=False)
def create_embeddings() -> Response:
    caller = _authenticate()
    body = _json_body()
    parsed = embeddings.parse_request(body)
    permit = _admit(caller, parsed["model"], stream=False)
    with _until_opened(permit):
        candidates = _candidates(parsed["model"], "embedding")
        headers = forwarded_headers(request.headers)
        exchange = Exchange(
            api_key_id=caller.id,
            model=parsed["model"],
            api_format=embeddings.NAME,
            prompt=parsed["input"],
            kind=EMBEDDING,
            uid=permit.uid,
            trace_parent=request.headers.get("traceparent"),
            trace_state=request.headers.get("tracestate"),
        )
        plan = Plan(
            exchange, candidates, embeddings.NAME, parsed, body, headers, EMBEDDINGS, permit
        )
    return _answer(calls.open(plan, _client_socket()))


@bp.get("/v1/models")
def list_models() -> Response:
    """Every live system name, in OpenAI's list format (no key needed, as NexusGate)."""
    seen: set[str] = set()
    data = []
    for _type, name, provider in catalog.system_names():
        if name not in seen:
            seen.add(name)
            data.append({"id": name, "object": "model", "created": 0, "owned_by": provider})
    return jsonio.response({"object": "list", "data": data})


@bp.get("/api/usage")
def key_usage() -> Response:
    """The calling key's lifetime token sums, as NexusGate (from the records: needs the DB)."""
    caller = auth.authenticate(request.headers)
    try:
        totals = stats.key_totals(caller.id)
    except Exception as exc:  # the database is away: say so, in the API's own shape
        log.warning("usage: cannot read the records (%s)", exc)
        raise ServiceUnavailable(
            "Usage is read from the records, and the database does not answer; try again later",
            code="database_unavailable",
        ) from exc
    return jsonio.response(
        {
            "total_prompt_tokens": totals.prompt_tokens,
            "total_completion_tokens": totals.completion_tokens,
        }
    )


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus metrics of every worker of this instance (METRICS_TOKEN: bearer required)."""
    if not metrics.authorized(
        request.headers.get("Authorization"), current_app.config["METRICS_TOKEN"]
    ):
        raise AuthenticationFailed("/metrics needs Authorization: Bearer <METRICS_TOKEN>")
    # Counted from this worker's keys and catalog, as calls see them: a scrape works,
    # and says the same, while the database is away.
    metrics.catalog(auth.keys.count_usable(), *catalog.counts())
    return Response(metrics.render(), content_type=metrics.CONTENT_TYPE)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonio.response({"status": "ok", "calls": calls.active})


def _complete(api_format: str) -> Response:
    caller = _authenticate()
    body = _json_body()
    if "stream" not in body and _accepts_event_stream():
        body["stream"] = True
    ir = PROTOCOLS[api_format].parse_request(body)
    req_id = dedup.request_id(request.headers.get(dedup.HEADER))
    permit = _admit(caller, ir["model"], ir["stream"])
    with _until_opened(permit):
        stored = replay.lookup(permit, req_id) if req_id else None
        headers = forwarded_headers(request.headers)
        exchange = Exchange(
            api_key_id=caller.id,
            model=ir["model"],
            api_format=api_format,
            stream=ir["stream"],
            prompt=record.prompt(ir, headers),
            req_id=permit.req_id,
            uid=permit.uid,
            trace_parent=request.headers.get("traceparent"),
            trace_state=request.headers.get("tracestate"),
        )
        if stored is not None:
            return _replayed(replay.answer(permit, exchange, stored, api_format, ir), ir["stream"])
        candidates = _candidates(ir["model"], "chat")
        plan = Plan(exchange, candidates, api_format, ir, body, headers, CHAT, permit)
    return _answer(calls.open(plan, _client_socket()))


def _authenticate() -> auth.Caller:
    """The calling key (AuthenticationFailed if none); its limits go on every answer."""
    g.caller = auth.authenticate(request.headers)
    return g.caller


def _admit(caller: auth.Caller, model: str, stream: bool) -> admission.Permit:
    """Admit the call now (RateLimited, 429, if a limit refuses it)."""
    g.permit = admission.admit(caller, model, stream)
    return g.permit


@contextmanager
def _until_opened(permit: admission.Permit) -> Iterator[None]:
    """Give the permit back if the call is refused before it opens (unknown model, 409...)."""
    try:
        yield
    except BaseException:
        permit.cancel()
        raise


@bp.after_request
def _limit_headers(response: Response) -> Response:
    """X-RateLimit-* on every /v1 answer once the key is known (errors included)."""
    caller = g.get("caller")
    if caller is None or "X-RateLimit-Limit-RPM" in response.headers:
        return response
    if request.path.startswith("/v1/"):
        permit = g.get("permit")
        standing = (
            permit.admission
            if permit is not None
            else limiter.standing(caller.id, caller.rpm_limit, caller.tpm_limit)
        )
        response.headers.update(standing.headers())
    return response


def _candidates(model: str, model_type: str) -> list[Candidate]:
    """Who may serve ``model``, in the order to try them (NotFound if nobody)."""
    provider = request.headers.get("X-NexusGate-Provider")
    return weighted_order(
        catalog.lookup(model, model_type, unquote(provider) if provider else None)
    )


def _replayed(data: bytes, stream: bool) -> Response:
    """A stored answer for a repeat: a whole stream, or JSON."""
    if stream:
        return Response(data, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    return Response(data, mimetype="application/json")


def _answer(call: Call) -> Response:
    """The response for an opened call: its stream, its JSON, or nothing if nobody waits."""
    if call.abandoned:
        return Response(status=499)  # nobody is listening; the call is still recorded
    if call.stream:
        return Response(
            call.body(),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return Response(call.content, mimetype="application/json")


def _json_body() -> dict[str, Any]:
    """The body as a JSON object, strictly parsed (``jsonio``): MalformedJSON if not."""
    try:
        body = jsonio.loads(jsonio.read(request))
    except RequestEntityTooLarge as exc:
        raise _too_large() from exc
    except jsonio.Unreadable as exc:
        raise MalformedJSON(str(exc)) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _too_large() -> PayloadTooLarge:
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return PayloadTooLarge(f"Request body is larger than the gateway's limit of {limit} bytes")


def _accepts_event_stream() -> bool:
    """``Accept: text/event-stream`` with q > 0, the exact media type (not */*)."""
    return any(value == "text/event-stream" and q > 0 for value, q in request.accept_mimetypes)


def _client_socket() -> Any:
    # gunicorn's gevent worker calls it gunicorn.socket; gevent_pywsgi gunicorn.sock.
    return request.environ.get("gunicorn.socket") or request.environ.get("gunicorn.sock")


def forwarded_headers(headers: Any) -> dict[str, str]:
    """The client headers passed on to the upstream and kept in the record, lower-cased."""
    out = {}
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower in _NOT_FORWARDED
            or lower.startswith(_NOT_FORWARDED_PREFIXES)
            or redact.credential_header(lower, value)
        ):
            continue
        out[lower] = value
    return out


def render_error(exc: GatewayError) -> Response:
    """A GatewayError in the caller's protocol."""
    protocol = FORMAT_BY_PATH.get(request.path.rstrip("/"), OPENAI_CHAT)
    return Response(
        exc.body(protocol), status=exc.status, headers=exc.headers(), mimetype="application/json"
    )


def render_http_error(exc: HTTPException) -> Response | HTTPException:
    """Werkzeug's HTTP errors as JSON on API paths (protocol-shaped on /v1)."""
    if isinstance(exc, RequestEntityTooLarge):
        return render_error(_too_large())
    if request.path.startswith("/api/"):
        return jsonio.response({"error": exc.description or exc.name}, exc.code or 500)
    if not request.path.startswith("/v1/"):
        return exc
    protocol = FORMAT_BY_PATH.get(request.path.rstrip("/"), OPENAI_CHAT)
    kind = "not_found_error" if exc.code == 404 else "invalid_request_error"
    body = error_body(
        protocol, kind, exc.description or exc.name, code=exc.name.lower().replace(" ", "_")
    )
    return jsonio.response(body, exc.code or 500)
