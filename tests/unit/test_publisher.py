"""The publisher's writes between passes, on the fake clock, with no processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.domain.catalog import Identity, demo
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import Reconciler


def test_a_failing_pass_is_reported_and_backs_off(fake_clock: FakeClock, tmp_path: Path) -> None:
    """An exception in a pass: PassFailed in the state, a moving heartbeat, doubling delays."""
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    rec = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))
    first = rec.step()  # a good pass first: there is a state to keep
    assert first.status is not None
    publisher = rec.publisher
    delays = [publisher.pass_failed(ValueError("embedded null byte"), n, catalog.resync_interval_s)
              for n in range(1, 9)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]
    assert publisher.previous is not None and publisher.previous.last_error is not None
    assert publisher.previous.last_error.reason == "PassFailed"
    assert "8 time(s) in a row" in publisher.previous.last_error.message
    assert publisher.previous.phase is first.status.phase  # the last good state is kept
    log = catalog.log_file.read_text()
    assert log.count("pass failed: ValueError: embedded null byte") == 1
