"""What of a secret may be shown, logged or forwarded: pure units."""

from __future__ import annotations

import pytest

from gateway import redact

KEY = "sk-0123456789abcdef0123456789ABCDEF"


def test_a_gateway_key_anywhere_in_text_is_cut_to_its_hint() -> None:
    assert redact.hint(KEY) == "sk-0123…CDEF"
    line = f"GET /api/admin/apiKey/{KEY}/usage?apiKey={KEY}&x=sk-short HTTP/1.1"
    assert redact.keys_in(line) == (
        "GET /api/admin/apiKey/sk-0123…CDEF/usage?apiKey=sk-0123…CDEF&x=sk-short HTTP/1.1"
    )
    assert KEY not in redact.keys_in(KEY + "ff")  # a longer run of hex is cut too
    assert redact.keys_in(KEY.upper()) == "SK-0123…CDEF"


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        (None, None),
        ("", None),
        ("short", "****"),
        ("abcdefghijk", "****"),  # 11 characters: nothing of it
        ("sk-up-1234567890", "…7890"),  # 16: the last four only
        ("sk-provider-secret-1234", "sk-…1234"),  # long enough: 7 of 23
    ],
)
def test_a_provider_key_is_never_mostly_shown(secret: str | None, shown: str | None) -> None:
    assert redact.mask(secret) == shown
    if secret:
        visible = sum(c != "…" and c != "*" for c in shown)
        assert visible <= 4 or visible <= len(secret) // 3


@pytest.mark.parametrize(
    "name",
    [
        "Authorization", "x-api-key", "api-key", "X-Goog-Api-Key", "Cookie-Token",
        "x-auth-user", "Proxy-Authorization", "x-secret", "x-session-id", "password",
        "x-amz-security-token", "x-credential",
    ],
)  # fmt: skip
def test_credential_headers_by_name(name: str) -> None:
    assert redact.credential_header(name)


def test_credential_headers_by_value_and_the_rest_pass() -> None:
    assert redact.credential_header("x-custom", "Bearer abc")
    assert redact.credential_header("x-custom", "  basic dXNlcjpwYXNz")
    for name in ("anthropic-beta", "openai-beta", "x-request-id", "user-agent", "x-stainless-os"):
        assert not redact.credential_header(name, "value")
