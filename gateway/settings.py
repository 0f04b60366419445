"""The ``settings`` table: NexusGate's settings API, and the settings the dashboard reads.

Any key (1 to 63 characters) holds any JSON value (at most ``MAX_VALUE`` bytes).
Keys the gateway keeps for itself, such as the generated admin secret, are
``RESERVED``: the API never lists or reads them (404, as if absent) and refuses to
write or delete them (403). Two keys mean something to the dashboard, and their
values are checked: ``timezone`` (an IANA name such as ``Asia/Shanghai``: the zone
times are shown and typed in, over ``GATEWAY_BABEL_DEFAULT_TIMEZONE``) and
``overviewRange`` (the Overview's range when the URL names none). Each worker reads
them at most every ``CACHE_TTL`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import current_app

from gateway import auth, db, stats
from gateway.models import Setting
from gateway.registry import Refused

RESERVED = frozenset({auth.GENERATED_SECRET})
TIMEZONE = "timezone"
OVERVIEW_RANGE = "overviewRange"
MAX_VALUE = 64 * 1024
_cache: dict[str, tuple[float, Any]] = {}


def visible() -> list[Setting]:
    """Every setting the API may show, by key."""
    return list(Setting.select().where(Setting.key.not_in(RESERVED)).order_by(Setting.key))


def get(key: str) -> Setting:
    """One setting the API may show, or a 404."""
    row = None if key in RESERVED else Setting.get_or_none(Setting.key == key)
    if row is None:
        raise Refused(404, "Setting not found")
    return row


def put(key: str, body: dict) -> Setting:
    """Create or replace a setting from ``{"value": ...}``."""
    _writable(key)
    if "value" not in body:
        raise Refused(400, "value is required")
    value = body["value"]
    if len(json.dumps(value)) > MAX_VALUE:
        raise Refused(400, f"value must be at most {MAX_VALUE} bytes of JSON")
    _check(key, value)
    # One transaction: the row read back for the answer is the one written, not gone
    # to a DELETE in another worker between the two (a 500 for a write that was made).
    with db.database.atomic():
        Setting.write(key, value)
        row = Setting.get(Setting.key == key)
    _cache.pop(key, None)
    return row


def delete(key: str) -> Setting:
    """Delete a setting; return it as it was."""
    _writable(key)
    # The row as the delete itself took it: of two deletes at once, one found it, and
    # the other is told it found nothing (not a row read before the first took it).
    taken = list(Setting.delete().where(Setting.key == key).returning(Setting).execute())
    if not taken:
        raise Refused(404, "Setting not found")
    _cache.pop(key, None)
    return taken[0]


def _writable(key: str) -> None:
    if not 1 <= len(key) <= 63 or any(c < " " or c == "\x7f" for c in key):
        raise Refused(400, "key must be 1 to 63 characters without control characters")
    if key in RESERVED:
        raise Refused(403, f"Setting '{key}' is reserved to the gateway")


def _check(key: str, value: Any) -> None:
    if key == TIMEZONE:
        if not (isinstance(value, str) and _zone(value)):
            raise Refused(400, "timezone must be an IANA time zone name, e.g. Asia/Shanghai")
    elif key == OVERVIEW_RANGE and not (isinstance(value, str) and value in stats.RANGES):
        raise Refused(400, f"overviewRange must be one of {', '.join(stats.RANGES)}")


def _zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def read(key: str, default: Any = None) -> Any:
    """A setting's value for this worker, re-read at most every ``CACHE_TTL`` seconds;
    while the database does not answer, the last one read (or ``default``)."""
    now = time.monotonic()
    held = _cache.get(key)
    if held is None or now - held[0] > float(current_app.config["CACHE_TTL"]):
        # Away: the last value; the pages that say it is away must still render.
        with contextlib.suppress(*db.AWAY):
            held = _cache[key] = (now, Setting.read(key))
    return default if held is None or held[1] is None else held[1]


def timezone() -> str | None:
    """The dashboard's time zone from the settings, if one is set (and still valid)."""
    name = read(TIMEZONE)
    return name if isinstance(name, str) and _zone(name) else None


def overview_range() -> str:
    """The Overview's range when the URL names none."""
    value = read(OVERVIEW_RANGE)
    return value if value in stats.RANGES else stats.DEFAULT_RANGE
