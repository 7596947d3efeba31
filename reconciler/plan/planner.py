"""The pure planner: (desired model, observation, memory) -> ordered actions and a verdict.

No I/O and no clock reads: the observation carries ``now``. This is where every decision
lives, so it is tested from tables of cases without a single process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from reconciler.domain.catalog import Engine
from reconciler.domain.facts import Failure, Observation, Proc, Reason, WarmupPhase
from reconciler.domain.status import Phase, PhaseReason, SpareReason
from reconciler.plan.ownership import Unit, View, classify

# A stray that comes back this many times within the window is being restarted by
# something else (systemd's Restart=always): we stop killing it and say so.
RESPAWN_LIMIT = 3
RESPAWN_WINDOW_S = 120.0
# How often to look again at a port held by a process we may not kill. Short, so the
# engine starts well within a second of the port being released.
PORT_POLL_S = 0.25
# READY this long without a failure resets the restart count (Kubernetes uses 10 minutes).
BACKOFF_RESET_AFTER_S = 600.0
# The fastest we re-probe a booting engine (see probe_interval).
MIN_PROBE_INTERVAL_S = 0.05
# For this long after its start an engine that does not listen yet is watched for its
# listen (a look at the kernel's listeners every loop.LISTEN_POLL_S): a fast engine is seen
# ready at once. A long boot is left to the probe interval.
LISTEN_WATCH_S = 10.0
# Nothing is wanted: only the catalog's resync interval matters; this caps it.
IDLE_RESYNC_S = 5.0
# READY: the loop health-checks the engine between passes (Plan.watch), so a full pass is
# needed only at the catalog's resync interval; this caps it the same way.
READY_RESYNC_S = 5.0


@dataclass(frozen=True)
class Kill:
    targets: tuple[Proc, ...]
    why: str
    units: tuple[tuple[str, str | None], ...] = ()  # (model, instance) keys, to re-scan for forks

    def describe(self) -> str:
        return f"kill (SIGKILL) pids {sorted(p.pid for p in self.targets)}: {self.why}"


@dataclass(frozen=True)
class AwaitPort:
    host: str
    port: int
    why: str

    def describe(self) -> str:
        return f"wait until {self.host}:{self.port} is free: {self.why}"


@dataclass(frozen=True)
class Start:
    model: str
    attempt: int
    why: str

    def describe(self) -> str:
        return f"start {self.model} (attempt {self.attempt}): {self.why}"


@dataclass(frozen=True)
class Warmup:
    model: str
    instance: str
    why: str

    def describe(self) -> str:
        return f"send warm-up request to {self.model}: {self.why}"


Action = Kill | AwaitPort | Start | Warmup


@dataclass(frozen=True)
class Memory:
    """What the loop carries between passes. Deliberately small: the rest is re-observed."""

    model: str | None = None  # the desired model this memory is about; a toggle starts afresh
    tracked: str | None = None  # instance id of that model's engine we consider current
    ready_since: float | None = None
    restarts: int = 0  # consecutive failures of the desired model
    backoff_until: float | None = None
    last_failure: Failure | None = None
    liveness_failures: int = 0
    warmup_failed_at: float | None = None
    stray_kills: tuple[tuple[str, float], ...] = ()  # (model, when) of killed strays
    # Models whose strays another supervisor restarts: not killed again until none is seen.
    respawning: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: Reason | PhaseReason  # a failure's own reason, else why the phase holds
    message: str


@dataclass(frozen=True)
class Spared:
    """A stray we recognise but may not kill, and why: reported, never signalled."""

    unit: Unit
    reason: SpareReason
    why: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    verdict: Verdict
    memory: Memory
    active: Unit | None = None
    port_holders: tuple[Proc, ...] = ()
    spared: tuple[Spared, ...] = ()
    requeue_after: float = 1.0
    notes: tuple[str, ...] = field(default=())
    then: Verdict | None = None  # the verdict once every action has succeeded
    # A READY instance the loop health-checks between passes (every liveness period), so a
    # hang is seen without a full pass each time.
    watch: str | None = None
    # A fresh engine's port nobody listens on yet: between passes the loop looks at the
    # kernel's listeners every few ms, so the probe runs the moment it listens.
    await_listen: int | None = None


def backoff_delay(engine: Engine, restarts: int) -> float:
    """Kubernetes' CrashLoopBackOff: initial, doubling, capped."""
    return float(min(engine.backoff_initial_s * 2 ** max(0, restarts - 1), engine.backoff_max_s))


def probe_interval(engine: Engine, elapsed: float) -> float:
    """Probe a fresh engine often (a fast one is READY in tens of ms), a slow boot at period_s."""
    return min(engine.ready.period_s, max(MIN_PROBE_INTERVAL_S, elapsed / 10))


def _keeper(view: View, engine: Engine, obs: Observation, memory: Memory) -> tuple[Unit | None, bool]:
    """The unit of the desired model we keep (and whether it is adopted rather than ours).

    Only a recorded instance of ours is kept, never the newest cookie: a cookie can be forged.
    """
    ours = [u for u in view.of_model(engine.name) if u.record is not None]
    if ours:
        tracked = [u for u in ours if u.instance == memory.tracked]
        return (tracked or sorted(ours, key=lambda u: u.started_at, reverse=True))[0], False
    for unit in view.strays():
        if (unit.model == engine.name and _listener_in(unit, engine, obs)
                and unit.uids() <= engine.strays.uids and obs.probe and obs.probe.ok):
            return unit, True  # a healthy engine someone else started: adopt, never restart
    return None, False


def _listener_in(unit: Unit, engine: Engine, obs: Observation) -> bool:
    return bool(obs.listening.get(engine.port, frozenset()) & set(unit.pids))


def _conflict(unit: Unit, engine: Engine | None, obs: Observation) -> str | None:
    """How a stray gets in the wanted engine's way; None: it does not, so it lives."""
    if engine is None:
        return None
    if unit.listens_on(engine.port):
        return f"holds port {engine.port}"
    on_gpu = {g.pid for g in obs.gpu.processes} if obs.gpu.observable else set()
    if on_gpu & set(unit.pids):
        return "holds GPU memory"
    return None


def _spare(unit: Unit, engine: Engine | None, obs: Observation) -> Spared | None:
    """The stray spared, and why; None when it is in the wanted engine's way and may be killed."""
    conflict = _conflict(unit, engine, obs)
    if engine is None or conflict is None:
        return Spared(unit, SpareReason.NO_CONFLICT, "does not hold the wanted engine's port or GPU memory")
    strangers = sorted(unit.uids() - engine.strays.uids)
    if strangers:
        return Spared(unit, SpareReason.OTHER_USER,
                      f"{conflict}, but runs as uid {strangers[0]}, not one of {engine.name}'s strays.users")
    return None


def _respawning(model: str, memory: Memory, now: float) -> bool:
    recent = [t for m, t in memory.stray_kills if m == model and now - t <= RESPAWN_WINDOW_S]
    return len(recent) >= RESPAWN_LIMIT


def _parent_desc(unit: Unit, obs: Observation) -> str:
    by_pid = {p.pid: p for p in obs.procs}
    roots = [p for p in unit.procs if p.ppid not in {q.pid for q in unit.procs}]
    parent = by_pid.get(roots[0].ppid) if roots else None
    if parent is None:
        return f"parent pid {roots[0].ppid if roots else '?'}"
    return f"parent pid {parent.pid} ({parent.cmdline or parent.name})"


def plan(
    desired: str | None,
    engines: Mapping[str, Engine],
    obs: Observation,
    memory: Memory,
    namespace: str,
    view: View | None = None,
) -> Plan:
    """``view`` is ``classify(obs, engines, namespace)`` when the caller has it already."""
    if memory.model != desired:
        memory = Memory(model=desired, stray_kills=memory.stray_kills, respawning=memory.respawning)
    view = view if view is not None else classify(obs, engines, namespace)
    engine = engines.get(desired) if desired else None
    keeper, adopted = _keeper(view, engine, obs, memory) if engine else (None, False)
    now = obs.now

    actions: list[Action] = []
    notes: list[str] = []
    killable: list[Unit] = []
    spared: list[Spared] = []
    stray_kills = tuple((m, t) for m, t in memory.stray_kills if now - t <= RESPAWN_WINDOW_S)
    respawning = {m for m in memory.respawning if any(u.model == m for u in view.strays())}
    respawners: list[Unit] = []
    for proc in view.forged:
        model = proc.cookie.model if proc.cookie else "?"
        spared.append(Spared(Unit(model, None, (proc,), proc.create_time), SpareReason.FORGED_COOKIE,
                             f"carries this install's cookie but runs as uid {proc.uid}: forged, never ours"))
    for unit in view.units:
        if unit is keeper:
            continue
        kept_alive = _spare(unit, engine, obs) if unit.instance is None else None
        if kept_alive is not None:
            spared.append(kept_alive)
            continue
        if unit.instance is None and (unit.model in respawning or _respawning(unit.model, memory, now)):
            respawning.add(unit.model)
            respawners.append(unit)
            notes.append(
                f"{unit.model} pids {unit.pids} keep coming back after SIGKILL "
                f"({_parent_desc(unit, obs)}): another supervisor restarts them "
                "(systemd Restart=always?). Stop and disable that service (for Ollama's package: "
                "systemctl disable --now ollama); not killing again until they are gone."
            )
            continue
        killable.append(unit)
        if unit.instance is None:
            stray_kills += ((unit.model, now),)
    if killable:
        targets = tuple(p for u in killable for p in u.procs)
        why = "; ".join(_why_surplus(u, desired) for u in killable)
        actions.append(Kill(targets, why, tuple((u.model, u.instance) for u in killable)))
    memory = replace(memory, stray_kills=stray_kills, respawning=frozenset(respawning))

    if engine is None:
        idle = Verdict(Phase.IDLE, PhaseReason.NO_MODEL_SELECTED, "no model selected; waiting for the toggle")
        verdict = Verdict(Phase.STOPPING, PhaseReason.STOPPING, "stopping surplus engines") if killable else idle
        if respawners:
            verdict = Verdict(Phase.FAILED, Reason.ENGINE_RESPAWNING, notes[-1])
        return Plan(tuple(actions), verdict, memory,
                    requeue_after=0.0 if actions else IDLE_RESYNC_S, notes=tuple(notes),
                    then=idle if verdict.phase is Phase.STOPPING else None, spared=tuple(spared))

    if keeper is not None:
        result = _plan_keeper(engine, keeper, adopted, obs, memory, actions, notes)
    else:
        result = _plan_start(engine, view, obs, memory, actions, notes, killable, respawners, spared)
    return replace(result, spared=tuple(spared))


def _why_surplus(unit: Unit, desired: str | None) -> str:
    what = f"{unit.model} instance {unit.instance}" if unit.instance else f"stray {unit.model}"
    if unit.model == desired:
        return f"{what} is a duplicate of the wanted engine"
    return f"{what} is not wanted (desired: {desired or 'none'})"


def _plan_keeper(
    engine: Engine,
    keeper: Unit,
    adopted: bool,
    obs: Observation,
    memory: Memory,
    actions: list[Action],
    notes: list[str],
) -> Plan:
    now = obs.now
    probe = obs.probe
    tracked = memory.tracked == keeper.instance and keeper.instance is not None
    if not tracked and not adopted:
        # A running instance of ours we did not start in this process (restart, --once):
        # continue its boot from its own start time rather than restarting it.
        memory = replace(memory, tracked=keeper.instance, ready_since=None, liveness_failures=0)
    # Ollama before 0.32.4 lists a model in /api/ps as soon as its runner starts: only the
    # warm-up's answer says the load finished (docs/ENGINES.md). An adopted engine someone
    # else started gets no warm-up from us: its listing is all there is.
    warm = obs.warmup.phase if obs.warmup is not None else None
    warm_done = engine.ready.warmup is None or warm is WarmupPhase.DONE or adopted
    json_ok = probe is not None and (probe.json_ok is None or probe.json_ok)
    ready = probe is not None and probe.ok and json_ok and warm_done
    def done(verdict: Verdict, mem: Memory, requeue: float) -> Plan:
        return Plan(tuple(actions), verdict, mem, active=keeper,
                    requeue_after=0.0 if actions else requeue, notes=tuple(notes))

    gone = _leader_gone(keeper, obs)
    squatters = _squatters(keeper, engine, obs)
    if squatters:
        who = ", ".join(f"pid {p.pid} (uid {p.uid}, {p.name})" for p in squatters)
        if gone is not None:
            return _fail(engine, keeper, obs, memory, actions, notes, Reason.PORT_SQUATTED,
                         f"main process {gone}; port {engine.port} is held by {who}")
        message = (f"port {engine.port} is listened on by {who}, not by {engine.name}'s "
                   "instance; nothing is proxied to it")
        squatted = done(Verdict(Phase.LOADING, Reason.PORT_SQUATTED, message), memory, PORT_POLL_S * 4)
        return replace(squatted, port_holders=squatters)
    if ready:
        since = memory.ready_since or now
        # Like Kubernetes, forgive past crashes only after a stretch of healthy running: an
        # engine that crashes a minute after every READY must still back off further.
        restarts = 0 if now - since >= BACKOFF_RESET_AFTER_S else memory.restarts
        memory = replace(memory, ready_since=since, liveness_failures=0,
                         restarts=restarts, backoff_until=None, warmup_failed_at=None)
        how = "adopted a running engine" if adopted else "engine answers its readiness probe"
        return replace(done(Verdict(Phase.READY, PhaseReason.READY, how), memory, READY_RESYNC_S),
                       watch=keeper.instance)

    detail = probe.detail if probe else "not probed"
    if gone is not None:
        # Orphaned workers (vLLM's EngineCore outlives a killed API server) are not an engine.
        return _fail(engine, keeper, obs, memory, actions, notes, Reason.ENGINE_EXITED,
                     f"main process {gone}; its workers are killed too")
    if memory.ready_since is not None:
        failures = memory.liveness_failures + 1
        if failures < engine.liveness_failures:
            # Out of READY at the first failure: new requests get 503 instead of stalling.
            memory = replace(memory, liveness_failures=failures)
            msg = (f"health check failed ({detail}), {failures}/{engine.liveness_failures}; "
                   "re-checking before restarting it")
            return done(Verdict(Phase.DEGRADED, PhaseReason.PROBE_FAILING, msg), memory, engine.ready.period_s)
        return _fail(engine, keeper, obs, memory, actions, notes, Reason.ENGINE_UNRESPONSIVE,
                     f"engine stopped answering after READY: {detail}")

    deadline = keeper.started_at + engine.boot_timeout_s
    if now >= deadline:
        return _fail(engine, keeper, obs, memory, actions, notes, Reason.BOOT_TIMEOUT,
                     f"not ready after {engine.boot_timeout_s:.0f} s boot budget ({detail})")
    if (
        probe is not None and probe.ok and engine.ready.warmup is not None
        and keeper.instance is not None and warm is not WarmupPhase.PENDING
        and (warm is None or (memory.warmup_failed_at or 0) + engine.backoff_initial_s <= now)
        and warm is not WarmupPhase.DONE
    ):
        actions.append(Warmup(engine.name, keeper.instance, "engine is up; ask it to load the model"))
    if warm is WarmupPhase.FAILED and memory.warmup_failed_at is None:
        memory = replace(memory, warmup_failed_at=now)
    message = f"loading: {detail}" if obs.warmup is None else f"loading: warm-up {obs.warmup}"
    loading = done(Verdict(Phase.LOADING, PhaseReason.LOADING, message), memory,
                   probe_interval(engine, now - keeper.started_at))
    if not obs.listening.get(engine.port) and now - keeper.started_at < LISTEN_WATCH_S:
        return replace(loading, await_listen=engine.port)
    return loading


def _leader_gone(keeper: Unit, obs: Observation) -> str | None:
    """How the instance's main process ended, if it did (reaped by us, or simply absent)."""
    if keeper.instance is not None and keeper.instance in obs.exits:
        return obs.exits[keeper.instance]
    record = keeper.record
    if record is None or record.leader_pid is None or keeper.root_pid == record.leader_pid:
        return None
    return f"pid {record.leader_pid} is gone"


def _squatters(keeper: Unit, engine: Engine, obs: Observation) -> tuple[Proc, ...]:
    """Processes outside the kept instance that listen on its port: never proxied to."""
    by_pid = {p.pid: p for p in obs.procs}
    outside = obs.listening.get(engine.port, frozenset()) - set(keeper.pids)
    return tuple(by_pid[pid] for pid in sorted(outside) if pid in by_pid)


def _fail(
    engine: Engine,
    keeper: Unit,
    obs: Observation,
    memory: Memory,
    actions: list[Action],
    notes: list[str],
    reason: Reason,
    message: str,
) -> Plan:
    restarts = memory.restarts + 1
    delay = backoff_delay(engine, restarts)
    failure = Failure(reason, message)
    actions.append(Kill(keeper.procs, str(failure), ((keeper.model, keeper.instance),)))
    memory = replace(memory, tracked=None, ready_since=None, liveness_failures=0,
                     restarts=restarts, backoff_until=obs.now + delay, last_failure=failure)
    verdict = Verdict(Phase.FAILED, reason, f"{message}; restart {restarts} in {delay:.0f} s")
    return Plan(tuple(actions), verdict, memory, requeue_after=0.0, notes=tuple(notes))


def _plan_start(
    engine: Engine,
    view: View,
    obs: Observation,
    memory: Memory,
    actions: list[Action],
    notes: list[str],
    killable: list[Unit],
    respawners: list[Unit],
    spared: list[Spared],
) -> Plan:
    now = obs.now
    if memory.tracked is not None:
        # The instance we were running is gone without us killing it: it crashed.
        how = obs.exits.get(memory.tracked, "exited")
        phase_was = "while ready" if memory.ready_since else "while loading"
        restarts = memory.restarts + 1
        memory = replace(memory, tracked=None, ready_since=None, liveness_failures=0,
                         restarts=restarts,
                         backoff_until=now + backoff_delay(engine, restarts),
                         last_failure=Failure(Reason.ENGINE_EXITED, f"{engine.name} {how} {phase_was}"))
    def plan_of(verdict: Verdict, requeue: float, holders: tuple[Proc, ...] = (),
                then: Verdict | None = None) -> Plan:
        return Plan(tuple(actions), verdict, memory, port_holders=holders,
                    requeue_after=0.0 if actions else requeue, notes=tuple(notes), then=then)

    if memory.backoff_until is not None and now < memory.backoff_until:
        wait = memory.backoff_until - now
        message = f"{memory.last_failure}; restart {memory.restarts} in {wait:.0f} s"
        return plan_of(Verdict(Phase.FAILED, PhaseReason.CRASH_LOOP_BACK_OFF, message), wait)

    blockers = [u for u in respawners if u.listens_on(engine.port)]
    if blockers:
        return plan_of(Verdict(Phase.FAILED, Reason.ENGINE_RESPAWNING, notes[-1]), PORT_POLL_S * 4,
                       blockers[0].procs)
    foreign = view.foreign_listeners.get(engine.port, ()) + tuple(
        p for s in spared if s.unit.listens_on(engine.port) for p in s.unit.procs
        if engine.port in p.listens)
    if foreign:
        who = ", ".join(f"pid {p.pid} (uid {p.uid}, {p.name})" for p in foreign)
        message = f"port {engine.port} is held by {who}, not an engine we may stop; waiting for it"
        return plan_of(Verdict(Phase.WAITING_PORT, PhaseReason.PORT_HELD_BY_FOREIGN_PROCESS, message),
                       PORT_POLL_S, foreign)
    port_free = obs.port_free.get(engine.port, True)
    if not port_free and not killable:
        message = f"port {engine.port} is busy and its holder is not visible to us; waiting"
        return plan_of(Verdict(Phase.WAITING_PORT, Reason.PORT_BUSY, message), PORT_POLL_S)
    if killable or not port_free:
        actions.append(AwaitPort(engine.host, engine.port, "the old engine must release it first"))
    attempt = memory.restarts + 1
    why = "desired model is not running" if memory.restarts == 0 else f"retry after {memory.last_failure}"
    actions.append(Start(engine.name, attempt, why))
    loading = Verdict(Phase.LOADING, PhaseReason.STARTING, f"starting {engine.name} on port {engine.port}")
    if killable:
        stopping = Verdict(Phase.STOPPING, PhaseReason.SWITCHING,
                           f"stopping the old engine, then starting {engine.name}")
        return plan_of(stopping, MIN_PROBE_INTERVAL_S, then=loading)
    return plan_of(loading, MIN_PROBE_INTERVAL_S)
