"""Follow the observed-state file the reconciler writes, and judge how fresh it is.

The reconciler replaces the file by atomic rename, so we watch its *directory* (watchdog,
inotify on Linux) and re-read on any event for that file name; a timer re-reads every
``stale_after_s / 3`` as a safety net in case an event is lost. A file that does not parse
keeps the last good state: a half-written or hand-edited file must not flap the gate.

Freshness comes from the reconciler's heartbeat. A heartbeat that changes while we watch
is fresh by definition and then ages on *our* monotonic clock, so two processes whose
clocks disagree (``AILAYER_TIME_SCALE`` runs each process's clock from its own start)
cannot make a live reconciler look dead. Only the heartbeat found when the gate starts is
judged by its timestamp, which is how a file left behind by a dead reconciler is caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from reconciler.domain import status
from reconciler.kit import clock
from reconciler.kit.atomicfile import ensure_dir
from reconciler.store import state_file

log = logging.getLogger("ailayer.gate")

# When the state directory cannot be watched (it cannot be created, or inotify is out of
# watches), re-read this often instead: fast enough that a UI sees a phase change at once.
POLL_FALLBACK_S = 0.5
# A timer set for the exact moment the heartbeat turns stale fires this much later, so
# the check lands on the stale side of the boundary.
STALE_TIMER_SLACK_S = 0.01


@dataclass(frozen=True)
class Target:
    """The engine a READY state routes to; every proxied request belongs to one."""

    url: str
    model: str
    served_name: str
    instance: str | None
    pid: int | None = field(default=None, compare=False)  # informative; instance identifies


@dataclass(frozen=True)
class Snapshot:
    """One good read of the file (or its absence), with what the gate derives from it."""

    data: dict[str, Any] | None
    json_text: str
    revision: int
    phase: str | None
    target: Target | None
    loaded_mono: float
    stopped: bool = False  # the reconciler said it stopped (a clean stop)

    @property
    def present(self) -> bool:
        return self.data is not None


MISSING = Snapshot(None, "{}", 0, None, None, 0.0)


def _target(data: dict[str, Any]) -> Target | None:
    if data.get("phase") != status.Phase.READY:
        return None
    engine = data.get("engine")
    if not isinstance(engine, dict) or not engine.get("url"):
        return None
    model = str(engine.get("model") or data.get("active_model") or "")
    return Target(
        url=str(engine["url"]).rstrip("/"),
        model=model,
        served_name=str(engine.get("served_name") or model),
        instance=engine.get("instance"),
        pid=engine.get("pid"),
    )


def snapshot_of(data: dict[str, Any]) -> Snapshot:
    """Derive what the gate needs once per read, so each request does attribute reads only."""
    return Snapshot(
        data=data,
        json_text=json.dumps(data, separators=(",", ":")),
        revision=int(data.get("revision") or 0),
        phase=str(data.get("phase")),
        target=_target(data),
        loaded_mono=clock.monotonic(),
        stopped=isinstance(data.get("reconciler"), dict) and bool(data["reconciler"].get("stopped_at")),
    )


def _heartbeat(data: dict[str, Any]) -> str | None:
    rec = data.get("reconciler")
    beat = rec.get("heartbeat") if isinstance(rec, dict) else None
    return beat if isinstance(beat, str) else None


def _timestamp_age(beat: str) -> float:
    """Age by the timestamp itself; a heartbeat from the future counts as fresh."""
    try:
        when = datetime.fromisoformat(beat)
    except ValueError:
        return float("inf")
    if when.tzinfo is None:
        when = when.astimezone()
    return max(0.0, (clock.now() - when).total_seconds())


# The watchdog event types that can mean new content under our file name.
_CHANGES = frozenset({
    EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED,
    EVENT_TYPE_CLOSED,
})  # fmt: skip

Listener = Callable[[Snapshot, Snapshot], None]


class _Handler(FileSystemEventHandler):
    """watchdog callback: hands every event about our file over to the event loop."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]):
        super().__init__()
        self._name = name
        self._loop = loop
        self._wake = wake

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGES:
            return  # our own reads raise "opened"/"closed_no_write": reacting would loop
        paths = (event.src_path, event.dest_path)
        if any(os.path.basename(os.fsdecode(p)) == self._name for p in paths if p):
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                self._loop.call_soon_threadsafe(self._wake)


class StateFollower:
    """The gate's view of the reconciler: current snapshot, staleness, and change wake-ups."""

    def __init__(self, path: Path, stale_after_s: float) -> None:
        self.path = path
        self.stale_after_s = stale_after_s
        self.snapshot = MISSING
        self.read_error: str | None = None
        self.closing = False
        self._changed = asyncio.Event()
        self._listeners: list[Listener] = []
        self._beat: str | None = None
        self._beat_age0 = float("inf")
        self._beat_mono = 0.0
        self._was_stale = True
        self._observer: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stale_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """First read (heartbeat judged by timestamp), then the watch and the safety timer."""
        self._reload(first=True)
        self._was_stale = self.stale()
        loop = asyncio.get_running_loop()
        period = self.stale_after_s / 3
        if not self._watch(loop):
            period = min(period, POLL_FALLBACK_S)
        self._tasks.append(asyncio.create_task(self._resync(period)))

    def _watch(self, loop: asyncio.AbstractEventLoop) -> bool:
        try:
            ensure_dir(self.path.parent)
            observer = Observer()
            observer.schedule(_Handler(self.path.name, loop, self.reload), str(self.path.parent))
            observer.daemon = True
            observer.start()
        except OSError as exc:
            log.warning("cannot watch %s (%s); polling every %ss", self.path.parent, exc,
                        POLL_FALLBACK_S)
            return False
        self._observer = observer
        return True

    async def close(self) -> None:
        """Stop watching and wake every waiter so long-polls and event streams end."""
        self.closing = True
        self._notify()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)

    async def _resync(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(clock.real_seconds(period_s))
            self.reload()

    # ------------------------------------------------------------------ reading

    def add_listener(self, listener: Listener) -> None:
        """``listener(old, new)`` runs in the event loop after every meaningful change."""
        self._listeners.append(listener)

    def reload(self) -> None:
        self._reload(first=False)

    def _reload(self, *, first: bool) -> None:
        try:
            data = state_file.read_raw(self.path)
        except FileNotFoundError:
            self.read_error = None
            self._apply(MISSING, first)
            return
        except (OSError, ValueError) as exc:
            if self.read_error != str(exc):
                log.warning("keeping the last good state: %s", exc)
            self.read_error = str(exc)
            return
        self.read_error = None
        self._apply(snapshot_of(data), first)

    def _apply(self, new: Snapshot, first: bool) -> None:
        old = self.snapshot
        beat = _heartbeat(new.data) if new.data is not None else None
        if beat != self._beat:
            self._beat = beat
            self._beat_mono = clock.monotonic()
            if beat is None:
                self._beat_age0 = float("inf")
            else:
                self._beat_age0 = _timestamp_age(beat) if first else 0.0
        self.snapshot = new
        moved = (old.present, old.revision, old.phase, old.target) != (
            new.present, new.revision, new.phase, new.target)
        if moved and not first:
            for listener in self._listeners:
                try:
                    listener(old, new)
                except Exception:  # one broken listener must not stop the others
                    log.exception("state listener failed")
        stale = self.stale()
        if moved or stale != self._was_stale:
            self._was_stale = stale
            self._notify()
        self._arm_stale_timer()

    def _arm_stale_timer(self) -> None:
        """Wake waiters the moment the heartbeat turns stale, not at the next re-read."""
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        left = self.stale_after_s - self.heartbeat_age()
        if left >= 0 and left != float("inf"):
            loop = asyncio.get_running_loop()
            delay = clock.real_seconds(left) + STALE_TIMER_SLACK_S
            self._stale_timer = loop.call_later(delay, self._check_stale)

    def _check_stale(self) -> None:
        self._stale_timer = None
        stale = self.stale()
        if stale != self._was_stale:
            self._was_stale = stale
            self._notify()

    # ------------------------------------------------------------------ answers

    def heartbeat_age(self) -> float:
        """Seconds (clock time) since the reconciler's last heartbeat; inf when unknown."""
        return self._beat_age0 + (clock.monotonic() - self._beat_mono)

    def stale(self) -> bool:
        """True when no live reconciler stands behind the current state (or there is none)."""
        snap = self.snapshot
        return snap.data is None or snap.stopped or self.heartbeat_age() > self.stale_after_s

    def reconciler_state(self) -> str:
        if self.snapshot.data is None:
            return "not running"
        if self.snapshot.stopped:
            return "stopped"
        return "stale" if self.stale() else "running"

    @property
    def revision(self) -> int:
        """The observed state's revision: the one counter ``GET /status?since=`` compares."""
        return self.snapshot.revision

    def change_event(self) -> asyncio.Event:
        """The event the *next* change sets; grab it before checking, then wait on it."""
        return self._changed

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()
