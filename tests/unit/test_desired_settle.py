"""The settle rule on the fake clock: every absence of the desired file must last 1 s.

Drives ``Reconciler._read_desired`` only (no processes): the rule is about time and files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.domain.catalog import Identity, demo
from reconciler.kit import clock
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import DESIRED_SETTLE_S, Reconciler
from reconciler.store import desired_file


@pytest.fixture
def rec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Reconciler:
    fake = FakeClock()
    monkeypatch.setattr(clock, "clock", fake)
    catalog = demo(tmp_path)
    catalog = replace(catalog, identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    return Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))


def wanted(rec: Reconciler) -> str | None:
    return rec._read_desired([]).model


def test_every_absence_waits_its_own_full_second(rec: Reconciler) -> None:
    """missing -> invalid for 2 s -> missing for 0.4 s must not stop the model (issue 11, 5)."""
    fake = clock.clock
    assert isinstance(fake, FakeClock)
    path = rec.catalog.desired_path
    desired_file.write(rec.catalog, "gpt-oss")
    assert wanted(rec) == "gpt-oss"
    path.unlink()
    assert wanted(rec) == "gpt-oss"  # settling
    path.write_text("model: [not, a, name]\n")
    fake.advance(2.0)
    assert wanted(rec) == "gpt-oss"  # invalid: the last good state stays
    path.unlink()
    fake.advance(0.4)
    assert wanted(rec) == "gpt-oss", "the earlier absence must not count for this one"
    fake.advance(DESIRED_SETTLE_S)
    assert wanted(rec) is None


def test_explicit_null_acts_at_once(rec: Reconciler) -> None:
    desired_file.write(rec.catalog, "gpt-oss")
    assert wanted(rec) == "gpt-oss"
    desired_file.write(rec.catalog, None)
    assert wanted(rec) is None


def test_a_failing_pass_is_reported_and_backs_off(rec: Reconciler) -> None:
    """An exception in a pass: PassFailed in the state, a moving heartbeat, doubling delays."""
    first = rec.step()  # a good pass first: there is a state to keep
    assert first.status is not None
    delays = [rec._pass_failed(ValueError("embedded null byte"), n) for n in range(1, 9)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]
    assert rec.previous is not None and rec.previous.last_error is not None
    assert rec.previous.last_error.reason == "PassFailed"
    assert "8 time(s) in a row" in rec.previous.last_error.message
    assert rec.previous.phase is first.status.phase  # the last good state is kept
    log = rec.catalog.log_file.read_text()
    assert log.count("pass failed: ValueError: embedded null byte") == 1
