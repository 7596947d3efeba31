"""The executor's waits on the fake clock: a busy port is given up on after exactly
PORT_RELEASE_WAIT_S of clock time, reported as a Failure value, and no real time passes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from reconciler.act.cgroups import Mode
from reconciler.act.executor import PORT_RELEASE_WAIT_S, Executor
from reconciler.act.records import Records
from reconciler.domain.facts import Proc, Reason
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.plan.planner import AwaitPort


class NoScan:
    """No kill here, so nothing to rescan."""

    def procs_of(self, units: tuple[tuple[str, str | None], ...]) -> Iterable[Proc]:
        return ()


def executor(state_dir: Path) -> Executor:
    return Executor(state_dir, "0123456789ab", ActivityLog(state_dir / "a.log", state_dir, terminal=None),
                    Mode("record", "tests", None), Records(state_dir), NoScan())


def test_a_port_that_stays_busy_is_a_port_busy_failure_after_the_release_wait(
        fake_clock: FakeClock, tmp_path: Path) -> None:
    waits = executor(tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started, real = fake_clock.monotonic(), time.monotonic()
        outcome = waits.run([AwaitPort("127.0.0.1", port, "the old engine must release it")], {})
    assert outcome.stopped_early and outcome.failed == 1
    (failure,) = outcome.errors
    assert failure.reason is Reason.PORT_BUSY and f"127.0.0.1:{port}" in failure.message
    assert fake_clock.monotonic() - started == pytest.approx(PORT_RELEASE_WAIT_S, abs=0.1)
    # Waiting for real would take the whole PORT_RELEASE_WAIT_S; the ~100 port looks alone took
    # up to 1.3 s on a loaded 2-core machine, so the bound sits between the two.
    assert time.monotonic() - real < PORT_RELEASE_WAIT_S * 0.8, "the fake clock must not wait for real"


def test_a_free_port_passes_at_once(fake_clock: FakeClock, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits = executor(tmp_path)
    started = fake_clock.monotonic()
    outcome = waits.run([AwaitPort("127.0.0.1", port, "free")], {})
    assert not outcome.errors and outcome.changed == 1 and fake_clock.monotonic() == started
