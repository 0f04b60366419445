"""The public API's calls: ``/v1`` chat completions, messages, responses, embeddings and
token counts (the rest of the public API is ``service.py``).

Every call view looks the same: authenticate, validate, limit, route, adapt, open,
return. The work is in ``adapters`` (formats), ``admission`` (limits, request ids),
``replay`` (repeats), ``routing`` (candidates), ``calls`` (the call) and ``recorder``
(the record). Errors raised here are rendered in the caller's protocol; every /v1
answer to a known key carries its X-RateLimit-* headers.

The call views (``CALLS``) take their ``CallRequest`` as an argument and touch no Flask
context; it and their ``Answer`` are ``callwsgi``'s, the client headers passed on
``client_headers``'. ``CallRoutes``, in front of the Flask app, serves a POST to one of
their exact paths itself, without Flask's per-request machinery (contexts, URL
matching, hooks: about a tenth of a call's CPU, issue 11). Everything else goes to
Flask, where the same views are registered: other methods (405, OPTIONS), a ``//``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

from flask import Flask, Response, current_app, has_request_context, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway import admission, auth, db, dedup, jsonio, replay, token_count, urlargs
from gateway.adapters import PROTOCOLS, embeddings, record
from gateway.call import Call
from gateway.calls import calls
from gateway.callwsgi import Answer, CallRequest
from gateway.client_headers import forwarded_headers
from gateway.errors import (
    ANTHROPIC,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    GatewayError,
    InvalidRequest,
    MalformedJSON,
    PayloadTooLarge,
    error_body,
)
from gateway.exchange import EMBEDDING, Exchange
from gateway.limiter import limiter
from gateway.plan import CHAT, EMBEDDINGS, Plan
from gateway.routing import Candidate, catalog, weighted_order

log = logging.getLogger(__name__)

bp = urlargs.AnySlash("proxy", __name__)

FORMAT_BY_PATH = {
    "/v1/chat/completions": OPENAI_CHAT,
    "/v1/messages": ANTHROPIC,
    "/v1/messages/count_tokens": ANTHROPIC,
    "/v1/responses": OPENAI_RESPONSES,
}

_EVENT_STREAM = [
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
    ("Content-Type", "text/event-stream; charset=utf-8"),
]


def chat_completions(req: CallRequest) -> Response | Answer:
    return _complete(req, OPENAI_CHAT)


def messages(req: CallRequest) -> Response | Answer:
    return _complete(req, ANTHROPIC)


def responses(req: CallRequest) -> Response | Answer:
    return _complete(req, OPENAI_RESPONSES)


def count_tokens(req: CallRequest) -> Response:
    """Anthropic's token count: the provider's own, or an estimate; never recorded."""
    caller = _authenticate(req)
    body = _json_body(req)
    ir = token_count.parse(body)
    # Admitted as every call is (it may reach the provider, as Anthropic limits it by
    # RPM too), then given back: a count is neither recorded nor charged to TPM.
    permit = _admit(req, caller, ir["model"], stream=False)
    try:
        tokens, source = token_count.count(
            _candidates(req, ir["model"], "chat"),
            body,
            ir,
            forwarded_headers(req.environ),
            float(req.app.config["COUNT_TOKENS_TIMEOUT"]),
        )
    finally:
        permit.cancel()
    answer = jsonio.response({"input_tokens": tokens})
    answer.headers[token_count.SOURCE_HEADER] = source
    return answer


def create_embeddings(req: CallRequest) -> Response | Answer:
    caller = _authenticate(req)
    body = _json_body(req)
    parsed = embeddings.parse_request(body)
    permit = _admit(req, caller, parsed["model"], stream=False)
    with _until_opened(permit):
        candidates = _candidates(req, parsed["model"], "embedding")
        headers = forwarded_headers(req.environ)
        exchange = Exchange(
            api_key_id=caller.id,
            model=parsed["model"],
            api_format=embeddings.NAME,
            prompt=parsed["input"],
            kind=EMBEDDING,
            uid=permit.uid,
            trace_parent=req.heads.get("traceparent"),
            trace_state=req.heads.get("tracestate"),
        )
        plan = Plan(
            exchange, candidates, embeddings.NAME, parsed, body, headers, EMBEDDINGS, permit
        )
    return _answer(calls.open(plan, _client_socket(req)))


View = Callable[[CallRequest], Response | Answer]
# The call routes: each takes POST only, with a final slash or without (as NexusGate's).
CALLS: dict[str, View] = {
    "/v1/chat/completions": chat_completions,
    "/v1/messages": messages,
    "/v1/responses": responses,
    "/v1/messages/count_tokens": count_tokens,
    "/v1/embeddings": create_embeddings,
}
_SERVED = {**CALLS, **{path + "/": view for path, view in CALLS.items()}}


def _through_flask(view: View) -> Callable[[], Response | Answer]:
    def serve() -> Response | Answer:
        return _serve(view, CallRequest(request.environ, current_app._get_current_object()))

    serve.__name__ = serve.__qualname__ = view.__name__
    serve.__doc__ = view.__doc__
    return serve


for _path, _view in CALLS.items():
    bp.add_url_rule(_path, view_func=_through_flask(_view), methods=["POST"])


class CallRoutes:
    """WSGI middleware serving a POST to a call path itself; the rest goes to Flask.

    Only what Flask would do for such a request is left out (no session, hook or URL
    converter concerns it); errors render alike (``_serve``), and an unhandled one is
    handed to Flask's ``handle_exception``, in a request context made for it.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.flask = app.wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        view = (
            _SERVED.get(environ.get("PATH_INFO", ""))
            if environ["REQUEST_METHOD"] == "POST"
            else None
        )
        if view is None:
            with db.bounded():  # the admin API and the dashboard read the database
                return self.flask(environ, start_response)
        return _serve(view, CallRequest(environ, self.app))(environ, start_response)


def _serve(view: View, req: CallRequest) -> Response | Answer:
    """``view``'s answer, its errors rendered in the caller's protocol, with its limits."""
    try:
        response = view(req)
    except GatewayError as exc:
        response = _error(exc, req.path)
    except HTTPException as exc:
        response = _http_error(exc, req.path, req.max_content_length)
    except Exception as exc:
        response = _crashed(req, exc)
    _limit_headers(req, response)
    permit = req.permit
    if permit is not None and permit.owes:  # paid once the answer is written
        if isinstance(response, Answer):
            response.after = permit.pay
        else:
            response.call_on_close(permit.pay)
    return response


def _crashed(req: CallRequest, exc: Exception) -> Response:
    """Flask's own answer to an unhandled error: its log line (to ``srvlog`` too), its
    PROPAGATE_EXCEPTIONS, its 500 rendered by ``render_http_error``."""
    if has_request_context():
        return req.app.handle_exception(exc)
    with req.app.request_context(req.environ):
        return req.app.handle_exception(exc)


def _complete(req: CallRequest, api_format: str) -> Response | Answer:
    caller = _authenticate(req)
    body = _json_body(req)
    if "stream" not in body and _accepts_event_stream(req):
        body["stream"] = True
    ir = PROTOCOLS[api_format].parse_request(body)
    req_id = dedup.request_id(req.heads.get(dedup.HEADER))
    permit = _admit(req, caller, ir["model"], ir["stream"])
    with _until_opened(permit):
        stored = replay.lookup(permit, req_id) if req_id else None
        headers = forwarded_headers(req.environ)
        exchange = Exchange(
            api_key_id=caller.id,
            model=ir["model"],
            api_format=api_format,
            stream=ir["stream"],
            prompt=record.prompt(ir, headers),
            req_id=permit.req_id,
            uid=permit.uid,
            trace_parent=req.heads.get("traceparent"),
            trace_state=req.heads.get("tracestate"),
        )
        if stored is not None:
            return _replayed(replay.answer(permit, exchange, stored, api_format, ir))
        candidates = _candidates(req, ir["model"], "chat")
        plan = Plan(exchange, candidates, api_format, ir, body, headers, CHAT, permit)
    interim = req.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
    return _answer(calls.open(plan, _client_socket(req), interim))


def _authenticate(req: CallRequest) -> auth.Caller:
    """The calling key (AuthenticationFailed if none); its limits go on every answer."""
    req.caller = auth.authenticate(req.heads)
    return req.caller


def _admit(req: CallRequest, caller: auth.Caller, model: str, stream: bool) -> admission.Permit:
    """Admit the call now (RateLimited, 429, if a limit refuses it)."""
    req.permit = admission.admit(caller, model, stream)
    return req.permit


@contextmanager
def _until_opened(permit: admission.Permit) -> Iterator[None]:
    """Give the permit back if the call is refused before it opens (unknown model, 409...)."""
    try:
        yield
    except BaseException:
        permit.cancel()
        raise


def _limit_headers(req: CallRequest, response: Response | Answer) -> None:
    """X-RateLimit-* on every /v1 answer once the key is known (errors included)."""
    caller = req.caller
    answer = isinstance(response, Answer)  # a call's own, which has none yet
    if caller is None or (not answer and "X-RateLimit-Limit-RPM" in response.headers):
        return
    permit = req.permit
    standing = (
        permit.admission
        if permit is not None
        else limiter.standing(caller.id, caller.rpm_limit, caller.tpm_limit)
    )
    if answer:
        response.headers += standing.headers().items()
    else:
        response.headers.update(standing.headers())


def _candidates(req: CallRequest, model: str, model_type: str) -> list[Candidate]:
    """Who may serve ``model``, in the order to try them (NotFound if nobody)."""
    provider = req.heads.get("X-NexusGate-Provider")
    return weighted_order(
        catalog.lookup(model, model_type, unquote(provider) if provider else None)
    )


def _replayed(answer: bytes | replay.Written) -> Response:
    """A stored answer for a repeat: a whole stream, or JSON."""
    if isinstance(answer, replay.Written):
        headers = {"Cache-Control": "no-cache", "Content-Length": str(len(answer.piece.data))}
        return Response(answer, mimetype="text/event-stream", headers=headers)
    return Response(answer, mimetype="application/json")


def _answer(call: Call) -> Response | Answer:
    """The response for an opened call: its stream, its JSON, or nothing if nobody waits."""
    if call.abandoned:
        return Response(status=499)  # nobody is listening; the call is still recorded
    if call.stream:
        # The body is passed through as it is: werkzeug's wrapping iterators would sit on
        # every open stream's stack (about 3 KB each, issue 11).
        return Answer(call.body(), _EVENT_STREAM)
    return Answer(call.content, [("Content-Type", "application/json")])


def _json_body(req: CallRequest) -> dict[str, Any]:
    """The body as a JSON object, strictly parsed (``jsonio``): MalformedJSON if not."""
    try:
        body = jsonio.loads(jsonio.read(req))
    except RequestEntityTooLarge as exc:
        raise _too_large(req.max_content_length) from exc
    except jsonio.Unreadable as exc:
        raise MalformedJSON(str(exc)) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _too_large(limit: int | None) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the gateway's limit of {limit} bytes")


def _accepts_event_stream(req: CallRequest) -> bool:
    """``Accept: text/event-stream`` with q > 0, the exact media type (not */*).

    Werkzeug's parse of the header (about 5 µs) only where the type may be in it: most
    calls without ``stream`` are an SDK's JSON calls, which accept ``application/json``.
    """
    if "text/event-stream" not in req.environ.get("HTTP_ACCEPT", ""):
        return False
    return any(value == "text/event-stream" and q > 0 for value, q in req.accept_mimetypes)


def _client_socket(req: CallRequest) -> Any:
    # gunicorn's gevent worker calls it gunicorn.socket; gevent_pywsgi gunicorn.sock.
    return req.environ.get("gunicorn.socket") or req.environ.get("gunicorn.sock")


def render_error(exc: GatewayError) -> Response:
    """A GatewayError in the caller's protocol."""
    return _error(exc, request.path)


def render_http_error(exc: HTTPException) -> Response | HTTPException:
    """Werkzeug's HTTP errors as JSON on API paths (protocol-shaped on /v1)."""
    return _http_error(exc, request.path, current_app.config["MAX_CONTENT_LENGTH"])


def _error(exc: GatewayError, path: str) -> Response:
    protocol = FORMAT_BY_PATH.get(path.rstrip("/"), OPENAI_CHAT)
    return Response(
        exc.body(protocol), status=exc.status, headers=exc.headers(), mimetype="application/json"
    )


def _http_error(exc: HTTPException, path: str, limit: int | None) -> Response | HTTPException:
    if isinstance(exc, RequestEntityTooLarge):
        return _error(_too_large(limit), path)
    if path.startswith("/api/"):
        return jsonio.response({"error": exc.description or exc.name}, exc.code or 500)
    if not path.startswith("/v1/"):
        return exc
    protocol = FORMAT_BY_PATH.get(path.rstrip("/"), OPENAI_CHAT)
    kind = "not_found_error" if exc.code == 404 else "invalid_request_error"
    body = error_body(
        protocol, kind, exc.description or exc.name, code=exc.name.lower().replace(" ", "_")
    )
    return jsonio.response(body, exc.code or 500)
