"""A flapping desired file is coalesced (issue 11, 6), on the fake clock, with no processes."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.domain.catalog import Catalog, Identity, demo
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import WAKE_SPACING_S, Reconciler
from reconciler.plan.wish import FLAP_WINDOW_MAX_S, FLAP_WINDOW_MIN_S, Taken, Wishes
from reconciler.store import desired_file

A, B = "gpt-oss", "gemma2"


def take(wishes: Wishes, catalog: Catalog, fake: FakeClock) -> Taken:
    return wishes.take(desired_file.look(catalog), fake.monotonic(), None, False)


def taken(wishes: Wishes, catalog: Catalog, fake: FakeClock, writes: int, every: float,
          per_pass: int = 1) -> tuple[list[tuple[float, str | None]], list[float | None]]:
    """Write A, B, A, … every ``every`` s with a pass after each ``per_pass`` writes:
    (time, model) whenever the model a pass acts on changes, and each pass's recheck_in."""
    start = fake.monotonic()
    out: list[tuple[float, str | None]] = []
    rechecks: list[float | None] = []
    for i in range(writes):
        desired_file.write(catalog, (A, B)[i % 2])
        fake.advance(every)
        if (i + 1) % per_pass:
            continue
        result = take(wishes, catalog, fake)
        rechecks.append(result.recheck_in)
        if not out or out[-1][1] != result.desired.model:
            out.append((round(fake.monotonic() - start, 3), result.desired.model))
    return out, rechecks


def test_toggles_that_each_wait_for_their_switch_are_taken_at_once(
        wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    """One toggle per pass (a user, or a bench switching back and forth): never delayed."""
    changes, rechecks = taken(wishes, catalog, fake_clock, 20, 0.3)
    assert changes == [(round(0.3 * (i + 1), 3), (A, B)[i % 2]) for i in range(20)]
    assert set(rechecks) == {None} and wishes.flap_window == FLAP_WINDOW_MIN_S


def test_five_seconds_of_flapping_cost_a_handful_of_changes(
        wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    changes, _ = taken(wishes, catalog, fake_clock, 510, 0.01, per_pass=3)  # 5.1 s of writes, 3 between passes
    assert [t for t, _ in changes] == [0.03, 0.06, 0.27, 0.72, 1.53, 3.18]  # each window doubled
    assert wishes.flap_window == FLAP_WINDOW_MAX_S


def test_a_held_back_change_asks_for_a_pass_when_the_window_ends(
        wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    taken(wishes, catalog, fake_clock, 2, 0.001)  # A, then B taken at once: one toggle since A
    desired_file.write(catalog, A)
    held = take(wishes, catalog, fake_clock)
    assert held.desired.model == B, "A came within the window of B"
    assert held.recheck_in is not None and held.recheck_in == pytest.approx(FLAP_WINDOW_MIN_S, abs=0.002)
    fake_clock.advance(held.recheck_in)
    assert take(wishes, catalog, fake_clock).desired.model == A, "nothing is lost: the latest model is taken"


def test_passes_woken_by_file_events_are_spaced(fake_clock: FakeClock, tmp_path: Path) -> None:
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    rec = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))
    stop, waited = threading.Event(), []
    for gap in (10.0, 0.01, 0.01, WAKE_SPACING_S):
        fake_clock.advance(gap)
        before = fake_clock.monotonic()
        rec._coalesce(stop)
        waited.append(round(fake_clock.monotonic() - before, 3))
    assert waited == [0.0, round(WAKE_SPACING_S - 0.01, 3), round(WAKE_SPACING_S - 0.01, 3), 0.0]
