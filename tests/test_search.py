"""A search read from a query string and written back: strict for the API, lenient for pages."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway import search
from gateway.search import Search, parse

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_every_filter_round_trips_through_its_url() -> None:
    args = {
        "q": 'timeout "connection pool" 数据库',
        "status": "failed,aborted",
        "model": "gpt-4o",
        "apiKeyId": "3",
        "modelId": "4",
        "providerId": "2",
        "apiFormat": "anthropic",
        "from": "2026-11-01T08:00:00",
        "to": "2026-11-02T08:30:15",
        "range": "7d",
        "minDuration": "1500",
        "maxTtft": "800.5",
        "minTokens": "10",
        "maxCost": "0.25",
    }
    found = parse(args, strict=True, zone=SHANGHAI)
    assert found.since == datetime(2026, 11, 1, 0, 0)  # 08:00 in Shanghai is midnight UTC
    assert found.status == ("failed", "aborted") and found.api_key == 3
    assert found.bounds == {
        "Duration": (1500, None),
        "Ttft": (None, 800.5),
        "Tokens": (10, None),
        "Cost": (None, 0.25),
    }
    assert found.params(SHANGHAI) == args
    assert parse(found.params(SHANGHAI), strict=True, zone=SHANGHAI) == found
    assert Search().params() == {} and not Search().filtered and found.filtered


def test_terms_are_words_and_quoted_phrases() -> None:
    found = parse({"q": ' disk  "connection   pool" -- 全文检索 "" !!'}, strict=True)
    assert found.terms() == ["disk", "connection pool", "全文检索"]
    assert parse({"q": "a " * 40}, strict=True).terms() == ["a"] * search.MAX_TERMS


def test_a_bare_date_to_means_the_whole_day() -> None:
    found = parse({"from": "2026-11-01", "to": "2026-11-01"}, strict=True)
    assert (found.since, found.until) == (datetime(2026, 11, 1), datetime(2026, 11, 2))
    assert parse({"to": "2026-11-01T10:00:00Z"}, strict=True).until == datetime(2026, 11, 1, 10)
    assert parse({"to": "2026-11-01T10:00:00+02:00"}, strict=True).until == datetime(2026, 11, 1, 8)


def test_a_time_past_what_a_datetime_holds_once_moved_is_no_bound() -> None:
    """The last day there is, or the first moved into UTC, is a date like any other: not
    refused as unreadable (as it was, 'must be an ISO 8601 date'), but past every record,
    so no bound."""
    everything = parse({"to": "9999-12-31", "from": "0001-01-01T00:00:00+08:00"}, strict=True)
    assert everything == Search()
    assert parse({"to": "9999-12-31T23:00:00-05:00"}, strict=True).until is None
    assert parse({"from": "0001-01-01"}, strict=True, zone=SHANGHAI).since is None
    assert parse({"to": "9999-12-30"}, strict=True).until == datetime(9999, 12, 31)
    with pytest.raises(search.Invalid, match="ISO 8601"):
        parse({"to": "9999-13-01"}, strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"status": "done"}, "status must be one of pending, completed"),
        ({"apiKeyId": "x"}, "apiKeyId must be an integer from 1"),
        ({"providerId": "0"}, "providerId must be an integer from 1"),
        ({"from": "yesterday"}, "from must be an ISO 8601 date"),
        ({"to": "２０２６-01-01"}, "to must be an ISO 8601 date"),  # noqa: RUF001 - fullwidth digits
        ({"range": "3h"}, "range must be one of 15m, 1h, 24h, 7d, 30d"),
        ({"minDuration": "fast"}, "minDuration must be a number"),
        ({"maxCost": "1e9"}, "maxCost must be a number"),
        ({"q": "x" * 501}, "q must be at most 500 characters"),
        ({"apiFormat": "f" * 32}, "apiFormat must be at most 31 characters"),
    ],
)
def test_strict_parsing_names_what_it_refuses(args: dict, message: str) -> None:
    with pytest.raises(search.Invalid, match=message):
        parse(args, strict=True)
    assert parse(args, strict=False) == Search()  # a page drops it instead


def test_what_a_table_does_not_offer_is_refused_or_dropped() -> None:
    args = {"minTtft": "5", "q": "hello", "minDuration": "1"}
    with pytest.raises(search.Invalid, match="minTtft and maxTtft are not available"):
        parse(args, strict=True, bounds=("Duration",), text=False)
    with pytest.raises(search.Invalid, match=r"q \(full-text search\) is not available"):
        parse({"q": "hello"}, strict=True, text=False)
    lenient = parse(args, strict=False, bounds=("Duration",), text=False)
    assert lenient == Search(bounds={"Duration": (1, None)})


def test_the_dashboard_s_older_key_argument_still_works() -> None:
    assert parse({"key": "5"}, strict=False).api_key == 5
    assert parse({"key": "5"}, strict=False).params() == {"apiKeyId": "5"}
