"""Anthropic's ``POST /v1/messages/count_tokens``: the provider's own count, or an estimate.

Claude Code asks before its turns. The body is checked as a Messages body (without
``max_tokens``, which a count has no use for), the model routed as for ``/v1/messages``,
and the first ``anthropic`` provider among its candidates, in weighted order, is asked
(its ``/v1/messages/count_tokens``, the client's body naming the provider's model).
One that refuses the body (a 4xx) gives the client its refusal; one that cannot answer
(down, 429, 5xx, past ``COUNT_TOKENS_TIMEOUT``) passes to the next. When no anthropic
provider serves the model, or none answered, the count is estimated here, and the
answer's ``X-Token-Count-Source`` header says ``estimate`` (else ``provider``).
A count is not a call: it is never recorded, priced or limited.

The estimate (``estimate``), for models whose own tokenizer is not at hand: text (system,
messages, tool calls and results, thinking, tool definitions as JSON) at 4 ASCII
characters per token, 1 token per CJK character and 2 other characters per token; 1,600
tokens per image or document (Anthropic's size for an image near its 1.15 megapixel
limit); 3 per message and 300 when tools are offered (the tool-use system prompt). It
runs within about 20% of Anthropic's counts on English prose and code, and errs high
on small images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable

import gevent

from gateway.adapters import anthropic
from gateway.errors import UpstreamRejected
from gateway.routing import Candidate
from gateway.upstream import UpstreamError, endpoint, upstream

log = logging.getLogger(__name__)

PROVIDER, ESTIMATE = "provider", "estimate"
SOURCE_HEADER = "X-Token-Count-Source"
IMAGE_TOKENS = 1600
MESSAGE_TOKENS = 3
TOOLS_TOKENS = 300
_CJK = ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))


def parse(body: dict) -> dict:
    """The IR of a count_tokens body, checked as a Messages body (InvalidRequest if not)."""
    if isinstance(body, dict) and "max_tokens" not in body:
        body = {**body, "max_tokens": 1}  # a count has no answer to bound
    return anthropic.parse_request(body)


def count(
    candidates: list[Candidate],
    body: dict,
    request: dict,
    headers: dict[str, str],
    timeout: float,
) -> tuple[int, str]:
    """The prompt's input tokens and where the number came from: PROVIDER or ESTIMATE."""
    for candidate in candidates:
        if candidate.provider_type != "anthropic":
            continue
        timer = gevent.Timeout(timeout)
        timer.start()
        try:
            return _ask(candidate, body, headers), PROVIDER
        except UpstreamError as exc:
            if exc.kind == "http" and not exc.retriable:
                raise UpstreamRejected(exc.status or 400, exc.content, exc.content_type) from exc
            why = exc.describe()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            why = f"no answer within COUNT_TOKENS_TIMEOUT ({timeout:g} s)"
        finally:
            timer.close()
        log.warning("count_tokens: %s could not count: %s", candidate.provider_name, why)
    return estimate(request), ESTIMATE


def _ask(candidate: Candidate, body: dict, headers: dict[str, str]) -> int:
    url, auth = endpoint(
        "anthropic",
        candidate.base_url,
        candidate.api_key,
        candidate.api_version,
        candidate.remote_id,
        "chat",
    )
    payload = json.dumps({**body, "model": candidate.remote_id}).encode()
    resp = upstream.post(f"{url}/count_tokens", {**headers, **auth}, payload, stream=False)
    try:
        _, tokens = resp.answer(lambda data: data["input_tokens"])
    finally:
        resp.close()
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise UpstreamError("protocol", f"count_tokens answered {tokens!r}")
    return tokens


def estimate(request: dict) -> int:
    """An estimate of an IR request's input tokens (the method is the module's docstring)."""
    texts: list[str] = []
    media = 0
    for block in _blocks(request):
        kind = block.get("type")
        if kind == "image" or kind == "document":
            media += 1
        elif kind == "tool_call":
            texts += [block.get("name") or "", block.get("arguments") or ""]
        elif isinstance(block.get("text"), str):
            texts.append(block["text"])
    tools = request.get("tools") or []
    if tools:
        texts.append(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    tokens = sum(_text_tokens(t) for t in texts) + media * IMAGE_TOKENS
    tokens += MESSAGE_TOKENS * (len(request.get("messages") or []) + 1)
    return tokens + (TOOLS_TOKENS if tools else 0)


def _blocks(request: dict) -> Iterable[dict]:
    """Every content block of a request: system, messages, and inside tool results."""
    stack = list(request.get("system") or [])
    for message in request.get("messages") or []:
        stack += message.get("content") or []
    while stack:
        block = stack.pop()
        if block.get("type") == "tool_result":
            stack += block.get("content") or []
        yield block


def _text_tokens(text: str) -> int:
    ascii_chars = cjk = other = 0
    for char in text:
        point = ord(char)
        if point < 128:
            ascii_chars += 1
        elif any(low <= point <= high for low, high in _CJK):
            cjk += 1
        else:
            other += 1
    return math.ceil(ascii_chars / 4) + cjk + math.ceil(other / 2)
