"""Values from URLs and forms: row ids, integers, redirect targets (pure units)."""

from __future__ import annotations

import pytest
from werkzeug.exceptions import NotFound
from werkzeug.routing import Map, Rule

from gateway import urlargs


def test_a_row_id_is_1_to_2_63_minus_1_in_ascii_digits() -> None:
    urls = Map([Rule("/p/<id:n>", endpoint="p")], converters={"id": urlargs.IdConverter})
    adapter = urls.bind("localhost")
    assert adapter.match("/p/1") == ("p", {"n": 1})
    assert adapter.match(f"/p/{urlargs.MAX_ID}") == ("p", {"n": urlargs.MAX_ID})
    for bad in ("0", "007", "-1", f"{urlargs.MAX_ID + 1}", "9" * 40, "\u0661", "1.0", "+1"):
        with pytest.raises(NotFound):
            adapter.match(f"/p/{bad}")
    assert adapter.build("p", {"n": 42}) == "/p/42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5", 5), ("-3", -3), ("0", 0), ("", None), (None, None), (" 5", None), ("5 ", None),
     ("+5", None), ("1_000", None), ("\u0661\u0662", None), ("\uff15", None), ("5.0", None),
     ("1" * 20, None), ("11", None)],
)  # fmt: skip
def test_an_integer_is_ascii_digits_within_bounds(text: str | None, expected: int | None) -> None:
    assert urlargs.integer(text, -10, 10) == expected


@pytest.mark.parametrize(
    "target",
    ["/", "/requests?status=failed&model=gpt-4o", "/requests/12#x", "/a/b%2F%2Fc", "/a//b"],
)
def test_a_local_path_is_a_redirect_target(target: str) -> None:
    assert urlargs.local_path(target) == target


@pytest.mark.parametrize(
    "target",
    [
        None, "", "requests", "https://evil.example/", "//evil.example", "/\\evil.example",
        "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", " //evil.example",
        "\\\\evil.example", "/%09/evil.example".replace("%09", "\t"), "/x\x00", "/x\x7f",
        "/ /evil.example", "http:evil.example",
    ],
)  # fmt: skip
def test_anything_a_browser_could_read_as_another_site_is_refused(target: str | None) -> None:
    assert urlargs.local_path(target) is None
