"""The dashboard asks for the token once and uses it for the reads of engine output (issue 25, item 5).

With a token configured, /logs and the engine's last line need it; the page reads both
streams with fetch and the token in the Authorization header, never in a URL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chrome
from tests.browser.test_dashboard import TOKEN, enter_token, log_rows, make_stack, open_page, running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def urls(browser: chrome.Browser) -> list[str]:
    found: list[str] = browser.js("return performance.getEntriesByType('resource').map(e => e.name)")
    return found


def test_the_log_needs_the_token_and_the_page_asks_for_it_once(tmp_path: Path, browser: chrome.Browser) -> None:
    with running(make_stack(tmp_path, TOKEN)) as stack:
        marker = "dashboard-prompt-marker"
        with stack.log_file.open("a") as log:
            log.write(f"[2026-11-26T10:00:00.000+00:00] [gemma2] [4242] {marker}\n")
        open_page(browser, stack.gate_url + "/")
        browser.wait("the note", lambda: "enter the token" in browser.text("log-file"))
        assert not log_rows(browser)
        assert not any(u.split("?")[0].endswith("/logs") for u in urls(browser)), "no token, no request"
        assert "need it" in browser.text("token-state")

        enter_token(browser, "not-the-token-0123456789")
        browser.wait("the refusal", lambda: "refused" in browser.text("token-state"))
        browser.wait("the log's note", lambda: "refused the token" in browser.text("log-file"))
        assert browser.text("conn") == "live", "the state stream went on without the token"

        enter_token(browser, TOKEN)
        browser.wait("the log backlog", lambda: browser.text("log-file").startswith("from "))
        browser.wait("the prompt line", lambda: any(marker in r["text"] for r in log_rows(browser)))
        assert browser.text("conn") == "live"
        assert not any(TOKEN in u for u in urls(browser)), "the token never goes into a URL"
        errors = browser.console_errors()
        assert len(errors) == 1 and "/events" in errors[0] and "401" in errors[0], \
            f"one try for the wrong token (the state stream's), no script error: {errors}"
