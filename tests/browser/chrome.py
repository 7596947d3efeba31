"""Headless Chromium under chromedriver (Debian's packages), for the dashboard's browser tests.

Started as root in a closed network, Chromium needs ``--no-sandbox`` and must not try to
reach Google's services (its connections would be refused and it would retry). Each browser
gets a fresh profile, and ``close`` proves that chromedriver and every Chromium process
under it are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.helpers import DEADLINE_S, wait_until

CHROMIUM = os.environ.get("AILAYER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AILAYER_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")
# How long browser processes get to exit after quit() before they are killed (and the test fails).
EXIT_GRACE_S = 10.0
T = TypeVar("T")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not found (apt-get install -y chromium chromium-driver)"
    return None


class Browser:
    """One Chromium and its driver; use as a context manager."""

    def __init__(self, *, network_log: bool = False) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="ailayer-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        logs = {"browser": "ALL", **({"performance": "ALL"} if network_log else {})}
        options.set_capability("goog:loggingPrefs", logs)  # network_log: DevTools Network.* events
        self.driver: webdriver.Chrome = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _tree(self) -> list[psutil.Process]:
        process = getattr(self.driver.service, "process", None)
        if process is None:
            return []
        try:
            root = psutil.Process(process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def close(self) -> None:
        """Quit, then make sure nothing of the browser is left; fail if something had to be killed."""
        procs = self._tree()  # before quit: afterwards orphans could no longer be found
        with contextlib.suppress(Exception):
            self.driver.quit()
        _, alive = psutil.wait_procs(procs, timeout=EXIT_GRACE_S)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=EXIT_GRACE_S)
        shutil.rmtree(self.profile, ignore_errors=True)
        assert not alive, f"browser processes did not exit: {[p.pid for p in alive]}"

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def text(self, element_id: str) -> str:
        return str(self.js("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                           element_id))

    def console_errors(self) -> list[str]:
        """Errors the page logged (a CSP violation shows up here)."""
        # ChromiumDriver.get_log has no annotations in selenium (4.51), though the package is py.typed.
        logs = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [str(e["message"]) for e in logs if e.get("level") == "SEVERE"]

    def wait(self, what: str, check: Callable[[], T | Literal[False] | None], timeout: float = DEADLINE_S,
             interval: float = 0.02) -> T:
        """``wait_until``, failing with what the page shows."""
        try:
            return wait_until(what, check, timeout, interval)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; page shows phase {self.text('phase')!r}, "
                                 f"result {self.text('toggle-result')!r}") from None
