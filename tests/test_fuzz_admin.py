"""Fuzzing the admin API: every route's path, query and body, on SQLite and PostgreSQL.

Hypothesis (fixed seed) picks a route, fills its path with real ids and hostile
segments (ids past 2^63, other digits, NUL), its query with hostile values, and its
body with plausible and hostile field values (``tests/fuzz_support.py``). The
property: never a 5xx, and every answer is JSON (a refusal says why); through real
gunicorn, no worker restarts either. The two routes
that call the provider (``/test``, ``/remote-models``) are left out: the fuzzer
could point a provider anywhere, and only loopback may be dialled here.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests import fuzz_support as f
from tests.servers import ADMIN_SECRET, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
small_ints = st.one_of(st.integers(min_value=-2, max_value=2**31 + 1), f.numbers)
names = st.one_of(st.sampled_from(["a", "b", "gpt-4o", "emb"]), f.text)
urls = st.one_of(
    st.sampled_from(
        ["http://127.0.0.1:9/v1", "https://127.0.0.1:9", "ftp://x", "http://", "127.0.0.1"]
    ),
    f.text,
)
dates = st.one_of(
    st.sampled_from(
        ["2030-01-01T00:00:00Z", "1969-01-01", "10000-01-01", "0001-01-01T00:00:00+01:00"]
    ),
    f.text,
)


def plausible(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, f.values)


KEY = {
    "comment": plausible(f.text),
    "expiresAt": plausible(dates),
    "rpmLimit": plausible(small_ints),
    "tpmLimit": plausible(small_ints),
    "maxConcurrent": plausible(small_ints),
    "budgetUsd": plausible(f.numbers),
}
RATE_LIMIT = {
    "identifier": plausible(names),
    "limit": plausible(small_ints),
    "refill": plausible(f.numbers),
}
PROVIDER = {
    "name": plausible(names),
    "type": plausible(st.sampled_from(["openai", "anthropic", "azure", "x"])),
    "baseUrl": plausible(urls),
    "apiKey": plausible(f.text),
    "apiVersion": plausible(f.text),
    "comment": plausible(f.text),
    "streamUsage": plausible(st.booleans()),
}
MODEL = {
    "providerId": plausible(st.integers(min_value=0, max_value=4)),
    "systemName": plausible(names),
    "remoteId": plausible(f.text),
    "modelType": plausible(st.sampled_from(["chat", "embedding", "x"])),
    "contextLength": plausible(small_ints),
    "inputPrice": plausible(f.numbers),
    "outputPrice": plausible(f.numbers),
    "cacheReadPrice": plausible(f.numbers),
    "cacheWritePrice": plausible(f.numbers),
    "weight": plausible(f.numbers),
    "comment": plausible(f.text),
}
WEIGHTS = {
    "weights": plausible(
        st.lists(
            st.fixed_dictionaries(
                {"modelId": plausible(st.integers(0, 4)), "weight": plausible(f.numbers)}
            ),
            max_size=3,
        )
    )
}
LIST_ARGS = ("offset", "limit", "apiKeyId", "modelId", "model", "status")
# (method, path, body fields, query arguments)
ROUTES: list[tuple[str, str, dict, tuple[str, ...]]] = [
    ("GET", "/", {}, ()),
    ("GET", "/rev", {}, ()),
    ("GET", "/apiKey", {}, ("includeRevoked",)),
    ("GET", "/apiKey/managed", {}, ("includeRevoked",)),
    ("POST", "/apiKey", KEY, ()),
    ("GET", "/apiKey/{key}", {}, ()),
    ("DELETE", "/apiKey/{key}", {}, ()),
    ("PUT", "/apiKey/{key}/ratelimit", KEY, ()),
    ("PUT", "/apiKey/{key}/budget", KEY, ()),
    ("GET", "/apiKey/{key}/usage", {}, ()),
    ("GET", "/ratelimits", {}, ()),
    ("POST", "/ratelimits", RATE_LIMIT, ()),
    ("GET", "/ratelimits/{name}", {}, ()),
    ("DELETE", "/ratelimits/{name}", {}, ()),
    ("GET", "/apiKey/by-external-id/{name}", {}, ()),
    ("PUT", "/apiKey/by-external-id/{name}", KEY, ()),
    ("GET", "/providers", {}, ()),
    ("POST", "/providers", PROVIDER, ()),
    ("GET", "/providers/{id}", {}, ()),
    ("PUT", "/providers/{id}", PROVIDER, ()),
    ("DELETE", "/providers/{id}", {}, ()),
    ("GET", "/providers/{id}/models", {}, ()),
    ("GET", "/models", {}, ("modelType",)),
    ("POST", "/models", MODEL, ()),
    ("GET", "/models/system-names", {}, ("modelType",)),
    ("GET", "/models/by-system-name/{name}", {}, ("modelType",)),
    ("PUT", "/models/by-system-name/{name}/weights", WEIGHTS, ()),
    ("GET", "/models/{id}", {}, ()),
    ("PUT", "/models/{id}", MODEL, ()),
    ("DELETE", "/models/{id}", {}, ()),
    ("GET", "/completions", {}, LIST_ARGS),
    ("GET", "/completions/{id}", {}, ()),
    ("DELETE", "/completions/{id}", {}, ()),
    ("GET", "/embeddings", {}, LIST_ARGS),
    ("GET", "/embeddings/usage", {}, ("apiKeyId",)),
    ("GET", "/embeddings/{id}", {}, ()),
    ("DELETE", "/embeddings/{id}", {}, ()),
    ("GET", "/usage", {}, ("apiKey", "range")),
    ("GET", "/stats/overview", {}, ("range",)),
]  # fmt: skip
ids = st.one_of(st.integers(min_value=1, max_value=4).map(str), f.segments)
keys = st.one_of(
    st.integers(min_value=1, max_value=4).map(str),
    f.segments,
    f.text.filter(lambda t: "/" not in t).map(f.url_text),
)


@st.composite
def admin_requests(draw: Any) -> tuple[str, str, bytes | None]:
    method, template, fields, args = draw(st.sampled_from(ROUTES))
    path = template.format(id=draw(ids), key=draw(keys), name=draw(f.segments))
    path += draw(st.sampled_from(["", "", "/"]))  # a final slash reaches the same route
    chosen = draw(st.lists(st.sampled_from(args), unique=True)) if args else []
    query = {name: draw(f.query_values) for name in chosen}
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    body = draw(f.body_bytes({}, fields)) if method in ("POST", "PUT") else None
    return method, path, body


def test_fuzz_every_admin_route(client) -> None:  # type: ignore[no-untyped-def]
    statuses: Counter = Counter()

    @given(admin_requests())
    def one(case: tuple[str, str, bytes | None]) -> None:
        method, path, body = case
        headers = {**ADMIN, "Content-Type": "application/json"}
        resp = client.open(f"/api/admin{path}", method=method, data=body, headers=headers)
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300])
        statuses[resp.status_code] += 1
        if resp.status_code == 204:  # deleted: nothing to say
            assert resp.get_data() == b""
            return
        answer = json.loads(resp.get_data())  # always JSON, never an HTML error page
        if resp.status_code >= 400:
            assert isinstance(answer.get("error"), str) and answer["error"], answer

    f.run(one, f.EXAMPLES_FAST)
    # Both the happy paths and the refusals were reached.
    assert statuses[200] + statuses[201] > f.EXAMPLES_FAST // 5, statuses
    assert statuses[400] > f.EXAMPLES_FAST // 10 and statuses[404] > 0, statuses


@pytest.mark.server
def test_fuzz_every_admin_route_through_gunicorn(gateway: Gateway) -> None:
    session = requests.Session()
    session.headers.update({**ADMIN, "Content-Type": "application/json"})
    statuses: Counter = Counter()

    @given(admin_requests())
    def one(case: tuple[str, str, bytes | None]) -> None:
        method, path, body = case
        resp = session.request(method, f"{gateway.url}/api/admin{path}", data=body, timeout=30)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        assert resp.headers["Content-Type"] == "application/json", resp.text[:300]
        statuses[resp.status_code] += 1

    f.run(one, f.EXAMPLES_SERVER)
    assert statuses[400] > 0 and statuses[200] + statuses[201] > 0, statuses
    assert gateway.log().count("Booting worker") == 1, "a worker restarted"
    assert "Traceback" not in gateway.log()
