"""A flapping desired file is coalesced (issue 11, 6), on the fake clock, with no processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.domain.catalog import Identity, demo
from reconciler.kit import clock
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import FLAP_WINDOW_MAX_S, FLAP_WINDOW_MIN_S, WAKE_SPACING_S, Reconciler
from reconciler.store import desired_file

A, B = "gpt-oss", "gemma2"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(clock, "clock", fake)
    yield fake


@pytest.fixture
def rec(fake: FakeClock, tmp_path: Path) -> Reconciler:
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    return Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))


def taken(rec: Reconciler, fake: FakeClock, writes: int, every: float,
          per_pass: int = 1) -> list[tuple[float, str | None]]:
    """Write A, B, A, … every ``every`` s with a pass after each ``per_pass`` writes:
    (time, model) whenever the model a pass acts on changes."""
    start = fake.monotonic()
    out: list[tuple[float, str | None]] = []
    for i in range(writes):
        desired_file.write(rec.catalog, (A, B)[i % 2])
        fake.advance(every)
        if (i + 1) % per_pass:
            continue
        model = rec._read_desired([]).model
        if not out or out[-1][1] != model:
            out.append((round(fake.monotonic() - start, 3), model))
    return out


def test_toggles_that_each_wait_for_their_switch_are_taken_at_once(rec: Reconciler, fake: FakeClock) -> None:
    """One toggle per pass (a user, or a bench switching back and forth): never delayed."""
    assert taken(rec, fake, 20, 0.3) == [(round(0.3 * (i + 1), 3), (A, B)[i % 2]) for i in range(20)]
    assert rec.recheck_in is None and rec._flap_window == FLAP_WINDOW_MIN_S


def test_five_seconds_of_flapping_cost_a_handful_of_changes(rec: Reconciler, fake: FakeClock) -> None:
    changes = taken(rec, fake, 510, 0.01, per_pass=3)  # 5.1 s of writes, 3 between passes
    assert [t for t, _ in changes] == [0.03, 0.06, 0.27, 0.72, 1.53, 3.18]  # each window doubled
    assert rec._flap_window == FLAP_WINDOW_MAX_S


def test_a_held_back_change_asks_for_a_pass_when_the_window_ends(rec: Reconciler, fake: FakeClock) -> None:
    taken(rec, fake, 2, 0.001)  # A, then B taken at once: one toggle since A
    desired_file.write(rec.catalog, A)
    assert rec._read_desired([]).model == B, "A came within the window of B"
    assert rec.recheck_in is not None and rec.recheck_in == pytest.approx(FLAP_WINDOW_MIN_S, abs=0.002)
    fake.advance(rec.recheck_in)
    assert rec._read_desired([]).model == A, "nothing is lost: the latest model is taken"


def test_passes_woken_by_file_events_are_spaced(rec: Reconciler, fake: FakeClock) -> None:
    stop, waited = threading.Event(), []
    for gap in (10.0, 0.01, 0.01, WAKE_SPACING_S):
        fake.advance(gap)
        before = fake.monotonic()
        rec._coalesce(stop)
        waited.append(round(fake.monotonic() - before, 3))
    assert waited == [0.0, round(WAKE_SPACING_S - 0.01, 3), round(WAKE_SPACING_S - 0.01, 3), 0.0]
