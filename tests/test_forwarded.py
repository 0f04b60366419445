"""The client address behind trusted proxies (sign-in throttling counts per address)."""

from __future__ import annotations

import pytest

from gateway.forwarded import client_address, trusted

PROXIES = trusted("10.0.0.0/8, 192.168.1.5")


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("203.0.113.9", "1.2.3.4", trusted(None)) == "203.0.113.9"
    assert client_address("203.0.113.9", "1.2.3.4", trusted("")) == "203.0.113.9"
    assert client_address(None, None, ()) == "unknown"


def test_a_header_from_an_untrusted_peer_is_ignored() -> None:
    assert client_address("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"


def test_behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() -> None:
    assert client_address("10.1.1.1", "198.51.100.7", PROXIES) == "198.51.100.7"
    # The client wrote its own X-Forwarded-For: the proxy appended what it saw.
    assert client_address("10.1.1.1", "6.6.6.6, 198.51.100.7", PROXIES) == "198.51.100.7"
    assert client_address("10.1.1.1", "198.51.100.7, 192.168.1.5", PROXIES) == "198.51.100.7"
    assert client_address("10.1.1.1", "garbage, 10.2.2.2", PROXIES) == "garbage"
    assert client_address("10.1.1.1", "10.3.3.3, 10.2.2.2", PROXIES) == "10.3.3.3"  # all ours
    assert client_address("10.1.1.1", "2001:db8::1", PROXIES) == "2001:db8::1"


def test_a_json_list_setting_works_and_a_bad_one_is_refused() -> None:
    assert trusted(["10.0.0.0/8"]) == trusted("10.0.0.0/8")
    with pytest.raises(ValueError):
        trusted("not-a-network")
