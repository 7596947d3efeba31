"""The dashboard in a real headless Chromium, against a real reconciler, gate and demo engines.

Each test starts the stack (reconciler + gate + the stand-in engines it spawns) and one
Chromium under chromedriver, and proves at the end that none of them is left. Conditions
are waited for with deadlines, never slept for. Without Chromium the tests are skipped on a
developer's machine and fail under CI=true, where .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web
from selenium.webdriver.common.by import By

from reconciler.kit.freeport import free_port
from tests.browser import chrome
from tests.helpers import GatedStack, demo_engine, http_status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TOKEN = "dashboard-test-token-0123456789"
# Long enough that the page sees several progress steps (the vLLM stand-in loads in 5).
BOOT_S = 4.0


def make_stack(root: Path, token: str | None) -> GatedStack:
    engines = {"gpt-oss": demo_engine("vllm", free_port(), boot_s=BOOT_S),
               "gemma2": demo_engine("ollama", free_port(), boot_s=1.0)}
    stack = GatedStack(root, engines, gate_port=free_port())
    stack.env["AILAYER_TOKEN"] = token or ""
    return stack


@contextlib.contextmanager
def running(stack: GatedStack) -> Iterator[GatedStack]:
    """Reconciler and gate up and IDLE; at the end both stopped and every engine killed."""
    try:
        stack.start("--stop-on-exit")
        stack.start_gate()
        stack.wait_phase("IDLE")
        yield stack
    finally:
        stack.tear_down()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GatedStack]:
    with running(make_stack(tmp_path, TOKEN)) as s:
        yield s


def open_page(browser: chrome.Browser, url: str) -> None:
    browser.driver.get(url)
    browser.wait("the page to connect", lambda: browser.text("conn") == "live")
    browser.wait("the first state", lambda: browser.js("return document.body.dataset.revision"))


def phase(browser: chrome.Browser) -> str:
    return browser.text("phase")


def wait_for_phase(browser: chrome.Browser, stack: GatedStack, wanted: str, timeout: float = 60) -> None:
    """Wait until the page shows ``wanted``; a failure says what the reconciler reported."""
    try:
        browser.wait(f"{wanted} on the page", lambda: phase(browser) == wanted, timeout=timeout)
    except AssertionError as exc:
        st = stack.status()
        raise AssertionError(f"{exc}; observed state: phase {st.get('phase')}, message {st.get('message')!r}, "
                             f"last_error {st.get('last_error')}") from None


def enter_token(browser: chrome.Browser, token: str) -> None:
    field = browser.driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    browser.driver.find_element(By.ID, "token-save").click()
    browser.wait("the token to be kept", lambda: "is set" in browser.text("token-state"))


def click_model(browser: chrome.Browser, model: str) -> None:
    browser.wait(f"a button for {model}", lambda: browser.js(
        "return document.querySelector(`#buttons button[data-model='${arguments[0]}']`) !== null", model))
    browser.driver.find_element(By.CSS_SELECTOR, f"#buttons button[data-model='{model}']").click()


def log_rows(browser: chrome.Browser) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = browser.js(
        "return Array.from(document.querySelectorAll('#log-lines li'))"
        ".map(li => ({model: li.dataset.model, text: li.textContent}))")
    return rows


# --------------------------------------------------------------------------- tests


def test_page_loads_and_shows_idle(stack: GatedStack, browser: chrome.Browser) -> None:
    open_page(browser, stack.gate_url + "/")
    assert phase(browser) == "IDLE"
    assert browser.js("return document.getElementById('phase').dataset.phase") == "IDLE"
    assert browser.text("desired") == "none"
    buttons = browser.js("return Array.from(document.querySelectorAll('#buttons button'))"
                         ".map(b => [b.dataset.model, b.disabled])")
    assert sorted(buttons) == [["", False], ["gemma2", False], ["gpt-oss", False]]
    assert browser.js("return document.getElementById('toggle-note').hidden") is True
    assert browser.text("conditions-body"), "the conditions table is filled"
    assert not browser.console_errors()  # no CSP violation, no script error


def test_toggle_from_the_page_loads_with_moving_progress_then_ready(
        stack: GatedStack, browser: chrome.Browser) -> None:
    open_page(browser, stack.gate_url + "/")
    enter_token(browser, TOKEN)
    click_model(browser, "gpt-oss")
    browser.wait("the toggle to be accepted", lambda: "Requested gpt-oss" in browser.text("toggle-result"))
    wait_until("the reconciler to read the wish", lambda: stack.status().get("desired_model") == "gpt-oss")

    # Sample the page until READY: it must pass through LOADING with a bar that moves.
    seen: list[tuple[str, float | None, str]] = []

    def sample() -> bool:
        shown = phase(browser)
        width = browser.js("const v = document.getElementById('bar').getAttribute('aria-valuenow');"
                           "return v === null ? null : Number(v)")
        seen.append((shown, width, browser.text("stage")))
        return shown == "READY"

    browser.wait("READY on the page", sample, timeout=60)
    loading = [(w, s) for p, w, s in seen if p == "LOADING"]
    assert loading, f"the page never showed LOADING: {seen}"
    widths = [w for w, _ in loading if w is not None]
    assert len(set(widths)) >= 2 and widths == sorted(widths), f"the bar did not move forward: {loading}"
    assert any(s and s != "\u2013" for _, s in loading), "a stage was shown while loading"
    assert browser.text("active") == "gpt-oss"
    engine = stack.status()["engine"]
    assert browser.text("engine-pid") == str(engine["pid"])
    assert browser.text("engine-port") == str(engine["port"])
    browser.wait("the switch listed as done", lambda: "done" in browser.text("switches-body"))
    assert "gpt-oss" in browser.text("switches-body")
    assert not browser.console_errors()


def test_log_lines_appear_live_and_filter_by_model(stack: GatedStack, browser: chrome.Browser) -> None:
    open_page(browser, stack.gate_url + "/")
    enter_token(browser, TOKEN)  # the log is engine output: it needs the token (issue 25)
    browser.wait("the log backlog", lambda: browser.text("log-file").startswith("from "))
    before = len(log_rows(browser))
    # A line the page cannot have had at load: appended now, as the reconciler appends.
    marker = "dashboard-live-marker"
    with stack.log_file.open("a") as log:
        log.write(f"[2026-11-26T10:00:00.000+00:00] [gemma2] [4242] {marker}\n")
    browser.wait("the appended line on the page", lambda: any(marker in r["text"] for r in log_rows(browser)))
    assert len(log_rows(browser)) > before

    # The engine's own boot output, through the reconciler, while the page is open.
    stack.toggle("gemma2")
    browser.wait("a gemma2 engine line", lambda: any(
        r["model"] == "gemma2" and marker not in r["text"] for r in log_rows(browser)), timeout=60)

    select = browser.driver.find_element(By.ID, "log-filter")
    select.find_element(By.CSS_SELECTOR, "option[value='ailayer']").click()
    browser.wait("only ailayer lines", lambda: (rows := log_rows(browser)) and all(
        r["model"] == "ailayer" for r in rows))


def test_a_wrong_token_shows_a_clear_error(stack: GatedStack, browser: chrome.Browser) -> None:
    open_page(browser, stack.gate_url + "/")
    enter_token(browser, "not-the-token")
    click_model(browser, "gemma2")
    message = browser.wait("an error", lambda: (t := browser.text("toggle-result")) != "Asking for gemma2…" and t)
    assert "Wrong token" in message and "401" in message and "AILAYER_TOKEN" in message, message
    assert browser.js("return document.getElementById('toggle-result').dataset.kind") == "error"
    assert "No token entered" in browser.text("token-state"), "the refused token is forgotten"
    assert not stack.desired.exists() or "gemma2" not in stack.desired.read_text()
    assert phase(browser) == "IDLE"


def test_without_a_token_the_buttons_are_disabled_with_the_reason(tmp_path: Path,
                                                                   browser: chrome.Browser) -> None:
    with running(make_stack(tmp_path, None)) as stack:
        open_page(browser, stack.gate_url + "/")
        browser.wait("the reason", lambda: "no token configured" in browser.text("toggle-note"))
        assert "AILAYER_TOKEN" in browser.text("toggle-note")
        disabled = browser.js("return Array.from(document.querySelectorAll('#buttons button')).map(b => b.disabled)")
        assert disabled and all(disabled)


# --------------------------------------------------------------------------- behind a proxy


class PrefixProxy:
    """A reverse proxy that serves the gate under /ailayer/, as an nginx location would."""

    PREFIX = "/ailayer"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith(self.PREFIX + "/"):
            return web.Response(status=404, text="not under the prefix")
        target = self.upstream + request.path_qs[len(self.PREFIX):]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")}
        async with self._session.request(request.method, target, headers=headers,
                                         data=await request.read(), auto_decompress=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection",
                                                                          "content-length")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> web.AppRunner:
            self._session = ClientSession()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self._runner = self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> PrefixProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_the_page_works_under_a_sub_path(stack: GatedStack, browser: chrome.Browser) -> None:
    with PrefixProxy(stack.gate_url) as proxy:
        base = f"http://127.0.0.1:{proxy.port}{PrefixProxy.PREFIX}/"
        assert http_status(base) is not None
        open_page(browser, base)
        assert phase(browser) == "IDLE"
        enter_token(browser, TOKEN)
        browser.wait("the log backlog", lambda: browser.text("log-file").startswith("from "))
        click_model(browser, "gemma2")
        browser.wait("the toggle through the proxy", lambda: "Requested gemma2" in browser.text("toggle-result"))
        wait_for_phase(browser, stack, "READY")
        urls = browser.js("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(base) for u in urls), urls
        assert not browser.console_errors()
        browser.driver.get("about:blank")  # ends the page's event streams through the proxy


def test_the_page_is_sent_with_a_strict_csp(stack: GatedStack) -> None:
    """No inline script can run, nothing loads from elsewhere, and no site can frame the page."""
    import urllib.request

    with urllib.request.urlopen(stack.gate_url + "/", timeout=5) as resp:
        csp = resp.headers["Content-Security-Policy"]
        html = resp.read().decode()
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "<script>" not in html
    assert not re.search(r"\son[a-z]+\s*=", html), "no inline event handlers"
    info = json.loads(urllib.request.urlopen(stack.gate_url + "/ui/info", timeout=5).read())
    assert sorted(m["name"] for m in info["models"]) == ["gemma2", "gpt-oss"]
    assert info["toggle"]["enabled"] is True and TOKEN not in json.dumps(info)
    assert yaml.safe_load(stack.config.read_text())["gate"]["listen"].startswith("127.0.0.1:")
