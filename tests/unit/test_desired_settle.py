"""The settle rule on the fake clock: every absence of the desired file must last 1 s.

Drives ``plan.wish.Wishes`` only (no loop, no processes): the rule is about time and files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.domain.catalog import Catalog, Identity, demo
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import Reconciler
from reconciler.plan.wish import DESIRED_SETTLE_S, Wishes
from reconciler.store import desired_file


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return demo(tmp_path)


@pytest.fixture
def wishes(catalog: Catalog) -> Wishes:
    return Wishes(catalog.desired_path, 0, current_boot_id(), booted_at=0.0)


def wanted(wishes: Wishes, catalog: Catalog, fake: FakeClock) -> str | None:
    return wishes.take(desired_file.look(catalog), fake.monotonic(), None, False).desired.model


def test_every_absence_waits_its_own_full_second(wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    """missing -> invalid for 2 s -> missing for 0.4 s must not stop the model (issue 11, 5)."""
    path = catalog.desired_path
    desired_file.write(catalog, "gpt-oss")
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"
    path.unlink()
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"  # settling
    path.write_text("model: [not, a, name]\n")
    fake_clock.advance(2.0)
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"  # invalid: the last good state stays
    path.unlink()
    fake_clock.advance(0.4)
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss", "the earlier absence must not count for this one"
    fake_clock.advance(DESIRED_SETTLE_S)
    assert wanted(wishes, catalog, fake_clock) is None


def test_explicit_null_acts_at_once(wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    desired_file.write(catalog, "gpt-oss")
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"
    desired_file.write(catalog, None)
    assert wanted(wishes, catalog, fake_clock) is None


def test_a_failing_pass_is_reported_and_backs_off(fake_clock: FakeClock, tmp_path: Path) -> None:
    """An exception in a pass: PassFailed in the state, a moving heartbeat, doubling delays."""
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    rec = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))
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
