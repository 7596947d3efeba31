"""The executor's waits on the fake clock: a busy port is given up on after exactly
PORT_RELEASE_WAIT_S of clock time, reported as a Failure value, and no real time passes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.act.cgroups import Mode
from reconciler.act.executor import PORT_RELEASE_WAIT_S, Executor
from reconciler.domain.facts import Reason
from reconciler.kit import clock
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.plan.planner import AwaitPort


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(clock, "clock", fake)
    yield fake


def test_a_port_that_stays_busy_is_a_port_busy_failure_after_the_release_wait(
        fake: FakeClock, tmp_path: Path) -> None:
    executor = Executor(tmp_path, "0123456789ab", ActivityLog(tmp_path / "a.log", tmp_path, terminal=None),
                        Mode("record", "tests", None))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started, real = fake.monotonic(), time.monotonic()
        outcome = executor.run([AwaitPort("127.0.0.1", port, "the old engine must release it")], {},
                               lambda keys: ())
    assert outcome.stopped_early and outcome.failed == 1
    (failure,) = outcome.errors
    assert failure.reason is Reason.PORT_BUSY and f"127.0.0.1:{port}" in failure.message
    assert fake.monotonic() - started == pytest.approx(PORT_RELEASE_WAIT_S, abs=0.1)
    assert time.monotonic() - real < PORT_RELEASE_WAIT_S / 5, "the fake clock must not wait for real"


def test_a_free_port_passes_at_once(fake: FakeClock, tmp_path: Path) -> None:
    executor = Executor(tmp_path, "0123456789ab", ActivityLog(tmp_path / "a.log", tmp_path, terminal=None),
                        Mode("record", "tests", None))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = fake.monotonic()
    outcome = executor.run([AwaitPort("127.0.0.1", port, "free")], {}, lambda keys: ())
    assert not outcome.errors and outcome.changed == 1 and fake.monotonic() == started
