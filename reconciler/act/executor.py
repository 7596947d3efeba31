"""Carry out a plan's actions on the machine, in order, stopping at the first that cannot finish."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import psutil

from reconciler.act import cgroups, killer
from reconciler.act.cgroups import Mode
from reconciler.act.records import Records
from reconciler.act.spawn import Spawned, new_cookie, spawn
from reconciler.act.warmup import Warmups
from reconciler.domain.catalog import Engine
from reconciler.domain.facts import Failure, Proc, Reason, Record
from reconciler.kit import clock
from reconciler.kit.logs import ActivityLog
from reconciler.observe import ports
from reconciler.plan.planner import Action, AwaitPort, Kill, Start, Warmup

# After SIGKILL the kernel releases a listening socket at once, but a foreign process can
# be slower; wait this long inside one pass before handing back to the loop (which keeps
# waiting with backoff, as long as the model is wanted).
PORT_RELEASE_WAIT_S = 5.0
PORT_POLL_S = 0.05


@dataclass
class Outcome:
    changed: int = 0
    failed: int = 0
    errors: list[Failure] = field(default_factory=list)
    started: Spawned | None = None
    stopped_early: bool = False


class Rescan(Protocol):
    """A fresh look at the process table (the loop's scanner): a kill that is not confined
    to cgroups re-checks its units for forks made after the plan's scan."""

    def procs_of(self, units: tuple[tuple[str, str | None], ...]) -> Iterable[Proc]: ...


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Executor:
    """Owns the side effects: child processes, warm-up threads, kills, port waits.

    Given at construction what its actions need from outside: the instance records (shared
    with the scanner), a ``rescan`` for kills, and where a long kill's ``progress`` goes
    (the publisher: the state keeps flowing while the kernel frees VRAM)."""

    def __init__(self, state_dir: Path, namespace: str, log: ActivityLog, mode: Mode, records: Records,
                 rescan: Rescan, progress: killer.Progress | None = None, withheld: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.withheld = withheld
        self.namespace = namespace
        self.log = log
        self.mode = mode
        self.records = records
        self.rescan = rescan
        self.progress = progress
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, str] = {}
        self.warmups = Warmups(log)

    def reaped(self) -> dict[str, str]:
        """``reap``, then how each reaped instance ended (instance id -> its exit, in words)."""
        self.reap()
        return dict(self.exits)

    def reap(self) -> None:
        """Collect exit statuses of engines we spawned (no zombies, and we learn why they died)."""
        for instance, child in list(self.children.items()):
            code = child.poll()
            if code is not None:
                self.exits[instance] = _describe_exit(code)
                del self.children[instance]

    def run(self, actions: Iterable[Action], engines: Mapping[str, Engine], quiet: bool = False) -> Outcome:
        """``quiet``: a long kill's progress goes nowhere (no pass is running to publish it)."""
        outcome = Outcome()
        for action in actions:
            self.log.event(f"changed: {action.describe()}")
            ok = self._do(action, engines, outcome, None if quiet else self.progress)
            if ok:
                outcome.changed += 1
            else:
                outcome.failed += 1
                outcome.stopped_early = True
                break
        return outcome

    def _do(
        self,
        action: Action,
        engines: Mapping[str, Engine],
        outcome: Outcome,
        progress: killer.Progress | None,
    ) -> bool:
        if isinstance(action, Kill):
            return self._kill(action, outcome, killer.Ticker(progress))
        if isinstance(action, AwaitPort):
            deadline = clock.monotonic() + PORT_RELEASE_WAIT_S
            while not ports.is_free(action.host, action.port):
                if clock.monotonic() >= deadline:
                    outcome.errors.append(Failure(Reason.PORT_BUSY, f"{action.host}:{action.port} still in use"))
                    return False
                clock.sleep(PORT_POLL_S)
            return True
        if isinstance(action, Start):
            engine = engines[action.model]
            cookie = new_cookie(self.namespace, engine.name, clock.now().timestamp())
            # Written before the spawn in cgroup mode (membership is the cgroup, so a
            # reconciler killed right after the fork still finds it), and again with the leader.
            record = Record(engine.name, cookie.instance, cookie.started_at, uid=os.geteuid())
            group = None
            try:
                if self.mode.base is not None:
                    group = cgroups.create(self.mode.base, cookie.instance)
                    record = replace(record, cgroup=str(group))
                self.records.write(record)
                spawned = spawn(engine, cookie, self.state_dir, group, self.withheld)
            except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in argv or env
                self.exits[cookie.instance] = f"could not be started: {exc}"
                outcome.errors.append(Failure(Reason.SPAWN_FAILED, f"{engine.command[0]}: {exc}"))
                outcome.started = None
                self._forget(record)
                return False
            self.children[cookie.instance] = spawned.process
            self.records.write(replace(record, leader_pid=spawned.process.pid,
                                       leader_create_time=_create_time(spawned.process.pid)))
            outcome.started = spawned
            self.log.event(f"started {engine.name} pid {spawned.process.pid} "
                           f"instance {cookie.instance} on port {engine.port}")
            return True
        if isinstance(action, Warmup):
            self.warmups.start(engines[action.model], action.instance)
            return True
        raise TypeError(f"unknown action {action!r}")

    def _kill(self, action: Kill, outcome: Outcome, tick: killer.Ticker) -> bool:
        """cgroup.kill each doomed instance's cgroup, SIGKILL the other targets, prove all gone."""
        doomed = {i for _, i in action.units if i is not None}
        records = [r for r in self.records.load() if r.instance in doomed]
        groups = [Path(r.cgroup) for r in records if r.cgroup is not None]
        for group in groups:
            with contextlib.suppress(OSError):
                cgroups.kill(group)
        deadline = clock.monotonic() + killer.KILL_VERIFY_S
        # Cgroup instances only: their late forks are in their cgroups, which wait_empty
        # kills and waits out; the process table need not be read again.
        only_groups = len(groups) == len(action.units)
        rescan = (lambda: ()) if only_groups else (lambda: self.rescan.procs_of(action.units))
        result = killer.cleanup_active_processes(action.targets, rescan, self.reap, tick)
        full = [str(g) for g in groups if not cgroups.wait_empty(g, deadline, tick)]
        if not result.ok:
            outcome.errors.append(Failure(Reason.KILL_FAILED, f"pids {list(result.survivors)} survived SIGKILL"))
        if full:
            outcome.errors.append(Failure(Reason.KILL_FAILED, f"cgroups {full} still have members after SIGKILL"))
        if result.ok and not full:
            for record in records:
                self._forget(record)
        return result.ok and not full

    def _forget(self, record: Record) -> None:
        """Drop an instance that is gone: its record and its (empty) cgroup."""
        if record.cgroup is not None:
            with contextlib.suppress(OSError):
                cgroups.remove(Path(record.cgroup))
        self.records.remove(record.instance)

    def prune(self, records: Iterable[Record], live: set[str]) -> None:
        """Forget recorded instances with no process left (crashed, or killed by someone else);
        ``records`` are the ones this pass observed, so the folder is not read twice."""
        for record in records:
            if record.instance not in live and record.instance not in self.children and (
                    record.cgroup is None or not cgroups.populated(Path(record.cgroup))):
                self._forget(record)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
