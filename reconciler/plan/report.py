"""Turn one pass (plan, outcome, facts) into the observed-state document and a recap.

Pure like the planner: the time, the pid and the boot it writes come in a ``Stamp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from reconciler import __version__
from reconciler.domain.catalog import Catalog
from reconciler.domain.facts import Failure, Gpu, Observation, Reason
from reconciler.domain.status import (
    BootInfo,
    Condition,
    ConditionReason,
    ConditionType,
    EngineInfo,
    ErrorInfo,
    Holder,
    Phase,
    PhaseReason,
    Status,
    StrayInfo,
    with_revision,
)
from reconciler.kit.isotime import iso, iso_epoch
from reconciler.observe.progress import BootProgress
from reconciler.plan.planner import Plan


@dataclass(frozen=True)
class GateFacts:
    """``ailayer up``'s gate as its supervisor last saw it (reconciler.console.gate_supervisor):
    a gate that died and was started again must show in the state, not only in the log."""

    pid: int | None  # the running gate's; None while a dead one waits for its restart
    restarts: int = 0
    last_exit: str | None = None  # how the last one ended: "pid 12 killed by SIGKILL", "pid 12 exit 1"
    last_restart_at: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit,
                "last_restart_at": self.last_restart_at}


@dataclass(frozen=True)
class Stamp:
    """Who writes the document, and when: read by the caller, so the report reads nothing."""

    now: datetime  # the clock seam's, as clock.now()
    pid: int  # the reconciler's
    boot_id: str | None  # this boot of the machine (kit.bootid), None where unreadable
    gate: GateFacts | None = None  # `up`'s gate; None under `reconcile`, which runs none


@dataclass(frozen=True)
class PassInput:
    catalog: Catalog
    desired_model: str | None
    desired_generation: int
    observed_generation: int
    plan: Plan
    obs: Observation
    errors: tuple[Failure, ...]  # most important first
    last_log_line: str | None
    recap: dict[str, int]
    leader_pid: int | None
    identity: dict[str, str]
    memory: tuple[int | None, str | None] = (None, None)  # the active engine's bytes, and whence
    progress: BootProgress | None = None  # what the active engine's output says of its load


DESIRED_REASONS = frozenset({Reason.INVALID_DESIRED_STATE, Reason.UNKNOWN_MODEL})


def _conditions(p: PassInput, previous: Status | None, now: str) -> list[Condition]:
    verdict = p.plan.verdict
    desired_bad = next((e for e in p.errors if e.reason in DESIRED_REASONS), None)
    catalog_bad = next((e.message for e in p.errors if e.reason is Reason.INVALID_CATALOG), None)
    port_blocked = verdict.phase is Phase.WAITING_PORT
    converged = not p.plan.actions and verdict.phase in (Phase.IDLE, Phase.READY)
    rows: list[tuple[ConditionType, bool, Reason | PhaseReason | ConditionReason, str]] = [
        (ConditionType.DESIRED_VALID, desired_bad is None,
         desired_bad.reason if desired_bad else ConditionReason.VALID,
         desired_bad.message if desired_bad else "desired_state.yaml parsed and names a catalog entry"),
        (ConditionType.CATALOG_VALID, catalog_bad is None,
         Reason.INVALID_CATALOG if catalog_bad else ConditionReason.VALID,
         catalog_bad or f"using {p.catalog.source}"),
        (ConditionType.PORT_AVAILABLE, not port_blocked, verdict.reason if port_blocked else ConditionReason.FREE,
         verdict.message if port_blocked else "no foreign process holds the engine port"),
        (ConditionType.READY, verdict.phase is Phase.READY, verdict.reason, verdict.message),
        (ConditionType.CONVERGED, converged,
         ConditionReason.CONVERGED if converged else ConditionReason.PROGRESSING,
         "observed matches desired" if converged else verdict.message),
    ]
    before = {c.type: c for c in previous.conditions} if previous else {}
    out = []
    for ctype, ok, reason, message in rows:
        status = "True" if ok else "False"
        old = before.get(ctype)
        since = old.last_transition_time if old and old.status == status else now
        out.append(Condition(ctype, status, reason, message, since))
    return out


def compose(p: PassInput, previous: Status | None, gpu: Gpu, stamp: Stamp) -> Status:
    plan, obs, catalog = p.plan, p.obs, p.catalog
    now = iso(stamp.now)
    verdict = plan.verdict
    active = plan.active
    engine_info = None
    boot = None
    if active is not None:
        engine = catalog.engines.get(active.model)
        if engine is not None:
            engine_info = EngineInfo(
                model=active.model,
                served_name=engine.served_name,
                instance=active.instance,
                pid=p.leader_pid or active.root_pid,
                pids=active.pids,
                port=engine.port,
                url=engine.base_url,
                started_at=iso_epoch(active.started_at),
                adopted=active.instance is None,
                memory_bytes=p.memory[0],
                memory_source=p.memory[1],
            )
            if verdict.phase is Phase.LOADING:
                boot = BootInfo(
                    started_at=iso_epoch(active.started_at),
                    elapsed_s=round(obs.now - active.started_at, 1),
                    budget_s=engine.boot_timeout_s,
                    deadline=iso_epoch(active.started_at + engine.boot_timeout_s),
                    attempt=plan.memory.restarts + 1,
                    progress=p.progress.to_dict() if p.progress is not None else None,
                )
    phase_since = previous.phase_since if previous and previous.phase == verdict.phase else now
    last_error = None
    failure = p.errors[0] if p.errors else (
        plan.memory.last_failure if verdict.phase is not Phase.READY else None)
    if failure is not None:
        same = previous is not None and previous.last_error is not None \
            and previous.last_error.message == failure.message
        at = previous.last_error.at if same and previous and previous.last_error else now
        last_error = ErrorInfo(failure.reason, failure.message, at)
    holders = [Holder(h.pid, h.name, h.cmdline[:300], ours=False, uid=h.uid) for h in plan.port_holders]
    strays = [StrayInfo(s.unit.model, s.unit.pids, sorted(s.unit.uids()),
                        min(s.unit.procs, key=lambda q: q.pid).cmdline[:300], s.why)
              for s in plan.spared]
    backoff = plan.memory.backoff_until
    status = Status(
        phase=verdict.phase,
        phase_since=phase_since,
        desired_model=p.desired_model,
        active_model=active.model if active is not None else None,
        message=verdict.message if not plan.notes else f"{verdict.message} | {plan.notes[-1]}",
        engine=engine_info,
        boot=boot,
        last_log_line=p.last_log_line,
        conditions=_conditions(p, previous, now),
        last_error=last_error,
        desired_generation=p.desired_generation,
        observed_generation=p.observed_generation,
        port_holders=holders,
        restarts=plan.memory.restarts,
        next_retry_at=iso_epoch(backoff) if backoff and backoff > obs.now else None,
        gpu={"observable": gpu.observable, "message": gpu.message,
             "processes": [{"pid": g.pid, "used_mib": g.used_mib} for g in gpu.processes]},
        identity=p.identity,
        strays=strays,
        recap=p.recap,
        reconciler={"pid": stamp.pid, "heartbeat": now, "version": __version__,
                    "resync_interval_s": catalog.resync_interval_s, "boot_id": stamp.boot_id,
                    **({"gate": stamp.gate.to_dict()} if stamp.gate is not None else {})},
        config=catalog.source,
    )
    return with_revision(status, previous)
