"""The browser tests' fixtures: Chromium is required (skipped without it, failed under CI),
and each test gets a browser of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.browser import chrome


@pytest.fixture(scope="module", autouse=True)
def _need_chromium() -> None:
    why = chrome.missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser tests: {why}")
    pytest.skip(why)


@pytest.fixture
def browser() -> Iterator[chrome.Browser]:
    with chrome.Browser() as b:
        yield b
