"""Every test that may start processes proves it left none behind."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.act import cgroups
from reconciler.gate import compiled
from reconciler.kit import clock
from reconciler.kit.clock import FakeClock
from tests.helpers import SESSION_CGROUP_ENV, TEST_RUN_ENV, kill_all, ours_since

os.environ.setdefault(TEST_RUN_ENV, uuid.uuid4().hex)
SESSION_PREFIX = "ailayer-tests-"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Test the request path that runs: never a compiled build of an older source (it shadows
    the .py), and in CI the compiled one (what the figures in docs/PERFORMANCE.md measure)."""
    late = compiled.stale()
    if late:
        raise pytest.UsageError(f"compiled modules older than their source: {', '.join(late)}; "
                                "run .venv/bin/pip install -e . again")
    missing = set(compiled.MODULES) - set(compiled.compiled())
    if os.environ.get("CI") == "true" and missing:
        raise pytest.UsageError(f"CI tests the compiled request path, but these run interpreted: "
                                f"{', '.join(sorted(missing))} (no C compiler at install?)")


def _enter_session_cgroup() -> Path | None:
    """Put this pytest session in a cgroup of its own (root with cgroup v2 only).

    Stale session cgroups of runs that were killed are removed when empty (no process in
    them or below).
    """
    mount, own = cgroups.cgroup2_mount(), cgroups.own_cgroup()
    if mount is None or own is None or os.geteuid() != 0:
        return None
    parent = mount / own.lstrip("/")
    for stale in parent.glob(SESSION_PREFIX + "*"):
        # A populated one is a live session running beside us (another pytest): removing
        # its empty sub-cgroups would pull the instance base from under its reconcilers.
        if not cgroups.populated(stale):
            with contextlib.suppress(OSError):
                cgroups.remove(stale)
    path = parent / (SESSION_PREFIX + os.environ[TEST_RUN_ENV])
    try:
        path.mkdir(exist_ok=True)
        (path / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        return None
    return path


@pytest.fixture(scope="session", autouse=True)
def session_cgroup() -> Iterator[Path | None]:
    path = _enter_session_cgroup()
    if path is not None:
        os.environ[SESSION_CGROUP_ENV] = str(path)
    yield path
    if path is not None:
        (path.parent / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            cgroups.remove(path)


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


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The one time seam on a clock that moves only when told (or by the sleeps it is asked for)."""
    fake = FakeClock()
    monkeypatch.setattr(clock, "clock", fake)
    return fake
