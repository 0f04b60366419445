"""Who is on the other end: the client address behind proxies the operator trusts. Pure.

Sign-in throttling counts wrong secrets per client address. Behind a load balancer every
request comes from the balancer, so its ``X-Forwarded-For`` must be read; but anyone can
send that header, so it is believed only from the proxies named in ``TRUSTED_PROXIES``
(addresses or CIDR ranges, comma-separated; none by default, when the peer is the
client). Walking the hops from the nearest back, the first address that is not a trusted
proxy is the client's: a client cannot hide behind a value it wrote itself, because the
trusted proxy appends the address it saw.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_LENGTH = 64  # an address is at most 45 characters; anything longer is not one


def trusted(setting: str | Iterable[str] | None) -> tuple[Network, ...]:
    """The networks of a TRUSTED_PROXIES setting (ValueError for one that is not)."""
    if not setting:
        return ()
    items = setting.split(",") if isinstance(setting, str) else setting
    return _networks(tuple(str(item).strip() for item in items if str(item).strip()))


@lru_cache(maxsize=8)
def _networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def client_address(
    peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]
) -> str:
    """The client's address: the peer, or the nearest hop behind trusted proxies."""
    address = (peer or "unknown")[:MAX_LENGTH]
    if not proxies or not forwarded_for:
        return address
    hops = [hop.strip()[:MAX_LENGTH] for hop in forwarded_for.split(",")]
    for hop in [address, *reversed(hops)]:
        if not hop or not _is_trusted(hop, proxies):
            return hop or address
    return hops[0] or address  # every hop is a trusted proxy: the farthest one


def _is_trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an address: never a proxy we trust
    return any(ip in network for network in proxies)


def address_of(request: Any, setting: str | Iterable[str] | None) -> str:
    """The client address of a Werkzeug request, given the TRUSTED_PROXIES setting."""
    return client_address(
        request.remote_addr, request.headers.get("X-Forwarded-For"), trusted(setting)
    )
