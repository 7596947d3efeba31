"""The time seam: a scaled real clock and a fake one. The only unit tests that really sleep."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from reconciler.kit import clock
from reconciler.kit.clock import FakeClock, ScaledClock

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def test_scaled_sleep_takes_a_scale_th_of_the_time() -> None:
    fast = ScaledClock(60)
    started = time.monotonic()
    woken = fast.sleep(6)  # six clock seconds: a tenth of a real second
    real = time.monotonic() - started
    assert woken is False
    assert 0.09 <= real < 1.0


def test_scaled_monotonic_runs_scale_times_faster() -> None:
    fast = ScaledClock(60)
    real0 = time.monotonic()
    clock0 = fast.monotonic()
    time.sleep(0.05)
    clock1 = fast.monotonic()
    real1 = time.monotonic()
    assert clock1 - clock0 >= 60 * 0.05 * 0.99
    assert clock1 - clock0 <= 60 * (real1 - real0) * 1.01


def test_scaled_now_runs_scale_times_faster() -> None:
    fast = ScaledClock(60)
    before = fast.now()
    time.sleep(0.05)
    after = fast.now()
    assert after.tzinfo is not None
    assert after - before >= timedelta(seconds=60 * 0.05 * 0.99)


def test_scale_one_is_real_time() -> None:
    real = ScaledClock()
    assert real.scale == 1.0
    assert abs(real.now() - datetime.now(UTC)) < timedelta(seconds=1)
    assert real.real_seconds(5.0) == 5.0


def test_real_seconds_converts_clock_seconds() -> None:
    assert ScaledClock(60).real_seconds(120) == 2.0


@pytest.mark.parametrize("scale", [0, -1])
def test_a_non_positive_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match=clock.TIME_SCALE_ENV):
        ScaledClock(scale)


def test_a_negative_sleep_returns_at_once() -> None:
    started = time.monotonic()
    assert ScaledClock().sleep(-5) is False
    assert time.monotonic() - started < 0.5


def test_sleep_with_a_set_wake_event_returns_true_at_once() -> None:
    wake = threading.Event()
    wake.set()
    started = time.monotonic()
    assert ScaledClock().sleep(3600, wake) is True
    assert time.monotonic() - started < 0.5


def test_sleep_with_an_unset_wake_event_runs_to_the_end() -> None:
    assert ScaledClock(60).sleep(1.2, threading.Event()) is False


def test_iso_has_milliseconds_and_zone() -> None:
    stamp = clock.iso()
    assert ISO.match(stamp), stamp
    assert datetime.fromisoformat(stamp).tzinfo is not None


def test_iso_of_a_given_time() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=timezone(timedelta(hours=2)))
    stamp = clock.iso(moment)
    assert ISO.match(stamp), stamp
    assert ".891" in stamp
    assert datetime.fromisoformat(stamp) == moment.replace(microsecond=891000)


def test_fake_clock_sleep_advances_instantly() -> None:
    fake = FakeClock()
    mono0, now0 = fake.monotonic(), fake.now()
    started = time.monotonic()
    assert fake.sleep(2700) is False
    assert time.monotonic() - started < 0.5
    assert fake.monotonic() - mono0 == 2700
    assert fake.now() - now0 == timedelta(seconds=2700)
    assert fake.slept == [2700]


def test_fake_clock_only_moves_when_told() -> None:
    fake = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    assert fake.monotonic() == fake.monotonic()
    assert fake.now() == datetime(2030, 1, 1, tzinfo=UTC)
    fake.advance(1.5)
    assert fake.now() == datetime(2030, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)


def test_fake_clock_sleep_with_a_set_wake_event_does_not_advance() -> None:
    fake = FakeClock()
    wake = threading.Event()
    wake.set()
    before = fake.monotonic()
    assert fake.sleep(60, wake) is True
    assert fake.monotonic() == before
    assert fake.slept == [60]


def test_module_functions_use_the_module_clock(fake_clock: FakeClock) -> None:
    start = fake_clock.now()
    assert clock.monotonic() == 1000.0
    assert clock.now() == start
    assert clock.sleep(30) is False
    assert clock.monotonic() == 1030.0
    assert datetime.fromisoformat(clock.iso()) == start + timedelta(seconds=30)


def test_time_scale_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clock.TIME_SCALE_ENV, "120")
    assert clock._from_env().scale == 120.0
    monkeypatch.setenv(clock.TIME_SCALE_ENV, "fast")
    with pytest.raises(SystemExit, match=clock.TIME_SCALE_ENV):
        clock._from_env()
    monkeypatch.setenv(clock.TIME_SCALE_ENV, "0")
    with pytest.raises(SystemExit):
        clock._from_env()
