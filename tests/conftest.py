"""Every test that may start processes proves it left none behind."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import TEST_RUN_ENV, kill_all, ours_since

os.environ.setdefault(TEST_RUN_ENV, uuid.uuid4().hex)


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves any process it started (directly or not) alive."""
    if "unit" in request.node.path.parts:
        yield
        return
    started = time.time()
    yield
    left = ours_since(started)
    described = [f"{p.pid} {' '.join(p.cmdline())}" for p in left if p.is_running()]
    kill_all(left)
    assert not left, f"test left processes behind: {described}"
