"""What of a secret may be shown, logged, forwarded or kept. Pure: no I/O.

- A gateway key (``sk-`` and 32 hex digits) is shown as its hint, ``sk-1a2b…9f0e``,
  wherever it turns up in text (the access log's request line, for one).
- A provider key is masked: enough to recognise it, never most of it.
- A header whose name says it carries a credential (``authorization``, ``x-api-key``,
  ``x-goog-api-key``, anything with key, token, secret, auth, password, credential or
  session in its name), or whose value starts with an HTTP auth scheme, is a
  credential: never forwarded upstream, kept in a record or written to a log.
"""

from __future__ import annotations

import re

GATEWAY_KEY = re.compile(r"sk-[0-9a-f]{32}", re.IGNORECASE)
# Credential-like header names, by the words they contain, and values that carry an
# HTTP auth scheme whatever the header is called.
_CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "password", "credential", "session")
_CREDENTIAL_VALUE = re.compile(r"\s*(bearer|basic|digest)\s", re.IGNORECASE)


def hint(key: str) -> str:
    """What may be shown of a gateway key: its start and its last four characters."""
    return f"{key[:7]}…{key[-4:]}"


def keys_in(text: str) -> str:
    """``text`` with every gateway key in it cut down to its hint."""
    return GATEWAY_KEY.sub(lambda m: hint(m.group()), text)


def mask(secret: str | None) -> str | None:
    """Enough of a provider key to recognise it, not to use it."""
    if not secret:
        return None
    if len(secret) < 20:  # a short key shows at most its last 4 characters, or nothing
        return "…" + secret[-4:] if len(secret) >= 12 else "****"
    return f"{secret[:3]}…{secret[-4:]}"


def credential_header(name: str, value: str = "") -> bool:
    """True for a header that carries a credential, by its name or an auth scheme in it."""
    return credential_name(name.lower()) or credential_value(value)


def credential_name(lower: str) -> bool:
    """True for a header name (lower-cased) that says it carries a credential."""
    return any(word in lower for word in _CREDENTIAL_WORDS)


def credential_value(value: str) -> bool:
    """True for a header value that starts with an auth scheme (``Bearer ...``)."""
    return bool(_CREDENTIAL_VALUE.match(value))
