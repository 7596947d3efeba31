"""Frozen facts about the machine, gathered once per pass and never mutated.

Everything here is plain data: the gatherers fill it from psutil and HTTP, tests fill it
from tables, and the planner reads it without touching the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    """Why something went wrong: the ``reason`` of ``last_error`` in the observed state."""

    UNKNOWN_MODEL = "UnknownModel"  # the desired file names no catalog entry
    INVALID_DESIRED_STATE = "InvalidDesiredState"
    INVALID_CATALOG = "InvalidCatalog"
    CHOSEN_BEFORE_REBOOT = "ChosenBeforeReboot"
    ENGINE_RESPAWNING = "EngineRespawning"  # another supervisor restarts what we kill
    SPAWN_FAILED = "SpawnFailed"
    KILL_FAILED = "KillFailed"
    PORT_BUSY = "PortBusy"
    PORT_SQUATTED = "PortSquatted"
    ENGINE_EXITED = "EngineExited"
    ENGINE_UNRESPONSIVE = "EngineUnresponsive"
    BOOT_TIMEOUT = "BootTimeout"
    PASS_FAILED = "PassFailed"  # noqa: S105 (a reason, not a password)


@dataclass(frozen=True)
class Failure:
    """A failure as a value: code decides on ``reason``, people read ``message``."""

    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


COOKIE_ENV = "AILAYER_INSTANCE"
"""Every engine we spawn carries ``AILAYER_INSTANCE=<namespace>/<model>/<id>/<started_ms>``.

Children inherit it. It only corroborates (docs/OWNERSHIP.md): anyone can set an
environment variable, and setproctitle (vLLM's workers) wipes it from /proc/PID/environ.
The namespace (a hash of the state dir) tells two ailayer installs' processes apart.
"""


@dataclass(frozen=True)
class Cookie:
    namespace: str
    model: str
    instance: str
    started_at: float  # epoch seconds

    def encode(self) -> str:
        return f"{self.namespace}/{self.model}/{self.instance}/{int(self.started_at * 1000)}"

    @classmethod
    def decode(cls, raw: str) -> Cookie | None:
        parts = raw.split("/")
        if len(parts) != 4:
            return None
        try:
            started = int(parts[3]) / 1000
        except ValueError:
            return None
        return cls(parts[0], parts[1], parts[2], started)


@dataclass(frozen=True)
class Proc:
    """One process as seen at gather time. ``create_time`` guards against PID reuse."""

    pid: int
    ppid: int
    create_time: float
    cmdline: str
    name: str = ""
    pgid: int = 0
    sid: int = 0
    cookie: Cookie | None = None
    listens: frozenset[int] = frozenset()  # ports it holds bound or listening (where looked at)
    zombie: bool = False
    uid: int = 0
    argv: tuple[str, ...] = ()
    cgroup: str | None = None  # its cgroup v2 path, e.g. "/ailayer-1a2b/3c4d5e6f"

    def key(self) -> tuple[int, float]:
        return (self.pid, self.create_time)


@dataclass(frozen=True)
class Record:
    """An engine instance as the executor wrote it down when it started it (state dir).

    This, not the cookie, is who the instance is: the leader by (pid, create time), its
    session and group, the uid it runs as, and in cgroup mode the cgroup it was placed in.
    """

    model: str
    instance: str
    started_at: float  # clock-seam epoch seconds: the boot budget counts from here
    leader_pid: int | None = None
    leader_create_time: float | None = None  # real epoch seconds, comparable with Proc.create_time
    uid: int = 0
    cgroup: str | None = None  # absolute directory of its cgroup, in cgroup mode


@dataclass(frozen=True)
class Probe:
    """One readiness check of the desired engine."""

    ok: bool
    detail: str  # e.g. "200", "connection refused", "503 Loading model"
    json_ok: bool | None = None  # None: no JSON check configured or not reached


@dataclass(frozen=True)
class GpuProc:
    pid: int
    used_mib: float


@dataclass(frozen=True)
class Gpu:
    observable: bool
    message: str
    processes: tuple[GpuProc, ...] = ()


class WarmupPhase(StrEnum):
    """Where an instance's warm-up request stands (``reconciler.act.warmup`` sends it)."""

    PENDING = "pending"  # sent, no answer yet (Ollama answers when the model is loaded)
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class WarmupState:
    """A warm-up's phase, and for FAILED what went wrong. Its text ("pending", "done",
    "failed: <why>") is what the observed state's loading message shows."""

    phase: WarmupPhase
    why: str = ""

    def __str__(self) -> str:
        return f"{self.phase.value}: {self.why}" if self.phase is WarmupPhase.FAILED else self.phase.value


@dataclass(frozen=True)
class Observation:
    now: float  # epoch seconds from the clock seam
    procs: tuple[Proc, ...]
    port_free: dict[int, bool] = field(default_factory=dict)
    probe: Probe | None = None
    warmup: WarmupState | None = None  # None: no warm-up sent to the desired engine's instance
    exits: dict[str, str] = field(default_factory=dict)  # instance id -> how it ended
    gpu: Gpu = Gpu(False, "not gathered")
    self_pids: frozenset[int] = frozenset()  # the reconciler and its ancestors: never targets
    self_uid: int = 0
    records: tuple[Record, ...] = ()
    members: dict[str, frozenset[int]] = field(default_factory=dict)  # instance -> cgroup.procs
    # port -> pids with a listening socket on it; bound-only holders are in Proc.listens
    listening: dict[int, frozenset[int]] = field(default_factory=dict)
    identity: str = "record"  # "cgroup" or "record": how instances are told apart (see records)
