"""Errors the gateway answers with, and how each protocol spells them.

Raise from any depth before the first byte of a response; one handler renders the
error in the caller's protocol. After the first byte nothing is raised: failures
become a stream error event and are recorded. Pure code: no Flask here.

    GatewayError                  500  api_error
    ├── InvalidRequest            400  invalid_request_error   (names the field)
    │   └── MalformedJSON         400  invalid_request_error
    ├── AuthenticationFailed      401  authentication_error
    ├── BudgetExceeded            402  billing_error            (Retry-After: next month)
    ├── NotFound                  404  not_found_error          (unknown model)
    ├── RequestInFlight           409  conflict                 (Retry-After; req_id, started_at)
    ├── PayloadTooLarge           413  request_too_large
    ├── RateLimited               429  rate_limit_error         (Retry-After)
    ├── UpstreamFailed            502  upstream_error           (every candidate failed)
    │   └── UpstreamTimeout       504  upstream_error
    ├── ServiceUnavailable        503  overloaded_error         (gateway shutting down)
    └── UpstreamRejected          4xx  the upstream's own status and message
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

OPENAI_CHAT = "openai-chat"
ANTHROPIC = "anthropic"
OPENAI_RESPONSES = "openai-responses"


class GatewayError(Exception):
    """Base: an HTTP status, a message for the client, an error kind and code."""

    status = 500
    kind = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}

    def details(self) -> dict[str, Any]:
        """Fields of the error object beyond its type, message and code (every protocol)."""
        return {}

    def body(self, protocol: str) -> bytes:
        """The JSON error body in the caller's protocol."""
        return json.dumps(
            error_body(protocol, self.kind, self.message, self.code, self.param, self.details())
        ).encode()


class InvalidRequest(GatewayError):
    status, kind, code = 400, "invalid_request_error", "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class MalformedJSON(InvalidRequest):
    code = "invalid_json"


class AuthenticationFailed(GatewayError):
    status, kind, code = 401, "authentication_error", "invalid_api_key"


class BudgetExceeded(GatewayError):
    """The key spent its monthly budget: 402, which SDKs do not retry (a 429 they would)."""

    status, kind, code = 402, "billing_error", "budget_exceeded"


class NotFound(GatewayError):
    status, kind, code = 404, "not_found_error", "model_not_found"


class RequestInFlight(GatewayError):
    """A repeat of a request id whose first call still runs: which id, and since when.

    ``req_id``, ``retry_after`` and ``started_at`` (ISO 8601 UTC) ride in the error
    object as NexusGate's do, so clients written against it read them unchanged.
    """

    status, kind, code = 409, "conflict", "request_in_flight"

    def __init__(self, message: str, *, req_id: str, retry_after: int, started_at: str) -> None:
        super().__init__(message, retry_after=retry_after)
        self.req_id = req_id
        self.started_at = started_at

    def details(self) -> dict[str, Any]:
        """NexusGate's fields of a request in flight."""
        return {
            "req_id": self.req_id,
            "retry_after": self.retry_after,
            "started_at": self.started_at,
        }


class PayloadTooLarge(GatewayError):
    status, kind, code = 413, "request_too_large", "request_too_large"


class RateLimited(GatewayError):
    status, kind, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, limits: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limits = limits  # the X-RateLimit-* headers of the refusal

    def headers(self) -> dict[str, str]:
        """Retry-After, and what is left of the key's limits."""
        return {**super().headers(), **self.limits}


class UpstreamFailed(GatewayError):
    status, kind, code = 502, "upstream_error", "all_providers_failed"


class UpstreamTimeout(UpstreamFailed):
    status, code = 504, "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status, kind, code = 503, "overloaded_error", "shutting_down"


class UpstreamRejected(GatewayError):
    """A non-retriable upstream answer (a 4xx other than 429), passed on with its status.

    Its body goes to the client as sent when it is already in the client's protocol
    shape; otherwise (an OpenAI-format provider refusing an Anthropic client, or the
    other way round) its message is put in the client's shape, so the client's SDK can
    read it.
    """

    kind, code = "upstream_error", "upstream_rejected"

    def __init__(self, status: int, content: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.content = content
        self.content_type = content_type

    def body(self, protocol: str) -> bytes:
        """The upstream's body if the client can read it as is; else its message, reshaped."""
        error = self._json()
        if error is None:
            text = self.content.decode("utf-8", errors="replace")[:2000]
            message = f"upstream answered {self.status}: {text}"
            return json.dumps(
                error_body(protocol, "upstream_error", message, "unparseable_error")
            ).encode()
        # Anthropic's bodies say "type": "error" beside the error object; OpenAI's do not.
        anthropic_shaped = error.get("type") == "error"
        if isinstance(error.get("error"), dict) and anthropic_shaped == (protocol == ANTHROPIC):
            return self.content
        detail = error.get("error") if isinstance(error.get("error"), dict) else error
        message = detail.get("message") or error.get("error")
        if not isinstance(message, str) or not message:
            text = self.content.decode("utf-8", errors="replace")[:2000]
            message = f"upstream answered {self.status}: {text}"
        code = detail.get("code") or detail.get("type")
        kind = _KINDS_BY_STATUS.get(self.status, "invalid_request_error")
        return json.dumps(error_body(protocol, kind, message, code=code)).encode()

    def _json(self) -> dict | None:
        if not self.content_type or "json" not in self.content_type:
            return None
        try:
            data = json.loads(self.content)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


_KINDS_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
}


# Anthropic's error types; every other kind is spelled as OpenAI spells it.
_ANTHROPIC_KINDS = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit_error": "rate_limit_error",
    "overloaded_error": "overloaded_error",
    "conflict": "conflict",
    "billing_error": "billing_error",
}
_OPENAI_KINDS = {
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "overloaded_error": "server_error",
    "api_error": "server_error",
    "billing_error": "insufficient_quota",  # OpenAI's type for a spent quota
}


def error_body(
    protocol: str,
    kind: str,
    message: str,
    code: str | None = None,
    param: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict:
    """An error object as the protocol's own SDK expects to parse it.

    ``details`` are further fields of the error object, after the protocol's own (which
    they never replace); SDKs keep fields they do not know.
    """
    error: dict[str, Any]
    if protocol == ANTHROPIC:
        error = {"type": _ANTHROPIC_KINDS.get(kind, "api_error"), "message": message}
    else:
        error = {
            "message": message,
            "type": _OPENAI_KINDS.get(kind, kind),
            "param": param,
            "code": code,
        }
    for name, value in (details or {}).items():
        error.setdefault(name, value)
    if protocol == ANTHROPIC:
        return {"type": "error", "error": error}
    # NexusGate's Responses errors say what they are beside the error object, as OpenAI's
    # Responses objects do (``object: "response"``); OpenAI's SDK reads ``error`` alone.
    return {"object": "error", "error": error} if protocol == OPENAI_RESPONSES else {"error": error}
