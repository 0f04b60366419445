"""What a call cost: the provider's token classes at the model's prices, exactly. Pure code.

Prices are USD per million tokens, as a model row holds them: ``inputPrice``,
``outputPrice`` (NexusGate's), ``cacheReadPrice`` and ``cacheWritePrice``. ``cost``
prices an IR usage (``adapters/ir.py``):

- uncached input (input - cache reads - cache writes) at the input price;
- cache reads at the cache-read price, cache writes at the cache-write price; a missing
  cache price falls back to the input price, and ``prices.fallbacks`` names it;
- Anthropic's 1-hour cache writes at twice the input price: Anthropic's own rule (5-minute
  writes cost 1.25x input, 1-hour writes 2x), and a model row has one write price, the
  5-minute one;
- output at the output price: reasoning is part of output, as every provider counts it.

The arithmetic is decimal: each price is read as the decimal it was written as, so a
cost is exact, and its float in JSON is within 1e-10 USD of it for any cost below a
million dollars. Unknown is never priced as 0: no cost (None) when the model lacks an
input or output price, or the provider reported no input or no output count. A cache
count the provider did not report is no cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

CURRENCY = "USD"
PER = Decimal(1_000_000)  # prices are per million tokens
HOUR_WRITE_FACTOR = Decimal(2)  # 1-hour cache writes, times the input price
NANOS = Decimal(1_000_000_000)  # totals are summed in nano-USD integers


@dataclass(frozen=True, slots=True)
class Prices:
    """A model's prices, USD per million tokens (None: not set)."""

    input: float | None
    output: float | None
    cache_read: float | None = None
    cache_write: float | None = None


def cost(usage: dict | None, prices: Prices | None) -> dict[str, Any] | None:
    """What ``usage`` cost at ``prices``, by token class; None when it cannot be known."""
    if prices is None or prices.input is None or prices.output is None or not usage:
        return None
    input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    if input_tokens is None or output_tokens is None:
        return None
    read, write = usage.get("cache_read_tokens") or 0, usage.get("cache_write_tokens") or 0
    hour = min(usage.get("cache_write_1h_tokens") or 0, write)
    price_in, price_out = _decimal(prices.input), _decimal(prices.output)
    fallbacks = [name for name, p in _CACHE_PRICES if getattr(prices, p) is None]
    price_read = price_in if prices.cache_read is None else _decimal(prices.cache_read)
    price_write = price_in if prices.cache_write is None else _decimal(prices.cache_write)
    price_hour = price_in * HOUR_WRITE_FACTOR
    # A provider that says more was cached than was sent: what it said was cached is
    # priced as cached, and no input as uncached (never a negative cost).
    parts = {
        "input": max(input_tokens - read - write, 0) * price_in,
        "cacheRead": read * price_read,
        "cacheWrite": (write - hour) * price_write + hour * price_hour,
        "output": output_tokens * price_out,
    }
    parts = {name: value / PER for name, value in parts.items()}
    total = sum(parts.values(), Decimal(0))
    return {
        "currency": CURRENCY,
        **{name: float(value) for name, value in parts.items()},
        "total": float(total),
        "prices": {
            "input": float(price_in),
            "output": float(price_out),
            "cacheRead": float(price_read),
            "cacheWrite": float(price_write),
            "cacheWrite1h": float(price_hour),
            "fallbacks": fallbacks,
        },
    }


def nanos(cost_: dict | None) -> int | None:
    """A cost's total in nano-USD, the integer that totals are summed in (None: no cost)."""
    if cost_ is None:
        return None
    return int((_decimal(cost_["total"]) * NANOS).to_integral_value(ROUND_HALF_EVEN))


def usd(nano_usd: int | None) -> float | None:
    """Nano-USD back to USD."""
    return None if nano_usd is None else float(Decimal(nano_usd) / NANOS)


_CACHE_PRICES = (("cacheRead", "cache_read"), ("cacheWrite", "cache_write"))


def _decimal(value: float) -> Decimal:
    # repr is the shortest decimal that reads back as this float: the price as written.
    return Decimal(repr(float(value)))
