"""What a search of call records asks for, read from a query string and written back.

One set of names serves the admin API (``/api/admin/completions?...``) and the
dashboard (``/requests?...``), so a search is a URL that works on either path:
``status`` (comma-separated), ``model``, ``apiKeyId``, ``modelId``, ``providerId``,
``apiFormat``, ``from`` and ``to`` (ISO 8601) or a ``range`` preset, ``min``/``max``
bounds of ``Duration`` and ``Ttft`` (ms), ``Tokens`` (prompt + completion) and
``Cost`` (USD), and ``q``, full-text search in the prompt and the answer (words or
"quoted phrases", all of which must match). A bound applies where its columns exist
(cost: the record's total, kept in nano-USD), text search the completions table. The API parses
strictly (``Invalid`` names the argument at fault); the dashboard drops what it
cannot read. No Flask and no queries here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo

from gateway.models import STATUSES
from gateway.urlargs import DECIMAL, MAX_ID, integer

RANGES = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 604800, "30d": 2592000}
# A bound's name in the query string -> the columns it adds up (all must exist).
BOUNDS = {
    "Duration": ("duration",),
    "Ttft": ("ttft",),
    "Tokens": ("prompt_tokens", "completion_tokens"),
    "Cost": ("cost_nanos",),
}
# Columns kept in a unit of their own: how many of it make one of the bound's unit.
SCALES = {"Cost": 1_000_000_000}  # nano-USD per USD
MAX_TEXT = 500  # characters of a full-text query
MAX_TERMS = 16
_TERM = re.compile(r'"([^"]*)"|(\S+)')
_WORD = re.compile(r"\w")


class Invalid(ValueError):
    """An argument a strict parse refuses; the message names it."""


@dataclass(frozen=True)
class Search:
    """Every filter of one search; empty fields filter nothing."""

    status: tuple[str, ...] = ()
    model: str = ""
    api_key: int | None = None
    model_id: int | None = None
    provider: int | None = None
    api_format: str = ""
    since: datetime | None = None  # naive UTC, inclusive
    until: datetime | None = None  # naive UTC, exclusive
    range: str = ""  # a preset: since = now - range, when ``from`` is not given
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    text: str = ""

    @property
    def filtered(self) -> bool:
        return self != Search()

    def window(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        """The time range searched: [since, until), either end open."""
        since = self.since
        if since is None and self.range:
            since = now - timedelta(seconds=RANGES[self.range])
        return since, self.until

    def terms(self) -> list[str]:
        """The full-text query as words and phrases, each of which must match."""
        found = []
        for phrase, word in _TERM.findall(self.text):
            term = " ".join((phrase or word).split())
            if _WORD.search(term):  # punctuation alone matches nothing anywhere
                found.append(term)
        return found[:MAX_TERMS]

    def params(self, zone: tzinfo = UTC) -> dict[str, str]:
        """This search as query arguments (times as local ISO 8601 in ``zone``)."""
        out = {
            "q": self.text,
            "status": ",".join(self.status),
            "model": self.model,
            "apiKeyId": _text(self.api_key),
            "modelId": _text(self.model_id),
            "providerId": _text(self.provider),
            "apiFormat": self.api_format,
            "from": _local(self.since, zone),
            "to": _local(self.until, zone),
            "range": self.range,
        }
        for name, (low, high) in self.bounds.items():
            out[f"min{name}"], out[f"max{name}"] = _text(low), _text(high)
        return {k: v for k, v in out.items() if v}


def parse(
    args: Mapping[str, str],
    *,
    strict: bool,
    bounds: Collection[str] = tuple(BOUNDS),
    text: bool = True,
    zone: tzinfo = UTC,
) -> Search:
    """The search ``args`` ask for; ``bounds`` and ``text``: what this table offers.

    A time without an offset is in ``zone``. Strict: a value that cannot be read, or a
    filter this table does not offer, raises ``Invalid``; else it is left out.
    """
    problems: list[str] = []

    def refuse(message: str) -> None:
        problems.append(message)

    status = tuple(s for s in args.get("status", "").split(",") if s)
    if any(s not in STATUSES for s in status):
        refuse(f"status must be one of {', '.join(STATUSES)} (comma-separated)")
        status = tuple(s for s in status if s in STATUSES)

    def row_id(name: str, *aliases: str) -> int | None:
        raw = next((args[n] for n in (name, *aliases) if args.get(n)), None)
        value = integer(raw, 1, MAX_ID) if raw is not None else None
        if raw is not None and value is None:
            refuse(f"{name} must be an integer from 1 to {MAX_ID}")
        return value

    since = _time(args, "from", zone, refuse)
    until = _time(args, "to", zone, refuse, end=True)
    preset = args.get("range", "")
    if preset and preset not in RANGES:
        refuse(f"range must be one of {', '.join(RANGES)}")
        preset = ""
    found_bounds: dict[str, tuple[float | None, float | None]] = {}
    for name in BOUNDS:
        low, high = (_number(args, f"{end}{name}", refuse) for end in ("min", "max"))
        if low is None and high is None:
            continue
        if name not in bounds:
            refuse(f"min{name} and max{name} are not available for these records")
            continue
        found_bounds[name] = (low, high)
    query = args.get("q", "").strip()
    if len(query) > MAX_TEXT:
        refuse(f"q must be at most {MAX_TEXT} characters")
        query = ""
    if query and not text:
        refuse("q (full-text search) is not available for these records")
        query = ""
    api_format = args.get("apiFormat", "").strip()
    if len(api_format) > 31:
        refuse("apiFormat must be at most 31 characters")
        api_format = ""
    found = Search(
        status=status,
        model=args.get("model", "").strip()[:255],
        api_key=row_id("apiKeyId", "key"),  # ``key``: the dashboard's older name
        model_id=row_id("modelId"),
        provider=row_id("providerId"),
        api_format=api_format,
        since=since,
        until=until,
        range=preset,
        bounds=found_bounds,
        text=query,
    )
    if strict and problems:
        raise Invalid(problems[0])
    return found


def _time(
    args: Mapping[str, str], name: str, zone: tzinfo, refuse: object, end: bool = False
) -> datetime | None:
    """An ISO 8601 date or date-time -> naive UTC; a bare date ``to`` means its day's end.

    A time that a datetime cannot hold once moved (the end of 9999-12-31, the first day
    moved back into UTC) lies past every record: no bound, as if not given."""
    raw = args.get(name, "").strip()
    if not raw:
        return None
    try:
        if not raw.isascii():
            raise ValueError
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        refuse(f"{name} must be an ISO 8601 date or date-time")  # type: ignore[operator]
        return None
    try:
        if end and len(raw) == 10:  # a date: the whole of that day
            value += timedelta(days=1)
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)
        return value.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        return None


def _number(args: Mapping[str, str], name: str, refuse: object) -> float | None:
    raw = args.get(name, "").strip()
    if not raw:
        return None
    if not DECIMAL.fullmatch(raw):
        refuse(f"{name} must be a number")  # type: ignore[operator]
        return None
    value = float(raw)
    return int(value) if value.is_integer() else value


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _local(value: datetime | None, zone: tzinfo) -> str:
    if value is None:
        return ""
    return value.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None).isoformat()
