"""The upstream client: proxy settings from the environment, failure classification."""

from __future__ import annotations

import pytest

from gateway.upstream import UpstreamError, _proxies_for


@pytest.fixture(autouse=True)
def _clean_proxy_cache(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    _proxies_for.cache_clear()
    yield
    _proxies_for.cache_clear()


def test_proxies_come_from_the_environment_and_honour_no_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "intranet.example,127.0.0.1")
    assert _proxies_for("https", "api.openai.com")["https"] == "http://proxy.internal:3128"
    assert _proxies_for("https", "llm.intranet.example") == {}
    assert _proxies_for("http", "127.0.0.1:8000") == {}


def test_no_proxy_configured_means_direct() -> None:
    assert _proxies_for("https", "api.anthropic.com") == {}


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (UpstreamError("connect", "refused"), True),
        (UpstreamError("timeout", "slow"), True),
        (UpstreamError("reset", "broken"), True),
        (UpstreamError("protocol", "garbage"), True),
        (UpstreamError("invalid", "bad url"), False),
        (UpstreamError("http", "busy", status=429), True),
        (UpstreamError("http", "overloaded", status=529), True),
        (UpstreamError("http", "down", status=503), True),
        (UpstreamError("http", "bad request", status=400), False),
        (UpstreamError("http", "unauthorised", status=401), False),
        (UpstreamError("http", "not found", status=404), False),
        (UpstreamError("http", "conflict", status=409), False),
    ],
)
def test_which_failures_are_worth_another_try(error: UpstreamError, retriable: bool) -> None:
    assert error.retriable is retriable


def test_http_failures_describe_the_upstream_body() -> None:
    error = UpstreamError("http", "x", status=500, content=b'{"error": "boom"}')
    assert error.describe() == 'HTTP 500: {"error": "boom"}'
