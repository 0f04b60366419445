"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against gunicorn.

A person's path: log in, switch to Chinese, find the aborted request by its amber
已中止 badge, open it, create a key and revoke it. Then every page, in both
languages with JavaScript off, photographed (``GATEWAY_SCREENSHOTS`` chooses where;
``make screenshots`` refreshes docs/screenshots/).

Needs ``/usr/bin/chromium`` and a CJK font (``apt-get install chromium
fonts-wqy-zenhei``; ``make test`` installs them). Without them these tests fail: a
skip would pass for a check that never ran. Playwright's own browser downloads are
not used (they cannot be fetched here).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gateway.db import database
from gateway.models import ApiKey, SrvLog
from tests.dashboard_seed import Seeded, seed
from tests.servers import ADMIN_SECRET, ROOT, Gateway

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking switches Chromium dials out at start, and a closed
# network refuses it slowly.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("GATEWAY_SCREENSHOTS") or ROOT / "tests" / ".artifacts" / "shots")
AMBER = "rgb(245, 158, 11)"  # --aborted in static/dashboard.css
LANGUAGES = {"en": "en-US,en;q=0.9", "zh_CN": "zh-CN,zh;q=0.9"}


def _missing() -> list[str]:
    missing = [] if CHROMIUM.exists() else ["chromium"]
    fonts = (
        shutil.which("fc-list")
        and subprocess.run(
            ["fc-list", ":lang=zh"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    return missing if fonts else [*missing, "fonts-wqy-zenhei"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _missing()
    if missing:
        pytest.fail(
            f"the browser tests need Debian's {' and '.join(missing)}: "
            f"apt-get install -y chromium fonts-wqy-zenhei (make test does it as root)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def dashboard(module_app, module_database: tuple) -> Iterator[tuple[Gateway, Seeded]]:  # type: ignore[no-untyped-def]
    """One seeded database and one gateway for the module, on each backend in turn.

    Starting a gateway and seeding took longer than most of these tests. They keep
    apart: each makes keys and logs of its own, and removes the key it only shows.
    """
    url, directory = module_database
    with database.connection_context():
        seeded = seed()
    gw = Gateway(url, directory / "instance")  # after the seed: it loads keys at start
    yield gw, seeded
    gw.stop_behind()


def open_page(browser: Browser, lang: str = "en", **options: object) -> Page:
    context = browser.new_context(
        viewport={"width": 1366, "height": 900},
        locale=LANGUAGES[lang].split(",")[0],
        extra_http_headers={"Accept-Language": LANGUAGES[lang]},
        **options,
    )
    context.set_default_timeout(15_000)
    return context.new_page()


def log_in(page: Page, gw: Gateway) -> None:
    page.goto(f"{gw.url}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.fill("input[name=secret]", ADMIN_SECRET)
    page.locator("form.signin button[type=submit]").click()
    expect(page).to_have_url(f"{gw.url}/")


def chat_status(gw: Gateway, key: str) -> int:
    """A chat call with ``key`` for a model nobody serves: 404 if the key works, else 401."""
    body = {"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]}
    return requests.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"x-api-key": key}, timeout=10
    ).status_code


def test_a_person_finds_an_aborted_call_in_chinese_and_manages_a_key(
    browser: Browser, dashboard: tuple[Gateway, Seeded]
) -> None:
    gw, seeded = dashboard
    page = open_page(browser, "en")
    log_in(page, gw)
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("svg.chart").first).to_be_visible()

    page.locator("button[name=lang][value=zh_CN]").click()
    expect(page.locator("h1")).to_have_text("概览")
    page.locator("nav.side").get_by_text("请求", exact=True).click()

    badge = page.locator("tr.row-link .badge.aborted")
    expect(badge).to_have_count(1)
    expect(badge).to_have_text("已中止")
    # The stylesheet may still be on its way when the row is in the DOM: wait for the colour.
    expect(badge).to_have_css("background-color", AMBER)
    assert "客户端已断开连接" in badge.get_attribute("title")
    page.locator("tr.row-link", has=page.locator(".badge.aborted")).locator("a").click()

    expect(page).to_have_url(f"{gw.url}/requests/{seeded.calls['aborted'].id}")
    expect(page.locator("h1")).to_contain_text("请求")
    expect(page.locator("h1 .badge")).to_have_text("已中止")
    answer = page.locator(".msg.assistant .text")
    expect(answer).to_contain_text("Once upon a time, a lighthouse keeper")
    expect(page.get_by_text("完整的回答仍已记录")).to_be_visible()

    page.locator("nav.side").get_by_text("API 密钥", exact=True).click()
    page.get_by_text("新建 API 密钥", exact=True).click()
    page.fill("input[name=comment]", "浏览器测试")
    page.select_option("select[name=expires]", "7")
    page.get_by_role("button", name="创建密钥").click()
    key = page.input_value("#new-key")
    assert re.fullmatch(r"sk-[0-9a-f]{32}", key)
    copy = page.locator("button[data-copy=new-key]")
    expect(copy).to_be_visible()  # JavaScript on: the copy button is offered
    assert chat_status(gw, key) == 404  # the key works

    hint = f"{key[:7]}…{key[-4:]}"
    row = page.locator("tr", has_text=hint)
    row.locator("summary", has_text="撤销").click()
    row.get_by_role("button", name="是").click()
    expect(page.locator(".flash.ok")).to_have_text(f"密钥 {hint} 已撤销。")
    expect(page.locator("tr", has_text=hint)).to_have_count(0)
    assert chat_status(gw, key) == 401
    with database.connection_context():
        assert ApiKey.by_key(key).revoked


@pytest.mark.parametrize(
    ("lang", "cost", "cut", "told"),
    [
        ("en", "Cost", "The client’s copy ended here", "The client was sent 24 events"),  # noqa: RUF001
        ("zh_CN", "费用", "客户端收到的内容到此为止", "客户端离开前收到了 24 个事件"),
    ],
)
def test_the_cost_and_where_the_clients_copy_ended_are_shown(
    browser: Browser, dashboard: tuple[Gateway, Seeded], lang: str, cost: str, cut: str, told: str
) -> None:
    gw, seeded = dashboard
    page = open_page(browser, lang)
    log_in(page, gw)
    aborted = seeded.calls["aborted"]
    page.goto(f"{gw.url}/requests/{aborted.id}")
    panel = page.locator("section#cost")
    expect(panel.locator("h2")).to_have_text(cost)
    expect(panel.locator("td.total")).to_have_text(
        ("$" if lang == "en" else "US$") + f"{aborted.cost['total']:.9f}".rstrip("0")
    )
    expect(page.locator("p.delivery.short")).to_contain_text(told)
    mark = page.locator(".msg.assistant mark.cut")
    expect(mark).to_be_visible()
    expect(mark).to_contain_text(cut)
    # The mark sits where the client's copy ended: what it got before, the rest after.
    before = page.locator(".msg.assistant .delivered").inner_text()
    after = page.locator(".msg.assistant .undelivered").inner_text()
    assert (
        before == aborted.delivered["text"] and before + after == aborted.completion[0]["content"]
    )
    expect(mark).to_have_css("border-style", "dashed")
    box, rest = mark.bounding_box(), page.locator(".msg.assistant .undelivered").bounding_box()
    assert box["y"] <= rest["y"] + rest["height"]  # drawn in the text, not off somewhere
    page.goto(f"{gw.url}/")
    expect(page.locator(".card#cost .label")).to_have_text(cost)
    expect(page.locator(".card#cost .value")).not_to_have_text("—")


PAGES = [
    ("overview", "/"),
    ("requests", "/requests"),
    ("request-aborted", "/requests/{aborted}"),
    ("request-tools", "/requests/{tools}"),
    ("request-failed", "/requests/{failed}"),
    ("embeddings", "/embeddings"),
    ("embedding", "/embeddings/{e1}"),
    ("keys", "/keys"),
    ("providers", "/providers"),
    ("logs", "/logs"),
]


@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_every_page_works_without_javascript(
    browser: Browser, dashboard: tuple[Gateway, Seeded], lang: str
) -> None:
    gw, seeded = dashboard
    ids = {name: row.id for name, row in {**seeded.calls, **seeded.embeddings}.items()}
    page = open_page(browser, lang, java_script_enabled=False)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{gw.url}/login")
    page.screenshot(path=SHOTS / f"login.{lang}.png")
    log_in(page, gw)
    for name, path in PAGES:
        response = page.goto(gw.url + path.format(**ids))
        assert response.status == 200, path
        expect(page.locator("h1")).not_to_be_empty()
        # On a 1366 px laptop screen no table hides its columns (the keys' actions were
        # once off to the right, behind a scroll bar).
        overflowing = page.evaluate(
            "[...document.querySelectorAll('.table-wrap')]"
            ".filter(w => w.scrollWidth > w.clientWidth).length"
        )
        page.screenshot(path=SHOTS / f"{name}.{lang}.png", full_page=True)
        assert overflowing == 0, path
    # A form round trip with no script: create a key, shown once without a copy button.
    page.goto(f"{gw.url}/keys")
    page.locator("details.add > summary").click()
    page.fill("input[name=comment]", "no-js")
    page.locator("details.add button[type=submit]").click()
    assert re.fullmatch(r"sk-[0-9a-f]{32}", page.input_value("#new-key"))
    expect(page.locator("button[data-copy=new-key]")).to_be_hidden()
    with database.connection_context():  # the next language's photographs as they were
        ApiKey.delete().where(ApiKey.comment == "no-js").execute()


def test_a_search_is_a_url_that_another_person_opens_in_chinese(
    browser: Browser, dashboard: tuple[Gateway, Seeded]
) -> None:
    gw, seeded = dashboard
    page = open_page(browser, "en")
    log_in(page, gw)
    page.goto(f"{gw.url}/requests")
    page.fill("input[name=q]", "lighthouse")
    page.select_option("select[name=status]", "aborted")
    page.locator("form.filters button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/requests\?.*q=lighthouse.*status=aborted"))
    expect(page.locator("tr.row-link")).to_have_count(1)
    shared = page.url
    csv_link = page.get_by_role("link", name="Download CSV")
    assert "q=lighthouse" in csv_link.get_attribute("href")

    other = open_page(browser, "zh_CN")
    log_in(other, gw)
    other.goto(shared)
    expect(other.locator("input[name=q]")).to_have_value("lighthouse")
    expect(other.locator("tr.row-link")).to_have_count(1)
    expect(other.locator("tr.row-link .badge")).to_have_text("已中止")
    other.locator("tr.row-link a").click()
    expect(other).to_have_url(f"{gw.url}/requests/{seeded.calls['aborted'].id}")


@pytest.mark.parametrize(
    ("lang", "title", "acknowledged"),
    [("en", "Server logs", "1 log acknowledged."), ("zh_CN", "服务器日志", "已确认 1 条日志。")],
)
def test_the_logs_page_in_both_languages(
    browser: Browser, dashboard: tuple[Gateway, Seeded], lang: str, title: str, acknowledged: str
) -> None:
    gw, _ = dashboard
    failed = f"via openai failed #{uuid.uuid4().hex[:8]}"  # not the other language's
    with database.connection_context():
        for level in ("error", "warn"):
            SrvLog.create(message=f"call: gpt-4o {failed} ({level})", level=level,
                          details={"logger": "gateway.call", "process": "a1@host:1"})  # fmt: skip
    page = open_page(browser, lang)
    log_in(page, gw)
    page.locator("nav.side a[href='/logs']").click()
    expect(page.locator("h1")).to_have_text(title)
    ours = page.locator("tr.log-row", has_text=failed)  # the gateway may log too
    expect(ours).to_have_count(2)
    page.select_option("select[name=level]", "error")
    page.locator("form.filters button[type=submit]").click()
    expect(ours).to_have_count(1)
    ours.locator("button[type=submit]").click()
    expect(page.locator(".flash.ok")).to_have_text(acknowledged)
    expect(ours).to_have_count(0)


def test_a_browser_app_on_another_origin_calls_the_api_and_reads_its_limits(
    browser: Browser, dashboard: tuple[Gateway, Seeded], fake
) -> None:  # type: ignore[no-untyped-def]
    """A page on another origin calls /v1 with a key, as a web app on the OpenAI SDK does
    (``dangerouslyAllowBrowser``): Chromium asks first (the Authorization header needs
    a preflight), then reads the answer and the limits the gateway exposes to it."""
    gw, _ = dashboard
    model = f"cors-{uuid.uuid4().hex[:6]}"
    key = gw.setup_route(fake.url, system_name=model, remote_id="fake;chunks=3")["key"]
    page = open_page(browser)
    # The app's page from a server of its own: another origin than the gateway's
    # 127.0.0.1:<port>, in the same (local) address space, as Chromium requires of a
    # page that calls a local server.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AppPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page.goto(f"http://localhost:{server.server_address[1]}/")
    got = page.evaluate(
        """async ([url, key, model]) => {
            const answer = await fetch(url + "/v1/chat/completions", {
                method: "POST",
                headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
                body: JSON.stringify({model, messages: [{role: "user", content: "hi"}]}),
            });
            const body = await answer.json();
            return {
                status: answer.status,
                remaining: answer.headers.get("X-RateLimit-Remaining-RPM"),
                text: body.choices[0].message.content,
            };
        }""",
        [gw.url, key, model],
    )
    assert got["status"] == 200 and got["text"].split() == ["tok0", "tok1", "tok2"]
    assert got["remaining"] == "49"  # the key's default 50 a minute, one taken
    page.context.close()
    server.shutdown()


class _AppPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>an app</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
