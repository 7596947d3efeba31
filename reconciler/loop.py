"""The control loop: re-read, re-observe, plan, apply, report; file events only wake it.

Level-triggered like a Kubernetes controller: every pass starts from the files and the
process table, never from remembered events, so a missed watchdog event costs at most one
resync interval.

A pass (``Reconciler.step``) reads observe → plan → act → publish, each in its own room:
``plan.wish`` (which desired state to act on), ``scanner`` (the machine), ``plan.planner``
(what to do), ``act.executor`` (doing it) and ``publisher`` (the observed state).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.act import cgroups
from reconciler.act.executor import Executor, Outcome
from reconciler.act.records import Records
from reconciler.act.spawn import raw_log_path
from reconciler.domain.catalog import Catalog, CatalogSource, Engine
from reconciler.domain.facts import Failure, Observation, Reason
from reconciler.domain.status import Phase, Status
from reconciler.kit import clock
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.lock import AlreadyRunning, StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.observe import follow, gather, ports, probe
from reconciler.observe.follow import Follower
from reconciler.observe.progress import BootProgress
from reconciler.plan.ownership import Unit
from reconciler.plan.planner import Memory, Plan, backoff_delay, plan
from reconciler.plan.report import PassInput
from reconciler.plan.wish import Taken, Wishes
from reconciler.publisher import Publisher
from reconciler.scanner import Scanner, memory_of
from reconciler.store import desired_file

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
        self.publisher = Publisher(catalog.observed_path, log)
        last = self.publisher.previous
        self.wishes = Wishes(catalog.desired_path, last.desired_generation if last else 0,
                             current_boot_id(), gather.boot_time())
        records = Records(self.state_dir)  # one set, written by the executor, read by the scanner
        self.scanner = Scanner(self.source, self.namespace, self.mode, records)
        self.executor = Executor(self.state_dir, self.namespace, log, self.mode, records, self.scanner,
                                 self.publisher.kill_progress, withheld=(catalog.gate.token_env,))
        self.memory = Memory()
        self.wake = threading.Event()
        self._watch: tuple[Engine, str] | None = None  # the READY engine health-checked between passes
        self._await_listen: int | None = None  # see Plan.await_listen
        self._woken_at = -WAKE_SPACING_S  # when the last pass that a wake started began
        # The state dir's lock, held by the CLI; re-taken each pass if the dir was removed.
        self.lock: StateLock | None = None

    @property
    def catalog(self) -> Catalog:
        return self.source.catalog

    # --- one pass -----------------------------------------------------------------------
    def step(self, check: bool = False) -> PassResult:
        """One pass: observe, plan, act, publish. With ``check`` it only plans: nothing is
        changed and nothing is written."""
        # Observe: the catalog, the desired file (through its rules over time), the machine.
        errors: list[Failure] = []
        self.source.refresh()
        if self.source.error:
            errors.append(Failure(Reason.INVALID_CATALOG, self.source.error))
        taken = self.wishes.take(desired_file.look(self.catalog), clock.monotonic(), self.publisher.previous,
                                 self.catalog.resume_after_reboot)
        if taken.note:
            self.log.event(taken.note)
        errors.extend(taken.failures)
        wanted = taken.desired.model
        obs, view = self.scanner.look(wanted, self.memory.ready_since is not None, self.executor.warmups,
                                      self.executor.reaped)
        # Plan: pure, from the observation alone.
        the_plan = plan(wanted, self.catalog.engines, obs, self.memory, self.namespace, view)
        if check:
            return PassResult(the_plan, None, None, taken.recheck_in)
        errors.extend(Failure(Reason.ENGINE_RESPAWNING, note) for note in the_plan.notes)
        self.memory = the_plan.memory
        self.executor.prune(obs.records, {u.instance for u in view.units if u.instance is not None})
        if not the_plan.actions:
            return PassResult(the_plan, self._publish(taken, obs, errors, the_plan, view.units, Outcome()),
                              None, taken.recheck_in)
        # Act, once the state says what is about to happen: the gate stops proxying at once.
        self._publish(taken, obs, errors, the_plan, view.units, Outcome())
        outcome = self.executor.run(the_plan.actions, self.catalog.engines)
        self.memory = self._remember(the_plan, outcome, wanted, obs.now)
        errors.extend(outcome.errors)
        units, started = self.scanner.units_after(the_plan.actions, outcome, view.units, self.executor.reaped)
        after = the_plan if outcome.stopped_early or the_plan.then is None else replace(the_plan, verdict=the_plan.then)
        if started is not None:
            after = replace(after, active=started)
        # Publish what the actions left (the plan's next verdict, where all went as planned).
        return PassResult(after, self._publish(taken, obs, errors, after, units, outcome), outcome, taken.recheck_in)

    def _publish(self, taken: Taken, obs: Observation, errors: list[Failure], current: Plan,
                 units: Iterable[Unit], outcome: Outcome) -> Status:
        """The state as of now in the pass, with the engines' output read up to now."""
        active = current.active.model if current.active else None
        last_line, leader, booting = self._follow(units, active)
        recap = {"ok": int(not current.actions), "changed": outcome.changed,
                 "failed": outcome.failed + int(current.verdict.phase is Phase.FAILED)}
        identity = {"mode": self.mode.name, "reason": self.mode.reason, "port_holders": ports.observer()}
        return self.publisher.publish(
            PassInput(self.catalog, taken.desired.model, taken.generation, taken.generation, current, obs,
                      tuple(errors), last_line, recap, leader, identity, memory_of(current.active), booting),
            self.scanner.gpu_sample())

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
        self.follower.limits, self.log.max_bytes = self.catalog.log_limits, self.catalog.log_limits.file_max_bytes
        for path, (model, pid) in live.items():
            engine = engines.get(model)
            self.follower.track(path, model, pid, engine.kind if engine else "generic",
                                engine.probe_paths if engine else frozenset())
        # A file whose instance still has a record is never drained and deleted: the scan
        # right after a start can miss the new instance, and its output was then lost.
        recorded = {raw_log_path(self.state_dir, r.model, r.instance) for r in self.executor.records.load()}
        self.follower.retain(set(live) | recorded)
        self.follower.poll(wait=False, budget=follow.READ_CHUNK)
        for path, (model, pid) in live.items():
            if model == active:
                last, leader = self.follower.last_line(path), pid
                booting = self.follower.progress(path)
        return last, leader, booting

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

    # --- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        from reconciler.observe.watch import watch

        follower = threading.Thread(target=self.follower.run, args=(stop,), name="log-follower",
                                    daemon=True)
        follower.start()
        files = [self.catalog.desired_path]
        if self.source.path is not None:
            files.append(self.source.path.resolve())
        watcher = watch(files, self.wake)
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
                    delay = self.publisher.pass_failed(exc, failed_passes, self.catalog.resync_interval_s)
                if delay > 0 and self._idle(delay):
                    self._coalesce(stop)
                if stop.is_set():
                    break
        finally:
            watcher.stop()
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
                self.scanner.failed_check(instance, check)
                return False
        return False

    def _coalesce(self, stop: threading.Event) -> None:
        """Space passes that file events start by WAKE_SPACING_S."""
        wait = self._woken_at + WAKE_SPACING_S - clock.monotonic()
        if wait > 0:
            clock.sleep(wait, stop)
        self._woken_at = clock.monotonic()

    def mark_stopped(self, engines_stopped: bool) -> None:
        self.publisher.mark_stopped(engines_stopped)

    def stop_engines(self) -> None:
        """--stop-on-exit: converge to nothing before leaving. Quietly: no pass is running whose
        state a long kill could keep flowing (the CLI marks the state stopped next)."""
        obs = self.scanner.snapshot(self.executor.reaped)
        idle = plan(None, self.catalog.engines, obs, Memory(), self.namespace)
        self.executor.run(idle.actions, self.catalog.engines, quiet=True)
        self.follower.poll()
