"""The observed-state file: what the reconciler saw and did, for the gate, UIs and monitoring.

Shaped like a Kubernetes object's status: a phase (the seed's ``CURRENT_AI_STATE``),
conditions with reason and message, and observed vs desired generation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1


class Phase(StrEnum):
    IDLE = "IDLE"  # no model selected; inference gets 428
    STOPPING = "STOPPING"  # killing surplus engine processes
    WAITING_PORT = "WAITING_PORT"  # the wanted port is held by a process we may not kill
    LOADING = "LOADING"  # engine started, not ready yet (up to its boot budget)
    READY = "READY"  # engine answers its readiness probe; the gate proxies
    DEGRADED = "DEGRADED"  # was READY, now failing health checks; 503 until it answers or is restarted
    FAILED = "FAILED"  # bad input, crash loop, boot timeout; retried with backoff

    @property
    def serving(self) -> bool:
        return self is Phase.READY


class PhaseReason(StrEnum):
    """Why the phase is what it is when no failure says it (a failure's reason is a
    ``facts.Reason``): the ``reason`` of the Ready condition, and of PortAvailable while
    the port is held."""

    NO_MODEL_SELECTED = "NoModelSelected"
    STOPPING = "Stopping"  # killing surplus engines, nothing wanted
    SWITCHING = "Switching"  # killing the old engine before starting the wanted one
    STARTING = "Starting"
    LOADING = "Loading"
    READY = "Ready"
    PROBE_FAILING = "ProbeFailing"  # READY engine missed a health check; not restarted yet
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"  # waiting out the restart delay after a failure
    PORT_HELD_BY_FOREIGN_PROCESS = "PortHeldByForeignProcess"  # a process we may not kill


class ConditionType(StrEnum):
    DESIRED_VALID = "DesiredValid"
    CATALOG_VALID = "CatalogValid"
    PORT_AVAILABLE = "PortAvailable"
    READY = "Ready"
    CONVERGED = "Converged"


class ConditionReason(StrEnum):
    """A condition's reason when neither a failure nor the phase gives it."""

    VALID = "Valid"  # DesiredValid, CatalogValid
    FREE = "Free"  # PortAvailable
    CONVERGED = "Converged"
    PROGRESSING = "Progressing"  # Converged is False


@dataclass(frozen=True)
class Condition:
    type: str  # a ConditionType
    status: str  # "True" | "False" | "Unknown"
    reason: str  # a ConditionReason, a PhaseReason or a facts.Reason
    message: str
    last_transition_time: str


@dataclass(frozen=True)
class EngineInfo:
    model: str
    served_name: str
    instance: str | None
    pid: int | None
    pids: list[int]
    port: int
    url: str
    started_at: str | None
    adopted: bool
    memory_bytes: int | None = None  # cgroup memory.current, else the members' summed RSS
    memory_source: str | None = None  # "cgroup" or "rss"


@dataclass(frozen=True)
class BootInfo:
    started_at: str
    elapsed_s: float
    budget_s: float
    deadline: str
    attempt: int
    # {"percent": number | null, "stage": text} parsed from the engine's output
    # (reconciler/observe/progress.py); None until its output says anything about the load.
    progress: dict[str, Any] | None = None


@dataclass(frozen=True)
class ErrorInfo:
    reason: str  # a facts.Reason
    message: str
    at: str


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    cmdline: str
    ours: bool
    uid: int = -1


class SpareReason(StrEnum):
    """Why a stray is spared (never signalled); its ``StrayInfo.why`` says it in words."""

    NO_CONFLICT = "NoConflict"  # holds neither the wanted engine's port nor GPU memory
    OTHER_USER = "OtherUser"  # in the way, but runs as a uid outside the engine's strays.users
    FORGED_COOKIE = "ForgedCookie"  # this install's cookie on another uid's process


@dataclass(frozen=True)
class StrayInfo:
    """A copy of a catalog engine that ailayer did not start and does not kill, and why."""

    model: str
    pids: list[int]
    uids: list[int]
    cmdline: str
    why: str


@dataclass(frozen=True)
class Status:
    phase: Phase
    phase_since: str
    desired_model: str | None
    active_model: str | None
    message: str
    engine: EngineInfo | None = None
    boot: BootInfo | None = None
    last_log_line: str | None = None
    conditions: list[Condition] = field(default_factory=list)
    last_error: ErrorInfo | None = None
    desired_generation: int = 0
    observed_generation: int = 0
    revision: int = 0
    port_holders: list[Holder] = field(default_factory=list)
    restarts: int = 0
    next_retry_at: str | None = None
    gpu: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, str] = field(default_factory=dict)
    strays: list[StrayInfo] = field(default_factory=list)
    recap: dict[str, int] = field(default_factory=dict)
    reconciler: dict[str, Any] = field(default_factory=dict)
    config: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def significant(self) -> dict[str, Any]:
        """Everything but the clock-driven fields; a change here bumps the revision.

        The last log line counts only while converging (a UI shows the boot log): a serving
        engine's request and metrics lines would otherwise bump the revision every pass.
        """
        data = self.to_dict()
        for volatile in ("revision", "reconciler", "recap"):
            data.pop(volatile)
        if self.phase in (Phase.READY, Phase.IDLE):
            data.pop("last_log_line")
        if data["boot"]:
            data["boot"] = {k: v for k, v in data["boot"].items() if k != "elapsed_s"}
        if data["engine"]:
            data["engine"] = {k: v for k, v in data["engine"].items() if k != "memory_bytes"}
        if data["gpu"].get("processes"):  # which processes hold VRAM counts, not how many MiB
            data["gpu"] = {**data["gpu"], "processes": [p.get("pid") for p in data["gpu"]["processes"]]}
        return data


def liveness(doc: dict[str, Any], now: datetime, stale_after_s: float) -> tuple[str, str]:
    """Whether a live reconciler stands behind ``doc``: ("running" | "stale" | "stopped",
    why). A clean stop says so in the state; otherwise only the heartbeat's age tells."""
    found = doc.get("reconciler")
    beat: dict[str, Any] = found if isinstance(found, dict) else {}
    stopped = beat.get("stopped_at")
    if isinstance(stopped, str):
        return "stopped", f"the reconciler (pid {beat.get('pid')}) stopped at {stopped}"
    raw = beat.get("heartbeat")
    try:
        when = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        when = None
    if when is None:
        return "stale", "the state has no reconciler heartbeat"
    if when.tzinfo is None:
        when = when.astimezone()
    age = (now - when).total_seconds()
    if age > stale_after_s:
        return "stale", (f"the reconciler's heartbeat is {age:.0f} s old (limit {stale_after_s:g} s): "
                         f"it is not running (pid {beat.get('pid')}) or stuck")
    return "running", f"heartbeat {max(0.0, age):.1f} s ago"


def stopped(previous: Status, now: str, engines_stopped: bool) -> Status:
    """The last state of a reconciler that stops cleanly: it says so, and drops the engine
    it stopped (one it leaves running is kept, with nobody watching it)."""
    beat = {**previous.reconciler, "heartbeat": now, "stopped_at": now}
    if engines_stopped:
        new = replace(previous, engine=None, active_model=None, boot=None, reconciler=beat,
                      message=f"reconciler stopped at {now}; it stopped its engines")
    else:
        left = f" (pid {previous.engine.pid})" if previous.engine else ""
        new = replace(previous, reconciler=beat,
                      message=f"reconciler stopped at {now}; engines left running{left}, unwatched")
    return with_revision(new, previous)


def with_revision(new: Status, previous: Status | None) -> Status:
    """Carry the revision forward, bumping it only when something a watcher cares about moved."""
    if previous is None:
        return replace(new, revision=1)
    same = previous.significant() == new.significant()
    return replace(new, revision=previous.revision + (0 if same else 1))


def from_dict(data: dict[str, Any]) -> Status:
    """Rebuild a Status (used to carry revision and generation across reconciler restarts)."""
    def opt(cls: Any, key: str) -> Any:
        return cls(**data[key]) if data.get(key) else None

    return Status(
        phase=Phase(data["phase"]),
        phase_since=data["phase_since"],
        desired_model=data.get("desired_model"),
        active_model=data.get("active_model"),
        message=data.get("message", ""),
        engine=opt(EngineInfo, "engine"),
        boot=opt(BootInfo, "boot"),
        last_log_line=data.get("last_log_line"),
        conditions=[Condition(**c) for c in data.get("conditions", [])],
        last_error=opt(ErrorInfo, "last_error"),
        desired_generation=int(data.get("desired_generation", 0)),
        observed_generation=int(data.get("observed_generation", 0)),
        revision=int(data.get("revision", 0)),
        port_holders=[Holder(**h) for h in data.get("port_holders", [])],
        restarts=int(data.get("restarts", 0)),
        next_retry_at=data.get("next_retry_at"),
        gpu=data.get("gpu", {}),
        identity=data.get("identity", {}),
        strays=[StrayInfo(**x) for x in data.get("strays", [])],
        recap=data.get("recap", {}),
        reconciler=data.get("reconciler", {}),
        config=data.get("config", ""),
    )
