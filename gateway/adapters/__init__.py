"""Wire protocols around one internal representation (``ir.py``). Pure code.

Each protocol is a package (``openai_chat``, ``anthropic``, ``openai_responses``) of
``request.py``, ``response.py`` and ``stream.py``, and offers the same face in its
``__init__``, so a client format and a provider format combine freely::

    NAME                                   the api_format recorded for its clients
    parse_request(body) -> ir request      validate a client body (InvalidRequest
                                           naming the field) and convert it
    build_request(ir, model, stream_usage) -> body   for an upstream of this protocol
    parse_response(body) -> ir response    an upstream's non-streaming answer
    render_response(resp, request) -> body the answer as this protocol's client expects
    StreamParser().feed(sse.Event) -> [ir events]; .finish() -> [ir events]
    StreamRenderer(request).feed(ir event) -> [bytes]; .finish() -> [bytes]
    stream_error(message) -> bytes         error frames that end a client's stream

No protocol imports another: what they share is in ``ir``, ``parsing``, ``wire`` and
``rendering``. ``embeddings`` (OpenAI's, served by every provider type) and ``record``
(the stored shapes) sit beside them. This module maps provider types to protocols and
shapes the body sent upstream; where it goes is the wire's business (``upstream.endpoint``).
"""

from __future__ import annotations

from types import ModuleType

from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES

from . import anthropic, openai_chat, openai_responses

PROTOCOLS: dict[str, ModuleType] = {
    OPENAI_CHAT: openai_chat,
    ANTHROPIC: anthropic,
    OPENAI_RESPONSES: openai_responses,
}

# Provider type -> the protocol its upstream speaks.
PROVIDER_PROTOCOLS = {
    "openai": OPENAI_CHAT,
    "openai-responses": OPENAI_RESPONSES,
    "anthropic": ANTHROPIC,
    "azure": OPENAI_CHAT,
    "ollama": OPENAI_CHAT,
}
PROVIDER_TYPES = tuple(PROVIDER_PROTOCOLS)


def upstream_body(
    client_format: str,
    upstream_format: str,
    body: dict,
    request: dict,
    remote_model: str,
    *,
    stream_usage: bool = True,
) -> dict:
    """The JSON to send upstream: the client's own body when the formats match."""
    if client_format != upstream_format:
        return PROTOCOLS[upstream_format].build_request(request, remote_model, stream_usage)
    out = {**body, "model": remote_model}
    if request["stream"]:
        out["stream"] = True  # also when the client asked by Accept: text/event-stream
        if upstream_format == OPENAI_CHAT and stream_usage:
            out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return out
