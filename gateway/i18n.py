"""The dashboard's languages, its localised labels, and values formatted for the locale.

English and Simplified Chinese. Labels used from several templates (statuses and their
tooltips, provider types) live here as lazy strings, so they are translated when shown,
in the visitor's language. The Jinja filters render dates, relative times, numbers,
durations and percentages with Babel for the current locale; an unknown value (NULL in
the tables) is shown as a dash, never as 0. Costs are US dollars to the nano-dollar. Timestamps are naive UTC and are shown in
``BABEL_DEFAULT_TIMEZONE`` (UTC unless configured).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime

from babel import dates, numbers, support, units
from flask import Flask
from flask_babel import Babel, Domain, get_locale, get_timezone, to_user_timezone
from flask_babel import lazy_gettext as _l
from jinja2 import Undefined

from gateway.models import utcnow

# Each language is named in itself (an endonym), so it is data, not a message.
LANGUAGES = {"en": "English", "zh_CN": "简体中文"}
DEFAULT_LANGUAGE = "en"
UNKNOWN = "—"

STATUS_LABELS = {
    "pending": _l("Pending"),
    "completed": _l("Completed"),
    "failed": _l("Failed"),
    "aborted": _l("Aborted"),
    "cache_hit": _l("Cache hit"),
}
STATUS_HINTS = {
    "pending": _l("In flight: the upstream was contacted and the call has not ended yet."),
    "completed": _l("The upstream answered in full."),
    "failed": _l(
        "No upstream answered, the answer broke off, or the gateway shut down; see the error log."
    ),
    "aborted": _l("The client disconnected; the full answer was still recorded."),
    "cache_hit": _l("A repeated request answered from the stored result of the first one."),
}
PROVIDER_TYPES = {
    "openai": _l("OpenAI Chat API"),
    "openai-responses": _l("OpenAI Responses API"),
    "anthropic": _l("Anthropic Messages API"),
    "azure": _l("Azure OpenAI"),
    "ollama": _l("Ollama"),
}
MODEL_TYPES = {"chat": _l("Chat"), "embedding": _l("Embedding")}
KEY_SOURCES = {
    "manual": _l("Dashboard or API"),
    "operator": _l("Kubernetes operator"),
    "init": _l("Init file"),
}
ROLE_LABELS = {
    "system": _l("System"),
    "developer": _l("Developer"),
    "user": _l("User"),
    "assistant": _l("Assistant"),
    "tool": _l("Tool"),
}
OUTCOME_LABELS = {  # how one try at an upstream went (call.py, upstream.py)
    "ok": _l("Answered"),
    "connect": _l("Could not connect"),
    "timeout": _l("Timed out"),
    "reset": _l("Connection broke"),
    "http": _l("HTTP error"),
    "protocol": _l("Unreadable answer"),
    "invalid": _l("Invalid request"),
}
RANGE_LABELS = {
    "1m": _l("Last minute"),
    "15m": _l("Last 15 minutes"),
    "5m": _l("Last 5 minutes"),
    "10m": _l("Last 10 minutes"),
    "30m": _l("Last 30 minutes"),
    "1h": _l("Last hour"),
    "4h": _l("Last 4 hours"),
    "12h": _l("Last 12 hours"),
    "24h": _l("Last 24 hours"),
    "7d": _l("Last 7 days"),
    "30d": _l("Last 30 days"),
}


API_FORMATS = {  # the protocol a client called in
    "openai-chat": _l("OpenAI Chat Completions"),
    "anthropic": _l("Anthropic Messages"),
    "openai-responses": _l("OpenAI Responses"),
}
LOG_LEVELS = {  # srv_logs.level, NexusGate's names
    "error": _l("Error"),
    "warn": _l("Warning"),
    "info": _l("Info"),
    "unspecific": _l("Unspecified"),
}
BOUND_LABELS = {  # search.BOUNDS
    "Duration": _l("Duration (ms)"),
    "Ttft": _l("TTFT (ms)"),
    "Tokens": _l("Tokens"),
    "Cost": _l("Cost (USD)"),
}


class Catalogs(Domain):
    """The compiled catalogs, found by language and territory: ``translations/zh_CN``."""

    # Babel expands zh_CN to zh_Hans_CN, and flask-babel looks for a catalog under that
    # name (then "zh"), never under zh_CN, where pybabel puts it.
    def __init__(self) -> None:
        super().__init__()
        self._loaded: dict[str, support.NullTranslations] = {}

    def get_translations(self) -> support.NullTranslations:
        locale = get_locale()
        if locale is None:
            return support.NullTranslations()
        name = "_".join(part for part in (locale.language, locale.territory) if part)
        if name not in self._loaded:  # catalogs do not change while the process runs
            self._loaded[name] = support.Translations.load(
                self.translation_directories[0], [name], self.domain[0]
            )
        return self._loaded[name]


def language_of(cookie: str | None, accepted: list[str]) -> str:
    """The language to use: the switcher's cookie, else the first accepted one we speak."""
    if cookie in LANGUAGES:
        return cookie
    for tag in accepted:  # most preferred first; any Chinese reads Simplified here
        primary = tag.replace("_", "-").split("-", 1)[0].lower()
        if primary == "zh":
            return "zh_CN"
        if primary == "en":
            return "en"
    return DEFAULT_LANGUAGE


def when(value: datetime | None, style: str = "medium") -> str:
    """A timestamp in the visitor's locale and the configured time zone."""
    if _unknown(value):
        return UNKNOWN
    return dates.format_datetime(to_user_timezone(value), style, locale=get_locale())


def ago(value: datetime | None) -> str:
    """How long ago (or how soon): "5 minutes ago", "5分钟前"."""
    if _unknown(value):
        return UNKNOWN
    return dates.format_timedelta(value - utcnow(), add_direction=True, locale=get_locale())


def tick(value: datetime, bucket_seconds: int) -> str:
    """A chart's time label, as fine as its buckets."""
    local, locale = to_user_timezone(value), get_locale()
    if bucket_seconds >= 6 * 3600:
        return dates.format_skeleton("MMMd", local, locale=locale)
    return dates.format_time(local, "medium" if bucket_seconds < 60 else "short", locale=locale)


def number(value: float | None, digits: int = 0) -> str:
    """A grouped number, or a dash when unknown."""
    if _unknown(value):
        return UNKNOWN
    pattern = "#,##0" + ("." + "0" * digits if digits else "")
    return numbers.format_decimal(value, pattern, locale=get_locale())


def usd(value: float | None, places: int = 9) -> str:
    """US dollars, to the nano-dollar a cost is exact to by default: "$0.0000405", "US$0.30"."""
    if _unknown(value):
        return UNKNOWN
    pattern = "¤#,##0.00" + "#" * (places - 2)
    return numbers.format_currency(
        value, "USD", pattern, locale=get_locale(), currency_digits=False
    )


def compact(value: float | None) -> str:
    """A short number for axes and cards: 12K, 1.2万."""
    if _unknown(value):
        return UNKNOWN
    return numbers.format_compact_decimal(value, fraction_digits=1, locale=get_locale())


def percent(rate: float | None) -> str:
    """A 0..1 rate as a percentage, or a dash when nothing was measured."""
    if _unknown(rate):
        return UNKNOWN
    return numbers.format_percent(rate, "#,##0.#%", locale=get_locale())


def duration(ms: float | None) -> str:
    """Milliseconds as "850 ms" or "1.25 s", in the locale's own units."""
    if _unknown(ms):
        return UNKNOWN
    if ms < 1000:
        return units.format_unit(round(ms), "duration-millisecond", "short", locale=get_locale())
    return units.format_unit(round(ms / 1000, 2), "duration-second", "short", locale=get_locale())


def _unknown(value: object) -> bool:
    """NULL in the table, a field the stored JSON does not have, or not a finite number."""
    if isinstance(value, float) and not math.isfinite(value):
        return True  # an Infinity stored before the admin API refused it: a dash, not a 500
    return value is None or isinstance(value, Undefined)


def init_app(
    app: Flask, choose: Callable[[], str], zone: Callable[[], str | None] | None = None
) -> None:
    """Set up flask-babel (``choose`` picks the language, ``zone`` the time zone), filters, labels."""
    Babel(app, locale_selector=choose, timezone_selector=zone).domain_instance = Catalogs()
    for name, func in (
        ("when", when),
        ("ago", ago),
        ("tick", tick),
        ("number", number),
        ("usd", usd),
        ("compact", compact),
        ("percent", percent),
        ("duration", duration),
    ):
        app.jinja_env.filters[name] = func
    app.jinja_env.globals.update(
        LANGUAGES=LANGUAGES,
        STATUS_LABELS=STATUS_LABELS,
        STATUS_HINTS=STATUS_HINTS,
        PROVIDER_TYPES=PROVIDER_TYPES,
        MODEL_TYPES=MODEL_TYPES,
        RANGE_LABELS=RANGE_LABELS,
        OUTCOME_LABELS=OUTCOME_LABELS,
        ROLE_LABELS=ROLE_LABELS,
        KEY_SOURCES=KEY_SOURCES,
        API_FORMATS=API_FORMATS,
        BOUND_LABELS=BOUND_LABELS,
        LOG_LEVELS=LOG_LEVELS,
        time_zone=lambda: str(get_timezone()),
    )
