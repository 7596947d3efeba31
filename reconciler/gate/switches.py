"""Recent switches as the gate saw them, for ``GET /switches`` and the dashboard.

A switch starts when the observed state's ``desired_model`` changes and ends when the state
settles on it: READY with that model active, or IDLE for "none". The observed state only
says where things are now, so the gate keeps the last few switches in memory; they start
over when the gate restarts (the activity log keeps the full history).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from reconciler.domain.status import Phase
from reconciler.gate.statefollow import Snapshot, StateFollower
from reconciler.kit import clock

KEEP = 20


@dataclass
class Switch:
    to: str | None
    came_from: str | None
    started_at: str
    started_mono: float
    outcome: str = "in progress"  # "in progress" | "done" | "failed" (still retried) | "superseded"
    ended_at: str | None = None
    duration_s: float | None = None
    last_phase: str | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("came_from")
        data.pop("started_mono")
        if self.duration_s is None:
            data["elapsed_s"] = round(clock.monotonic() - self.started_mono, 3)
        return data


def _settled(data: dict[str, Any], model: str | None) -> bool:
    phase = data.get("phase")
    if model is None:
        return phase == Phase.IDLE
    return phase == Phase.READY and data.get("active_model") == model


class SwitchLog:
    """The last ``KEEP`` switches, newest first."""

    def __init__(self) -> None:
        self._switches: deque[Switch] = deque(maxlen=KEEP)

    def watch(self, follower: StateFollower) -> None:
        follower.add_listener(self.observe)

    def observe(self, old: Snapshot, new: Snapshot) -> None:
        data, before = new.data or {}, old.data or {}
        if not new.present:
            return
        wanted = data.get("desired_model")
        current = self._switches[0] if self._switches else None
        if old.present and wanted != before.get("desired_model"):
            if current is not None and current.outcome in ("in progress", "failed"):
                self._end(current, "superseded")
            current = Switch(to=wanted, came_from=before.get("active_model"),
                             started_at=clock.iso(), started_mono=clock.monotonic())
            self._switches.appendleft(current)
        if current is None or current.outcome not in ("in progress", "failed"):
            return
        current.last_phase = str(data.get("phase"))
        if _settled(data, current.to):
            self._end(current, "done")
        elif data.get("phase") == Phase.FAILED:
            current.outcome = "failed"

    @staticmethod
    def _end(switch: Switch, outcome: str) -> None:
        switch.outcome = outcome
        switch.ended_at = clock.iso()
        switch.duration_s = round(clock.monotonic() - switch.started_mono, 3)

    def as_json(self) -> list[dict[str, Any]]:
        return [s.as_json() for s in self._switches]
