"""The control loop: re-read, re-observe, plan, apply, report; file events only wake it.

Level-triggered like a Kubernetes controller: every pass starts from the files and the
process table, never from remembered events, so a missed watchdog event costs at most one
resync interval.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.act import cgroups, killer
from reconciler.act.executor import Executor, Outcome
from reconciler.act.spawn import Spawned, raw_log_path
from reconciler.domain import status
from reconciler.domain.catalog import Catalog, CatalogSource, Engine
from reconciler.domain.facts import Failure, Gpu, Observation, Probe, Proc, Reason
from reconciler.domain.status import Phase, Status
from reconciler.kit import clock
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.lock import AlreadyRunning, StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.observe import gather, gpu, ports, probe
from reconciler.observe.follow import Follower
from reconciler.observe.progress import BootProgress
from reconciler.plan.ownership import Unit, View, classify
from reconciler.plan.planner import Kill, Memory, Plan, backoff_delay, plan
from reconciler.plan.report import PassInput, compose
from reconciler.plan.wish import Wishes
from reconciler.store import desired_file, state_file

# GPU memory is informational; sampling NVML on every 1 s boot pass is not needed.
GPU_EVERY_S = 10.0
# A pass that raises is retried after resync_interval_s, doubling up to this.
PASS_FAILURE_BACKOFF_MAX_S = 60.0
MAX_PASS_ERROR_CHARS = 300
MAX_PIDS_SHOWN = 10
# Passes started by file events come at most this often: a busy writer costs four passes a
# second, not one per write. Passes the loop schedules itself never wait for it.
WAKE_SPACING_S = 0.25
# Between two looks at the kernel's listeners for a fresh engine's port (planner.LISTEN_WATCH_S).
LISTEN_POLL_S = 0.005


def namespace_of(state_dir: Path) -> str:
    """Cookie namespace: two installs with different state dirs never touch each other's engines."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PassResult:
    plan: Plan
    status: Status | None
    outcome: Outcome | None
    recheck_in: float | None = None  # the desired file's rules want another pass this soon


class Reconciler:
    def __init__(self, catalog: Catalog, log: ActivityLog) -> None:
        self.source = CatalogSource(catalog, catalog.path)
        self.state_dir = catalog.state_dir
        self.namespace = namespace_of(self.state_dir)
        self.log = log
        self.follower = Follower(log, self.state_dir)
        self.mode = cgroups.detect(self.namespace, catalog.identity)
        self.executor = Executor(self.state_dir, self.namespace, log, self.mode,
                                 withheld=(catalog.gate.token_env,))
        self.memory = Memory()
        self.previous: Status | None = self._load_previous()
        self.wishes = Wishes(catalog.desired_path, self.previous.desired_generation if self.previous else 0,
                             current_boot_id(), gather.boot_time())
        self._gpu: Gpu = Gpu(False, "not sampled yet")
        self._gpu_at = -GPU_EVERY_S
        self.wake = threading.Event()
        # The READY engine health-checked between passes, and a failed check for the next pass.
        self._watch: tuple[Engine, str] | None = None
        self._failed_check: tuple[str, Probe] | None = None
        self._await_listen: int | None = None  # see Plan.await_listen
        self._woken_at = -WAKE_SPACING_S  # when the last pass that a wake started began
        # The state dir's lock, held by the CLI; re-taken each pass if the dir was removed.
        self.lock: StateLock | None = None

    @property
    def catalog(self) -> Catalog:
        return self.source.catalog

    def _load_previous(self) -> Status | None:
        try:
            return status.from_dict(state_file.read_raw(self.catalog.observed_path))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- one pass -----------------------------------------------------------------------
    def _snapshot(self) -> Observation:
        """The process table with our instance records and their cgroups' members."""
        records = self.executor.records.load()
        procs = gather.processes()  # before the members: a fork in between is then in the cgroup
        members = {r.instance: cgroups.procs(Path(r.cgroup)) for r in records if r.cgroup}
        return Observation(now=clock.now().timestamp(), procs=procs,
                           self_pids=gather.self_and_ancestors(), self_uid=os.geteuid(),
                           records=records, members=members, exits=dict(self.executor.exits),
                           gpu=self._gpu_sample(), identity=self.mode.name)

    def _observe(self, wanted: str | None) -> tuple[Observation, View]:
        """The pass's observation and its one classification (the planner is handed it:
        classifying 2,000 processes costs ~20 ms, and it was done four times a pass)."""
        engines = self.catalog.engines
        # Before the process table: a warm-up that answered "done" had its processes (Ollama's
        # runner) started before it, so the table read next has them too.
        warmups = self.executor.warmups.states()
        obs = self._snapshot()
        engine = engines.get(wanted) if wanted else None
        if engine is None:
            return obs, classify(obs, engines, self.namespace)
        # Where the engine's socket most likely is: our instances' members and leaders.
        likely = [pid for pids in obs.members.values() for pid in pids]
        likely += [r.leader_pid for r in obs.records if r.leader_pid is not None]
        # One read of the socket table per pass; listeners only once READY (ours listens).
        full = self.memory.ready_since is None
        sockets = ports.table(bound=full)
        holders = gather.port_holders(engine.port, likely, sockets)
        port_free = not holders and ports.is_free(engine.host, engine.port, sockets if full else None)
        listening = frozenset(pid for pid, listens in holders.items() if listens)
        obs = replace(obs, procs=gather.with_holders(obs.procs, engine.port, holders),
                      listening={engine.port: listening})
        view = classify(obs, engines, self.namespace)
        mine = [u for u in view.of_model(engine.name) if u.record is not None or u.instance is None]
        # Probe only a listener that belongs to this engine: a squatter never gets our probe
        # (nor, so, READY), and a foreign holder that accepts and never answers would hold
        # every pass for a whole probe timeout.
        ours_listen = any(listening & set(u.pids) for u in mine)
        instance = next((u.instance for u in mine if u.instance), None)
        failed, self._failed_check = self._failed_check, None
        if failed is not None and failed[0] == instance:
            result = failed[1]  # the check between passes that woke this pass: seconds old at most
        elif ours_listen:
            ready = self.memory.ready_since is not None
            result = probe.check(engine, engine.liveness_timeout_s if ready else None)
        else:
            result = Probe(False, _not_listening(mine, engine.port))
        return replace(obs, port_free={engine.port: port_free}, probe=result,
                       warmup=warmups.get(instance) if instance else None), view

    def _rescan(self, keys: tuple[tuple[str, str | None], ...]) -> Iterable[Proc]:
        view = classify(self._snapshot(), self.catalog.engines, self.namespace)
        return [p for u in view.units if (u.model, u.instance) in keys for p in u.procs]

    def _identity(self) -> dict[str, str]:
        return {"mode": self.mode.name, "reason": self.mode.reason, "port_holders": ports.observer()}

    def _gpu_sample(self) -> Gpu:
        now = clock.monotonic()
        if now - self._gpu_at >= GPU_EVERY_S:
            self._gpu, self._gpu_at = gpu.observe(), now
        return self._gpu

    def _follow(self, units: Iterable[Unit],
                active: str | None) -> tuple[str | None, int | None, BootProgress | None]:
        """Track raw output of our live instances; return the active one's last line, pid and
        boot progress."""
        last, leader, booting = None, None, None
        live: dict[Path, tuple[str, int]] = {}
        for unit in units:
            if unit.instance is None or unit.record is None or not unit.procs:
                continue
            pid = unit.root_pid or min(unit.pids)
            live[raw_log_path(self.state_dir, unit.model, unit.instance)] = (unit.model, pid)
        engines = self.catalog.engines
        self.log.level = self.catalog.log_level
        self.follower.keep_probe_lines = self.catalog.log_probe_lines or self.log.debug
        for path, (model, pid) in live.items():
            engine = engines.get(model)
            self.follower.track(path, model, pid, engine.kind if engine else "generic",
                                engine.probe_paths if engine else frozenset())
        # A file whose instance still has a record is never drained and deleted: the scan
        # right after a start can miss the new instance, and its output was then lost.
        recorded = {raw_log_path(self.state_dir, r.model, r.instance) for r in self.executor.records.load()}
        self.follower.retain(set(live) | recorded)
        self.follower.poll(wait=False)
        for path, (model, pid) in live.items():
            if model == active:
                last, leader = self.follower.last_line(path), pid
                booting = self.follower.progress(path)
        return last, leader, booting

    def step(self, check: bool = False) -> PassResult:
        """One pass. With ``check`` nothing is changed and nothing is written."""
        errors: list[Failure] = []
        self.source.refresh()
        if self.source.error:
            errors.append(Failure(Reason.INVALID_CATALOG, self.source.error))
        taken = self.wishes.take(desired_file.look(self.catalog), clock.monotonic(), self.previous,
                                 self.catalog.resume_after_reboot)
        if taken.note:
            self.log.event(taken.note)
        errors.extend(taken.failures)
        wish = taken.desired
        self.executor.reap()
        obs, view = self._observe(wish.model)
        the_plan = plan(wish.model, self.catalog.engines, obs, self.memory, self.namespace, view)
        if check:
            return PassResult(the_plan, None, None, taken.recheck_in)
        errors.extend(Failure(Reason.ENGINE_RESPAWNING, note) for note in the_plan.notes)
        number = taken.generation
        outcome = Outcome()

        def report(current: Plan, units: Iterable[Unit]) -> Status:
            active = current.active.model if current.active else None
            last_line, leader, booting = self._follow(units, active)
            recap = {"ok": int(not current.actions), "changed": outcome.changed,
                     "failed": outcome.failed + int(current.verdict.phase is Phase.FAILED)}
            new = compose(PassInput(self.catalog, wish.model, number, number, current, obs,
                                    tuple(errors), last_line, recap, leader, self._identity(),
                                    _memory(current.active), booting),
                          self.previous, self._gpu_sample())
            self._publish(new)
            return new

        self.memory = the_plan.memory
        units_before = view.units
        self.executor.prune(obs.records, {u.instance for u in units_before if u.instance is not None})
        if not the_plan.actions:
            return PassResult(the_plan, report(the_plan, units_before), None, taken.recheck_in)
        # Say what is about to happen before doing it: the gate stops proxying at once.
        report(the_plan, units_before)
        outcome = self.executor.run(the_plan.actions, self.catalog.engines, self._rescan,
                                    self._kill_progress)
        self.memory = self._remember(the_plan, outcome, wish.model, obs.now)
        errors.extend(outcome.errors)
        after = the_plan
        if not outcome.stopped_early and the_plan.then is not None:
            after = replace(the_plan, verdict=the_plan.then)
        if outcome.stopped_early:  # something did not go as planned: look again
            units = classify(self._snapshot(), self.catalog.engines, self.namespace).units
        else:  # every kill was verified: what is left is known without a scan
            killed = {key for a in the_plan.actions if isinstance(a, Kill) for key in a.units}
            units = tuple(u for u in units_before if (u.model, u.instance) not in killed)
        if outcome.started is not None:
            started = next((u for u in units if u.instance == outcome.started.cookie.instance), None)
            if started is None:
                started = self._started_unit(outcome.started)
                units = (*units, started)
            after = replace(after, active=started)
        return PassResult(after, report(after, units), outcome, taken.recheck_in)

    def _started_unit(self, spawned: Spawned) -> Unit:
        """The engine just spawned, without a scan of the table: its leader and its record
        (so the state names its pid at once, and its output is followed from the start)."""
        cookie = spawned.cookie
        leader = gather.process(spawned.process.pid)
        return Unit(cookie.model, cookie.instance, (leader,) if leader is not None else (), cookie.started_at,
                    self.executor.records.written(cookie.instance))

    def _remember(self, the_plan: Plan, outcome: Outcome, model: str | None, now: float) -> Memory:
        memory = the_plan.memory
        if outcome.started is not None:
            return replace(memory, tracked=outcome.started.cookie.instance, ready_since=None,
                           liveness_failures=0, warmup_failed_at=None)
        spawn_failed = [e for e in outcome.errors if e.reason is Reason.SPAWN_FAILED]
        if spawn_failed and model is not None:
            engine = self.catalog.engines[model]
            restarts = memory.restarts + 1
            return replace(memory, restarts=restarts, last_failure=spawn_failed[-1],
                           backoff_until=now + backoff_delay(engine, restarts))
        if the_plan.verdict.phase is Phase.FAILED and memory.backoff_until is not None and outcome.changed:
            # The planner counts the backoff from the start of the pass; this pass then spent
            # a probe timeout on the hung engine and the kill's verification. Count it from
            # when the failed engine was gone, as CrashLoopBackOff does.
            spent = clock.now().timestamp() - now
            return replace(memory, backoff_until=memory.backoff_until + max(0.0, spent))
        return memory

    def _kill_progress(self, alive: tuple[int, ...], waited_s: float) -> None:
        """A kill that waits long (a driver freeing tens of GB of VRAM) keeps the state
        flowing: what is still alive and for how long, with a fresh heartbeat."""
        old = self.previous
        if old is None:
            return
        shown = ", ".join(map(str, alive[:MAX_PIDS_SHOWN])) + (" …" if len(alive) > MAX_PIDS_SHOWN else "")
        message = (f"stopping: {len(alive)} process(es) still alive {waited_s:.0f} s after SIGKILL "
                   f"(pids {shown}); waiting up to {killer.KILL_VERIFY_S:g} s for the kernel to free them")
        if waited_s < 2 * killer.PROGRESS_EVERY_S:
            self.log.event(message)
        beat = {**old.reconciler, "heartbeat": clock.iso()}
        new = status.with_revision(replace(old, message=message, reconciler=beat), old)
        with contextlib.suppress(OSError):
            state_file.write(self.catalog.observed_path, new)
        self.previous = new

    def _publish(self, new: Status) -> None:
        old = self.previous
        if old is None or old.phase != new.phase or old.message != new.message:
            self.log.event(f"phase {new.phase.value}: {new.message}")
        if new.last_error and (old is None or old.last_error != new.last_error):
            self.log.event(f"error {new.last_error.reason}: {new.last_error.message}", "error")
        self.log.event(f"pass: phase {new.phase.value}, revision {new.revision}, recap {new.recap}",
                       "debug")
        try:
            state_file.write(self.catalog.observed_path, new)
        except OSError as exc:
            self.log.event(f"cannot write {self.catalog.observed_path}: {exc}; will retry", "error")
        self.previous = new

    # --- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        from reconciler.observe.watch import watch

        follower = threading.Thread(target=self.follower.run, args=(stop,), name="log-follower",
                                    daemon=True)
        follower.start()
        files = [self.catalog.desired_path]
        if self.source.path is not None:
            files.append(self.source.path.resolve())
        observer = watch(files, self.wake)
        self.log.event(f"reconciler started (pid {os.getpid()}, {self.catalog.source}, "
                       f"desired state {self.catalog.desired_path}, state dir {self.state_dir})")
        self.log.event(f"engine identity: {self.mode.name} mode: {self.mode.reason}; "
                       f"port holders seen by {ports.observer()}")
        failed_passes = 0
        try:
            while not stop.is_set():
                self.wake.clear()
                if self.lock is not None:
                    try:
                        if self.lock.reassert():
                            self.log.event(f"{self.lock.path} was removed; lock taken again")
                    except AlreadyRunning as exc:
                        self.log.event(f"lost the state dir lock ({exc}); this loop stops", "error")
                        break
                try:
                    self._watch, self._await_listen = None, None
                    result = self.step()
                    delay = min(result.plan.requeue_after, self.catalog.resync_interval_s,
                                result.recheck_in if result.recheck_in is not None else float("inf"))
                    self._watch = self._watched(result.plan)
                    self._await_listen = result.plan.await_listen
                    failed_passes = 0
                except Exception as exc:  # the loop must outlive any single bad pass
                    failed_passes += 1
                    delay = self._pass_failed(exc, failed_passes)
                if delay > 0 and self._idle(delay):
                    self._coalesce(stop)
                if stop.is_set():
                    break
        finally:
            observer.stop()
            follower.join(timeout=clock.real_seconds(2.0))

    def _watched(self, the_plan: Plan) -> tuple[Engine, str] | None:
        active = the_plan.active
        engine = self.catalog.engines.get(active.model) if active is not None else None
        return (engine, the_plan.watch) if engine is not None and the_plan.watch else None

    def _listened(self, port: int, delay: float) -> bool:
        """Look at the kernel's listeners every LISTEN_POLL_S until one is on ``port`` (True)
        or ``delay`` ends. Never a connect: whoever listens may be a squatter, and only the
        pass, having checked who it is, may talk to it."""
        end = clock.monotonic() + delay
        while clock.monotonic() < end:
            sockets = ports.table(bound=False)  # listeners only: ~0.04 ms
            if sockets is None:
                return clock.sleep(max(0.0, end - clock.monotonic()), self.wake)
            if any(s.port == port and s.listening for s in sockets):
                return True
            if clock.sleep(min(LISTEN_POLL_S, max(0.0, end - clock.monotonic())), self.wake):
                return True
        return False

    def _idle(self, delay: float) -> bool:
        """Wait for the next pass (True: a wake cut it short); meanwhile health-check a READY
        engine every liveness period.

        A check costs one HTTP request, a full pass a scan of the process table: between
        passes only the check runs, and its first failure starts the next pass at once (the
        phase leaves READY there). Any wake (a file event, a stop) also ends the wait.
        """
        if self._await_listen is not None:
            self._listened(self._await_listen, delay)
            return self.wake.is_set()
        if self._watch is None:
            return clock.sleep(delay, self.wake)
        engine, instance = self._watch
        end = clock.monotonic() + delay
        while (left := end - clock.monotonic()) > 0:
            if clock.sleep(min(engine.liveness_period_s, left), self.wake):
                return True
            if clock.monotonic() >= end:
                return False  # the pass itself checks the engine
            check = probe.check(engine, engine.liveness_timeout_s)
            if not check.ok or check.json_ok is False:
                self._failed_check = (instance, check)
                return False
        return False

    def _coalesce(self, stop: threading.Event) -> None:
        """Space passes that file events start by WAKE_SPACING_S."""
        wait = self._woken_at + WAKE_SPACING_S - clock.monotonic()
        if wait > 0:
            clock.sleep(wait, stop)
        self._woken_at = clock.monotonic()

    def _pass_failed(self, exc: Exception, count: int) -> float:
        """Say it (state, log) and back off: a pass that fails the same way every time must
        neither spin nor look like a dead reconciler to the gate."""
        what = f"{type(exc).__name__}: {str(exc)[:MAX_PASS_ERROR_CHARS]}"
        delay = min(self.catalog.resync_interval_s * 2.0 ** (count - 1), PASS_FAILURE_BACKOFF_MAX_S)
        if count == 1 or self.previous is None or self.previous.last_error is None \
                or what not in self.previous.last_error.message:
            self.log.event(f"pass failed: {what}; retrying with backoff up to {PASS_FAILURE_BACKOFF_MAX_S:g} s",
                           "error")
        if self.previous is not None:
            message = f"a reconciler pass failed {count} time(s) in a row (next try in {delay:.0f} s): {what}"
            error = status.ErrorInfo(Reason.PASS_FAILED.value, message, clock.iso())
            beat = {**self.previous.reconciler, "heartbeat": clock.iso()}
            new = status.with_revision(replace(self.previous, last_error=error, reconciler=beat),
                                       self.previous)
            with contextlib.suppress(OSError):
                state_file.write(self.catalog.observed_path, new)
            self.previous = new
        return delay

    def mark_stopped(self, engines_stopped: bool) -> None:
        """A clean stop leaves a state that says so: the gate and ``ailayer status`` need not
        wait for the heartbeat to age (they showed READY 32 s after Ctrl-C)."""
        if self.previous is None:
            return
        new = status.stopped(self.previous, clock.iso(), engines_stopped)
        with contextlib.suppress(OSError):
            state_file.write(self.catalog.observed_path, new)
        self.previous = new

    def stop_engines(self) -> None:
        """--stop-on-exit: converge to nothing before leaving."""
        obs = self._snapshot()
        idle = plan(None, self.catalog.engines, obs, Memory(), self.namespace)
        self.executor.run(idle.actions, self.catalog.engines, self._rescan)
        self.follower.poll()


def _not_listening(units: list[Unit], port: int) -> str:
    bound = any(port in p.listens for u in units for p in u.procs)
    return f"port {port} bound, not listening yet" if bound else "not listening yet"


def _memory(unit: Unit | None) -> tuple[int | None, str | None]:
    """The engine's memory: its cgroup's memory.current where kept, else its members' RSS."""
    if unit is None or not unit.procs:
        return None, None
    if unit.record is not None and unit.record.cgroup is not None:
        current = cgroups.memory_bytes(Path(unit.record.cgroup))
        if current is not None:
            return current, "cgroup"
    return gather.rss(unit.pids), "rss"
