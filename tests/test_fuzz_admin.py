"""Fuzzing the admin API and the dashboard: every route's path, query and body (or form),
on SQLite and PostgreSQL.

Hypothesis (fixed seed) picks a route, fills its path with real ids and hostile
segments (ids past 2^63, other digits, NUL), its query with plausible and hostile
values, and its body with plausible and hostile field values (``tests/fuzz_support.py``),
on a seeded database (records and server logs to read, export and acknowledge). The
property: never a 5xx, and every answer is JSON (a refusal says why), or for an export
the format asked for, and readable; through real gunicorn, no worker restarts either,
and no traceback in its log. The dashboard's forms and pages are fuzzed the same way,
signed in (its property is at ``page_answer``). The routes that call the provider
(``/test``, ``/remote-models``, the dashboard's test button) are left out: the fuzzer
could point a provider anywhere, and only loopback may be dialled here.
"""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, quote

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from gateway import auth, export, urlargs
from gateway.db import database
from gateway.models import Completion, SrvLog
from tests import fuzz_support as f
from tests.dashboard_seed import seed
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
SETTING = {
    "value": plausible(
        st.one_of(st.sampled_from(["Asia/Shanghai", "UTC", "Mars/Olympus", "1h", "5m"]), f.text)
    )
}
# A search of call records (``gateway/search.py``): what lists and exports both read.
SEARCH_ARGS = (
    "status", "model", "apiKeyId", "modelId", "providerId", "apiFormat", "from", "to",
    "range", "minDuration", "maxTtft", "minTokens", "maxCost", "q",
)  # fmt: skip
LIST_ARGS = ("offset", "limit", *SEARCH_ARGS)
EXPORT_ARGS = ("format", "format", *SEARCH_ARGS)  # twice: most exports name a format
# Plausible values of query arguments (half the time; else ``f.query_values``).
ARG_VALUES = {
    "format": st.sampled_from(["csv", "jsonl"]),
    "level": st.sampled_from(["error", "warn", "info", "unspecific"]),
    "acknowledged": st.sampled_from(["true", "false"]),
    "includeRevoked": st.sampled_from(["true", "false", "1", "no"]),
    "status": st.sampled_from(["completed", "failed,aborted", "pending,cache_hit"]),
    "from": st.sampled_from(["2020-01-01", "2020-01-01T00:00:00Z", "2030-01-01T08:00+08:00"]),
    "to": st.sampled_from(["2030-01-01", "2030-01-01T00:00:00"]),
    "range": st.sampled_from(["15m", "1h", "24h", "7d", "30d", "month"]),
    "q": st.sampled_from(["weather", '"ship\'s log"', "数据库", "-", "a b c"]),
    "model": st.sampled_from(["gpt-4o", "claude-sonnet-4", "text-embedding-3-small"]),
    "modelType": st.sampled_from(["chat", "embedding"]),
    "apiFormat": st.sampled_from(["openai-chat", "anthropic", "openai-responses"]),
    "limit": st.sampled_from(["1", "10", "1000"]),
    **dict.fromkeys(
        ["minDuration", "maxTtft", "minTokens", "maxCost"], st.sampled_from(["0", "100", "0.5"])
    ),
    **dict.fromkeys(
        ["apiKeyId", "modelId", "providerId", "completionId", "upstreamId", "offset"],
        st.integers(min_value=0, max_value=4).map(str),
    ),
}
LOG_ARGS = ("level", "acknowledged", "apiKeyId", "completionId", "upstreamId", "offset", "limit")
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
    ("PUT", "/models/by-system-name/{name}/weights", WEIGHTS, ("modelType",)),
    ("GET", "/models/{id}", {}, ()),
    ("PUT", "/models/{id}", MODEL, ()),
    ("DELETE", "/models/{id}", {}, ()),
    ("GET", "/completions", {}, LIST_ARGS),
    ("GET", "/completions/export", {}, EXPORT_ARGS),
    ("GET", "/completions/{id}", {}, ()),
    ("DELETE", "/completions/{id}", {}, ()),
    ("GET", "/embeddings", {}, LIST_ARGS),
    ("GET", "/embeddings/export", {}, EXPORT_ARGS),
    ("GET", "/embeddings/usage", {}, ("apiKeyId",)),
    ("GET", "/embeddings/{id}", {}, ()),
    ("DELETE", "/embeddings/{id}", {}, ()),
    ("GET", "/usage", {}, ("apiKey", "range")),
    ("GET", "/stats/overview", {}, ("range",)),
    ("GET", "/logs", {}, LOG_ARGS),
    ("GET", "/logs/{id}", {}, ()),
    ("POST", "/logs/{id}/ack", {}, ()),
    ("GET", "/settings", {}, ()),
    ("GET", "/settings/{setting}", {}, ()),
    ("PUT", "/settings/{setting}", SETTING, ()),
    ("PUT", "/settings/{setting}", SETTING, ()),  # twice: most puts are refused
    ("DELETE", "/settings/{setting}", {}, ()),
]  # fmt: skip
ids = st.one_of(st.integers(min_value=1, max_value=4).map(str), f.segments)
keys = st.one_of(
    st.integers(min_value=1, max_value=4).map(str),
    f.segments,
    f.text.filter(lambda t: "/" not in t).map(f.url_text),
)
# The settings the dashboard reads and checks, the one reserved to the gateway, any other.
setting_keys = st.one_of(
    st.sampled_from(["timezone", "overviewRange", auth.GENERATED_SECRET, "theme"]), keys
)


@st.composite
def admin_requests(draw: Any) -> tuple[str, str, bytes | None]:
    method, template, fields, args = draw(st.sampled_from(ROUTES))
    path = template.format(
        id=draw(ids), key=draw(keys), name=draw(f.segments), setting=draw(setting_keys)
    )
    path += draw(st.sampled_from(["", "", "/"]))  # a final slash reaches the same route
    chosen = draw(st.lists(st.sampled_from(args), unique=True)) if args else []
    query = {n: draw(st.one_of(ARG_VALUES.get(n, f.query_values), f.query_values)) for n in chosen}
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    # A setting's body without a value is refused before its key or value is looked at.
    base = {"value": None} if fields is SETTING else {}
    body = draw(f.body_bytes(base, fields)) if fields else None  # /ack reads no body
    return method, path, body


# Text a CSV cell or a JSON line must escape: a formula, quotes, line breaks (U+2028 too).
ODD_RECORD_TEXT = '=HYPERLINK("x"), "quoted",\r\nnext line\u2028 数据库 \\ 🚢'


@pytest.fixture
def seeded(app) -> None:  # type: ignore[no-untyped-def]
    """Records and server logs to read, export, delete and acknowledge: the dashboard's
    seed, a call in odd text, and logs that name them."""
    with database.connection_context():
        call = seed().calls["aborted"]
        odd = Completion.create(
            uid=uuid.uuid4().hex,
            api_key=call.api_key_id,
            model=ODD_RECORD_TEXT[:40],
            api_format="openai-chat",
            status="failed",
            error=ODD_RECORD_TEXT,
            prompt={"messages": [{"role": "user", "content": ODD_RECORD_TEXT}]},
        )
        for level, related in (("error", call), ("warn", odd), ("info", None)):
            SrvLog.create(
                level=level,
                message=ODD_RECORD_TEXT,
                related_api_key_id=related and related.api_key_id,
                related_completion_id=related and related.id,
                details={"type": "x", "nested": [ODD_RECORD_TEXT, {"n": 2**63 - 1}]},
            )


def readable(path: str, status: int, content_type: str, data: bytes) -> None:
    """The answer is JSON (a refusal says why); a download, the format it was asked for."""
    if status == 204:  # deleted: nothing to say
        assert data == b""
        return
    route, _, query = path.partition("?")
    if status == 200 and route.rstrip("/").endswith("/export"):
        download(query, "jsonl", content_type, data)
        return
    assert content_type == "application/json", (content_type, data[:300])
    answer = json.loads(data)  # never an HTML error page
    if status >= 400:
        assert isinstance(answer.get("error"), str) and answer["error"], answer


def download(query: str, default: str, content_type: str, data: bytes) -> None:
    """A download is in the format ``query`` asks for (else ``default``), and reads as it."""
    fmt = parse_qs(query, keep_blank_values=True).get("format", [default])[0]
    assert content_type == export.FORMATS[fmt], (fmt, content_type)
    text = data.decode("utf-8-sig")  # strict: a download is UTF-8
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
        assert rows and all(len(row) == len(rows[0]) for row in rows), rows[:3]
    else:
        assert all(isinstance(json.loads(line), dict) for line in text.split("\n")[:-1])
        assert text == "" or text.endswith("\n")


def test_fuzz_every_admin_route(seeded, client) -> None:  # type: ignore[no-untyped-def]
    statuses: Counter = Counter()

    @given(admin_requests())
    def one(case: tuple[str, str, bytes | None]) -> None:
        method, path, body = case
        headers = {**ADMIN, "Content-Type": "application/json"}
        resp = client.open(f"/api/admin{path}", method=method, data=body, headers=headers)
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300])
        statuses[resp.status_code] += 1
        readable(path, resp.status_code, resp.content_type, resp.get_data())

    f.run(one, f.EXAMPLES_FAST)
    # Both the happy paths and the refusals were reached.
    assert statuses[200] + statuses[201] > f.EXAMPLES_FAST // 5, statuses
    assert statuses[400] > f.EXAMPLES_FAST // 10 and statuses[404] > 0, statuses


@pytest.mark.server
def test_fuzz_every_admin_route_through_gunicorn(seeded, gateway: Gateway) -> None:  # type: ignore[no-untyped-def]
    session = requests.Session()
    session.headers.update({**ADMIN, "Content-Type": "application/json"})
    statuses: Counter = Counter()

    @given(admin_requests())
    def one(case: tuple[str, str, bytes | None]) -> None:
        method, path, body = case
        resp = session.request(method, f"{gateway.url}/api/admin{path}", data=body, timeout=30)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        statuses[resp.status_code] += 1
        readable(path, resp.status_code, resp.headers.get("Content-Type", ""), resp.content)

    f.run(one, f.EXAMPLES_SERVER)
    assert statuses[400] > 0 and statuses[200] + statuses[201] > 0, statuses
    assert gateway.log().count("Booting worker") == 1, "a worker restarted"
    assert "Traceback" not in gateway.log()


# -- the dashboard's forms and pages ------------------------------------------
#
# The same property in the dashboard's terms: never a 5xx; a page or an error page in
# HTML, a redirect to this site, or a download in the format asked for. Form values are
# text; a lone surrogate goes as the bytes ``surrogatepass`` makes (``f.url_text``).
# Signing in is fuzzed with the right secret only: wrong ones count against the address.

numbers_text = st.one_of(st.sampled_from(["0", "1", "-1", "0.5", "1e3", "٣", ""]), f.segments)
pages = st.one_of(st.sampled_from(["/", "/requests?page=2", "//evil.example", "/\\x"]), f.text)
KEY_FORM = {
    "comment": f.text,
    "expires": st.sampled_from(["7", "30", "365", "8", "x"]),
    **dict.fromkeys(["rpmLimit", "tpmLimit", "maxConcurrent", "budgetUsd"], numbers_text),
}
PROVIDER_FORM = {
    "name": names,
    "type": st.sampled_from(["openai", "anthropic", "azure", "x"]),
    "baseUrl": urls,
    "apiKey": f.text,
    "apiVersion": f.text,
    "comment": f.text,
    "streamUsage": st.just("on"),
}
MODEL_FORM = {
    "systemName": names,
    "remoteId": f.text,
    "modelType": st.sampled_from(["chat", "embedding", "x"]),
    "comment": f.text,
    **dict.fromkeys(
        ["contextLength", "inputPrice", "outputPrice", "cacheReadPrice", "cacheWritePrice"],
        numbers_text,
    ),
    "weight": numbers_text,
}
WEIGHTS_FORM = {f"weight-{n}": numbers_text for n in ("1", "2", "3", "4", "x", "0", "99")}
ACK_FORM = {"id": ids, "level": st.sampled_from(["error", "warn", "x"]), "next": pages}
LANGUAGE_FORM = {"lang": st.sampled_from(["en", "zh_CN", "de", ""]), "next": pages}
LOGIN_FORM = {"next": pages}  # and always the right secret (see above)
PAGE_ARGS = ("page", "size", *SEARCH_ARGS)
DOWNLOAD_ARGS = ("format", "format", *SEARCH_ARGS)
# (method, path, form fields, query arguments); /providers/{id}/test dials the provider.
FORM = "application/x-www-form-urlencoded"
DASHBOARD_ROUTES: list[tuple[str, str, dict, tuple[str, ...]]] = [
    ("GET", "/", {}, ("range",)),
    ("GET", "/login", {}, ("next",)),
    ("POST", "/login", LOGIN_FORM, ()),
    ("POST", "/language", LANGUAGE_FORM, ()),
    ("GET", "/keys", {}, ("revoked",)),
    ("POST", "/keys", KEY_FORM, ()),
    ("POST", "/keys/{id}/revoke", {}, ()),
    ("POST", "/keys/{id}/limits", KEY_FORM, ()),
    ("GET", "/logs", {}, ("level", "state", "page")),
    ("POST", "/logs/ack", ACK_FORM, ()),
    ("GET", "/providers", {}, ()),
    ("POST", "/providers", PROVIDER_FORM, ()),
    ("GET", "/providers/{id}", {}, ()),
    ("POST", "/providers/{id}", PROVIDER_FORM, ()),
    ("POST", "/providers/{id}/delete", {}, ()),
    ("POST", "/providers/{id}/models", MODEL_FORM, ()),
    ("GET", "/models/{id}", {}, ()),
    ("POST", "/models/{id}", MODEL_FORM, ()),
    ("POST", "/models/{id}/delete", {}, ()),
    ("POST", "/weights/{name}", WEIGHTS_FORM, ()),
    ("GET", "/requests", {}, PAGE_ARGS),
    ("GET", "/requests/{id}", {}, ()),
    ("GET", "/requests/export", {}, DOWNLOAD_ARGS),
    ("GET", "/embeddings", {}, PAGE_ARGS),
    ("GET", "/embeddings/{id}", {}, ()),
    ("GET", "/embeddings/export", {}, DOWNLOAD_ARGS),
]  # fmt: skip


def form_bytes(values: dict[str, str]) -> bytes:
    """``values`` as an urlencoded form, lone surrogates as the bytes a client sends."""
    return "&".join(
        f"{quote(f.url_text(k), safe='')}={quote(f.url_text(v), safe='%')}"
        for k, v in values.items()
    ).encode()


@st.composite
def dashboard_requests(draw: Any) -> tuple[str, str, dict[str, str], bytes | None]:
    """A method, path and form; the form's CSRF token is added when it is sent."""
    method, template, fields, args = draw(st.sampled_from(DASHBOARD_ROUTES))
    path = template.format(id=draw(ids), name=draw(f.segments))
    chosen = draw(st.lists(st.sampled_from(args), unique=True)) if args else []
    query = {n: draw(st.one_of(ARG_VALUES.get(n, f.query_values), f.query_values)) for n in chosen}
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    form = (
        {n: draw(fields[n]) for n in draw(st.lists(st.sampled_from(sorted(fields)), unique=True))}
        if fields
        else {}
    )
    if fields is LOGIN_FORM:
        form["secret"] = ADMIN_SECRET
    if fields and draw(st.booleans()):
        form[draw(f.text)] = draw(f.text)  # a field nobody asked for
    raw = (
        draw(st.binary(max_size=64)) if method == "POST" and draw(st.integers(0, 19)) == 0 else None
    )
    return method, path, form, raw


def page_answer(path: str, status: int, headers: Any, data: bytes) -> None:
    """An HTML page (an error page names its status), a redirect to this site, or a
    download in the format asked for."""
    if status in (301, 302, 303, 307, 308):
        assert urlargs.local_path(headers["Location"]), headers["Location"]
        return
    route, _, query = path.partition("?")
    if status == 200 and route.endswith("/export"):
        download(query, "csv", headers["Content-Type"], data)
        return
    assert headers["Content-Type"] == "text/html; charset=utf-8", (status, headers["Content-Type"])
    page = data.decode()  # strict: a page is UTF-8
    if status >= 400:  # the dashboard's error page, or its bare one where no route matched
        assert re.search(rf"<(h1|title)>{status}\b", page), page[:300]


def csrf_token(page: str) -> str:
    """The CSRF token a dashboard page's forms post back."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


def test_fuzz_every_dashboard_form(seeded, client) -> None:  # type: ignore[no-untyped-def]
    token = csrf_token(client.get("/login").text)
    assert (
        client.post("/login", data={"csrf_token": token, "secret": ADMIN_SECRET}).status_code == 302
    )
    statuses: Counter = Counter()

    @given(dashboard_requests())
    def one(case: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, form, raw = case
        with client.session_transaction() as session:  # signing in again makes a new one
            token = session["csrf"]
        body = raw if raw is not None else form_bytes({"csrf_token": token, **form})
        resp = client.open(path, method=method, data=body, content_type=FORM)
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300])
        statuses[resp.status_code] += 1
        page_answer(path, resp.status_code, resp.headers, resp.get_data())

    f.run(one, f.EXAMPLES_FAST // 3)
    assert statuses[200] > 0 and statuses[302] > 0 and statuses[404] > 0, statuses


@pytest.mark.server
def test_fuzz_every_dashboard_form_through_gunicorn(seeded, gateway: Gateway) -> None:  # type: ignore[no-untyped-def]
    session = requests.Session()
    token = csrf_token(session.get(f"{gateway.url}/login", timeout=30).text)
    form = {"csrf_token": token, "secret": ADMIN_SECRET}
    session.post(f"{gateway.url}/login", data=form, timeout=30).raise_for_status()
    tokens = [csrf_token(session.get(f"{gateway.url}/keys", timeout=30).text)]
    statuses: Counter = Counter()

    @given(dashboard_requests())
    def one(case: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, form, raw = case
        body = raw if raw is not None else form_bytes({"csrf_token": tokens[-1], **form})
        resp = session.request(
            method,
            f"{gateway.url}{path}",
            data=body,
            headers={"Content-Type": FORM},
            allow_redirects=False,
            timeout=30,
        )
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        statuses[resp.status_code] += 1
        page_answer(path, resp.status_code, resp.headers, resp.content)
        if method == "POST" and path == "/login" and resp.status_code == 302:
            tokens.append(csrf_token(session.get(f"{gateway.url}/keys", timeout=30).text))

    f.run(one, f.EXAMPLES_SERVER // 2)
    assert statuses[200] > 0 and statuses[302] > 0, statuses
    assert gateway.log().count("Booting worker") == 1, "a worker restarted"
    assert "Traceback" not in gateway.log()
