"""Admin input, field by field: camelCase JSON in, checked column values out. Pure.

A ``Spec`` says what a column can hold, as PostgreSQL holds it: integers within 32
bits (or a row id's 63), text within its varchar length and without NUL (nor any
control character in a one-line field), finite numbers within bounds (and none so
close to 0 that PostgreSQL refuses it as an underflow), ISO 8601 dates
in years 1970 to 9999, ``null`` only where the column may be cleared. A value outside
the rule raises ``Invalid`` naming the field, so bad input is a 400, never a database
error. Fields a spec does not name are ignored, as NexusGate ignores them.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

INT32 = 2**31 - 1  # PostgreSQL's integer
# The smallest positive number taken: PostgreSQL refuses a number its column's type
# cannot hold but as 0 (double precision below about 2.2e-308; real, which the number
# columns were before migration 0012, below about 1.2e-38) as an underflow. Far below
# any price, weight or budget.
TINY = 1e-30
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Invalid(ValueError):
    """A field the rules refuse; the message names it."""


class Spec(NamedTuple):
    """One field's rule: numbers within ``low..high``, text of ``low..high`` characters."""

    kind: type
    required: bool = False
    null: bool = True  # an explicit null clears the column
    low: float = 0
    high: float = INT32
    line: bool = True  # text: one line, no control characters at all
    choices: tuple[str, ...] = ()


def check(body: dict, spec: dict[str, Spec], *, required: bool = True) -> dict[str, Any]:
    """Check camelCase fields against ``spec``; return them snake_cased (Invalid if not).

    ``required=False`` (a partial update) lets every field be left out.
    """
    out: dict[str, Any] = {}
    for name, rule in spec.items():
        if name not in body:
            if rule.required and required:
                raise Invalid(f"{name} is required")
            continue
        value = body[name]
        if value is None:
            if not rule.null:
                raise Invalid(
                    f"{name} is required" if rule.required else f"{name} must not be null"
                )
            out[_snake(name)] = None
            continue
        out[_snake(name)] = _checked(name, value, rule)
    return out


def _checked(name: str, value: Any, rule: Spec) -> Any:
    if rule.kind is datetime:
        return _datetime(name, value)
    if rule.kind is bool:
        if not isinstance(value, bool):
            raise Invalid(f"{name} must be true or false")
        return value
    if rule.kind is str:
        if not isinstance(value, str):
            raise Invalid(f"{name} must be a string")
        if rule.choices and value not in rule.choices:
            raise Invalid(f"{name} must be one of {', '.join(rule.choices)}")
        if not rule.low <= len(value) <= rule.high:
            raise Invalid(f"{name} must be {rule.low} to {rule.high} characters")
        if "\x00" in value or (rule.line and _CONTROL.search(value)):
            raise Invalid(f"{name} must not contain control characters")
        return value
    noun = "an integer" if rule.kind is int else "a number"
    if not in_range(value, rule.kind, -math.inf, math.inf):
        raise Invalid(f"{name} must be {noun}")
    if value < rule.low:
        raise Invalid(f"{name} must be at least {_number(rule.low)}")
    if value > rule.high:
        raise Invalid(f"{name} must be at most {_number(rule.high)}")
    if 0 < abs(value) < TINY:
        raise Invalid(f"{name} must be 0 or at least {TINY}")
    return float(value) if rule.kind is float else value


def in_range(value: Any, kind: type, low: float, high: float) -> bool:
    """True for a finite number of ``kind`` (an int passes as a float) within bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and (kind is int or not math.isfinite(value)):
        return False
    return low <= value <= high  # exact for any int, however large


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _datetime(name: str, value: Any) -> datetime:
    """ISO 8601 (a trailing Z or an offset is honoured) -> naive UTC, years 1970 to 9999."""
    try:
        if not (isinstance(value, str) and value.isascii()):
            raise ValueError
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError) as exc:
        raise Invalid(f"{name} must be an ISO 8601 date-time") from exc
    if not 1970 <= parsed.year <= 9999:
        raise Invalid(f"{name} must be between the years 1970 and 9999")
    return parsed


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
