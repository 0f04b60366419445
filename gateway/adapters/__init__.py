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
builds upstream endpoints.
"""

from __future__ import annotations

from types import ModuleType
from urllib.parse import quote, urlencode

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

ANTHROPIC_VERSION = "2023-06-01"
AZURE_API_VERSION = "2024-10-21"

_PATHS = {OPENAI_CHAT: "chat/completions", ANTHROPIC: "messages", OPENAI_RESPONSES: "responses"}


def endpoint(
    provider_type: str,
    base_url: str,
    api_key: str | None,
    api_version: str | None,
    remote_model: str,
    operation: str = "chat",
) -> tuple[str, dict[str, str]]:
    """URL and auth headers for ``operation``: ``chat``, ``embeddings`` or ``models``."""
    base = base_url.rstrip("/")
    protocol = PROVIDER_PROTOCOLS[provider_type]
    path = _PATHS[protocol] if operation == "chat" else operation
    headers: dict[str, str] = {}
    if provider_type == "azure":
        if api_key:
            headers["api-key"] = api_key
        query = urlencode({"api-version": api_version or AZURE_API_VERSION})
        resource = base.split("/openai", 1)[0]
        if operation == "models":
            return f"{resource}/openai/models?{query}", headers
        # Deployment URL: {resource}/openai/deployments/{deployment}/{path}?api-version=
        if "/deployments/" not in base:
            base = f"{resource}/openai/deployments/{quote(remote_model, safe='')}"
        return f"{base}/{path}?{query}", headers
    if provider_type == "anthropic":
        # Accept a base URL given with or without its trailing /v1.
        base = base.removesuffix("/v1")
        if api_key:
            headers["x-api-key"] = api_key
        headers["anthropic-version"] = api_version or ANTHROPIC_VERSION
        return f"{base}/v1/{path}", headers
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return f"{base}/{path}", headers


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
