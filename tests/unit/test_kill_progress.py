"""A long kill keeps the state flowing (issue 11, 3): on the fake clock, no processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.act import killer
from reconciler.domain.catalog import Identity, demo
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import Reconciler
from reconciler.store import state_file


def test_the_ticker_reports_survivors_once_a_second_from_the_first_sigkill(fake_clock: FakeClock) -> None:
    heard: list[tuple[tuple[int, ...], float]] = []
    tick = killer.Ticker(lambda alive, waited: heard.append((alive, waited)))
    for _ in range(70):  # 3.5 s of 50 ms looks at two survivors
        tick([12, 11])
        fake_clock.advance(killer.POLL_S)
    assert [alive for alive, _ in heard] == [(11, 12)] * 3
    waited = [w for _, w in heard]  # each at the first 50 ms look past the whole second
    assert all(k <= w <= k + killer.POLL_S * 1.01 for k, w in zip((1, 2, 3), waited, strict=True)), waited


def test_a_silent_ticker_is_harmless(fake_clock: FakeClock) -> None:
    tick = killer.Ticker(None)
    fake_clock.advance(5)
    tick([1])


def test_kill_progress_refreshes_the_heartbeat_and_says_what_lives(fake_clock: FakeClock, tmp_path: Path) -> None:
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    rec = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))
    first = rec.step()
    assert first.status is not None
    before = state_file.read_raw(catalog.observed_path)
    fake_clock.advance(30)
    assert rec.executor.progress == rec.publisher.kill_progress, "a pass's kills report to the publisher"
    rec.publisher.kill_progress((4242, 4243), 30.0)
    after = state_file.read_raw(catalog.observed_path)
    assert after["reconciler"]["heartbeat"] > before["reconciler"]["heartbeat"]
    assert "2 process(es) still alive 30 s after SIGKILL (pids 4242, 4243)" in after["message"]
    assert after["revision"] == before["revision"] + 1 and after["phase"] == before["phase"]
