"""Stored messages as safe display parts. Pure units."""

from __future__ import annotations

import pytest

from gateway import transcript
from tests.dashboard_seed import png


@pytest.mark.parametrize(
    "url",
    [png(), "https://example.com/cat.png", "http://intranet/cat.jpg"],
)
def test_images_from_data_and_http_urls_are_shown(url: str) -> None:
    assert transcript.image_src(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "data:image/svg+xml;base64,PHN2Zz48c2NyaXB0PmFsZXJ0KDEpPC9zY3JpcHQ+PC9zdmc+",
        "data:text/html;base64,PHNjcmlwdD4=",
        'data:image/png;base64,AAAA"><script>',
        None,
        {"url": "https://example.com"},
    ],
)
def test_anything_else_is_not_an_image_source(url: object) -> None:
    assert transcript.image_src(url) is None


def test_content_parts_in_order() -> None:
    parts = transcript.parts(
        [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "javascript:x", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"format": "wav"}},
        ]
    )
    assert [p["kind"] for p in parts] == ["text", "image", "other"]
    assert parts[1] == {"kind": "image", "src": None, "url": "javascript:x", "detail": "low"}
    assert transcript.parts("plain") == [{"kind": "text", "text": "plain"}]
    assert transcript.parts(None) == []


def test_tool_calls_with_pretty_or_raw_arguments() -> None:
    calls = transcript.tool_calls(
        {
            "tool_calls": [
                {"id": "c1", "function": {"name": "f", "arguments": '{"城市": "杭州"}'}},
                {"id": "c2", "function": {"name": "g", "arguments": '{"cut": '}},
            ]
        }
    )
    assert calls[0] == {"id": "c1", "name": "f", "arguments": '{\n  "城市": "杭州"\n}'}
    assert calls[1]["arguments"] == '{"cut": '  # a stream cut short is shown as it came


def test_preview_is_one_short_line() -> None:
    assert transcript.preview(["", "first\n\nline  two"]) == "first line two"
    assert transcript.preview("x" * 300, 10) == "x" * 9 + "…"


def test_what_a_page_prints_always_encodes() -> None:
    from markupsafe import Markup

    assert transcript.printable("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert transcript.printable("\U0001f600 中") == "\U0001f600 中"
    marked = transcript.printable(Markup("<b>\udc80</b>"))
    assert (
        isinstance(marked, Markup) and marked == "<b>\ufffd</b>"
    )  # still markup: not escaped twice
    assert transcript.printable(7) == 7
    deep: list = []
    for _ in range(5000):  # an answer nested deeper than indenting can recurse
        deep = [deep]
    assert (
        transcript.pretty(deep) in ("…", "[" * 5001 + "]" * 5001)
        or len(transcript.pretty(deep)) > 0
    )
    transcript.pretty("a\ud800").encode("utf-8", "surrogatepass")  # shown as text, no crash
