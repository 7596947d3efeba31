"""The one time seam: every clock read and every sleep in ailayer goes through here.

Why one module: tests drive a 45-minute boot or a backoff ladder with a fake clock,
and the "patience" simulation speeds up the clock of *every* process in a scenario
(reconciler, gate, demo engines) by the same factor via ``AILAYER_TIME_SCALE``. A
hidden ``time.sleep(120)`` or a 120 s constant anywhere would then fire after two
real seconds and show up, instead of hiding behind a slow test.
"""

from __future__ import annotations

import os
import select
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from reconciler.kit import isotime

TIME_SCALE_ENV = "AILAYER_TIME_SCALE"


class Clock(Protocol):
    """What the rest of the code may ask about time."""

    scale: float

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        """Sleep up to ``seconds`` of clock time; return True if ``wake`` cut it short."""
        ...

    def wait_io(self, poller: select.poll, seconds: float) -> list[tuple[int, int]]:
        """Wait up to ``seconds`` of clock time for the poller's fds; the (fd, events) ready."""
        ...


class ScaledClock:
    """Real time, optionally running ``scale`` times faster than the wall clock."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"{TIME_SCALE_ENV} must be > 0, got {scale}")
        self.scale = scale
        self._mono0 = time.monotonic()
        self._wall0 = time.time()

    def monotonic(self) -> float:
        return self._mono0 + (time.monotonic() - self._mono0) * self.scale

    def now(self) -> datetime:
        elapsed = (time.monotonic() - self._mono0) * self.scale
        return datetime.fromtimestamp(self._wall0, UTC) + timedelta(seconds=elapsed)

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        real = max(0.0, seconds) / self.scale
        if wake is None:
            time.sleep(real)
            return False
        return wake.wait(real)

    def wait_io(self, poller: select.poll, seconds: float) -> list[tuple[int, int]]:
        return poller.poll(max(0.0, seconds) / self.scale * 1000)

    def real_seconds(self, seconds: float) -> float:
        """Clock seconds to wall seconds, for APIs (sockets, asyncio) that take real time."""
        return seconds / self.scale


class FakeClock:
    """A clock that only moves when told to; sleeping advances it instantly."""

    def __init__(self, start: datetime | None = None) -> None:
        self.scale = 1.0
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._now += timedelta(seconds=seconds)

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        self.slept.append(seconds)
        if wake is not None and wake.is_set():
            return True
        self.advance(seconds)
        return False

    def wait_io(self, poller: select.poll, seconds: float) -> list[tuple[int, int]]:
        """What is ready now; if nothing, the whole wait passes at once."""
        ready = poller.poll(0)
        if not ready:
            self.sleep(seconds)
        return ready


def _from_env() -> ScaledClock:
    raw = os.environ.get(TIME_SCALE_ENV, "1")
    try:
        return ScaledClock(float(raw))
    except ValueError as exc:
        raise SystemExit(f"ailayer: bad {TIME_SCALE_ENV}={raw!r}: {exc}") from exc


clock: ScaledClock = _from_env()


def monotonic() -> float:
    return clock.monotonic()


def now() -> datetime:
    return clock.now()


def sleep(seconds: float, wake: threading.Event | None = None) -> bool:
    return clock.sleep(seconds, wake)


def wait_io(poller: select.poll, seconds: float) -> list[tuple[int, int]]:
    return clock.wait_io(poller, seconds)


def real_seconds(seconds: float) -> float:
    return clock.real_seconds(seconds)


def iso(ts: datetime | None = None) -> str:
    """ISO-8601 with milliseconds and zone, the format of every timestamp we write."""
    return isotime.iso(ts or clock.now())
