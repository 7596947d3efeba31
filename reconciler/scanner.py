"""The loop's look at the machine: the process table with our instance records and their
cgroups' members, classified into units, and the wanted engine's port and readiness.

A pass looks once (``look``); the executor asks for a fresh look at the units it kills
(``procs_of``: a dying tree can fork after the pass's scan). Read-only, like observe/, but
above act/: our instances are known by the records and cgroups the executor keeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from reconciler.act import cgroups
from reconciler.act.cgroups import Mode
from reconciler.act.executor import Outcome
from reconciler.act.records import Records
from reconciler.act.spawn import Spawned
from reconciler.act.warmup import Warmups
from reconciler.domain.catalog import CatalogSource
from reconciler.domain.facts import Gpu, Observation, Probe, Proc
from reconciler.kit import clock
from reconciler.observe import gather, gpu, ports, probe
from reconciler.plan.ownership import Unit, View, classify
from reconciler.plan.planner import Action, Kill

# Reaps our exited children and returns how each instance's main process ended.
Exits = Callable[[], Mapping[str, str]]

# GPU memory is informational; sampling NVML on every 1 s boot pass is not needed.
GPU_EVERY_S = 10.0


class Scanner:
    def __init__(self, source: CatalogSource, namespace: str, mode: Mode, records: Records) -> None:
        self.source = source
        self.namespace = namespace
        self.mode = mode
        self.records = records
        self._gpu: Gpu = Gpu(False, "not sampled yet")
        self._gpu_at = -GPU_EVERY_S
        self._failed_check: tuple[str, Probe] | None = None  # found between passes, for the next

    def snapshot(self, exits: Exits) -> Observation:
        """The process table with our instance records and their cgroups' members.

        ``exits`` reaps our children and says how they ended: called after the table is read,
        so an engine the table shows dead has its exit known (reaped before the read, one that
        died in between was reported "gone" without its exit code)."""
        records = self.records.load()
        procs = gather.processes()  # before the members: a fork in between is then in the cgroup
        members = {r.instance: cgroups.procs(Path(r.cgroup)) for r in records if r.cgroup}
        return Observation(now=clock.now().timestamp(), procs=procs,
                           self_pids=gather.self_and_ancestors(), self_uid=os.geteuid(),
                           records=records, members=members, exits=dict(exits()),
                           gpu=self.gpu_sample(), identity=self.mode.name)

    def procs_of(self, units: tuple[tuple[str, str | None], ...]) -> list[Proc]:
        """The processes of these (model, instance) units in a fresh scan."""
        view = classify(self.snapshot(dict), self.source.catalog.engines, self.namespace)
        return [p for u in view.units if (u.model, u.instance) in units for p in u.procs]

    def failed_check(self, instance: str, result: Probe) -> None:
        """A health check between passes failed: the next pass takes it as its probe."""
        self._failed_check = (instance, result)

    def look(self, wanted: str | None, ready: bool, warmups: Warmups,
             exits: Exits) -> tuple[Observation, View]:
        """The pass's observation and its one classification (the planner is handed it:
        classifying 2,000 processes costs ~20 ms, and it was done four times a pass).
        ``ready``: the wanted engine was READY (then its liveness timeout applies)."""
        engines = self.source.catalog.engines
        # Before the process table: a warm-up that answered "done" had its processes (Ollama's
        # runner) started before it, so the table read next has them too.
        warmed = warmups.states()
        obs = self.snapshot(exits)
        engine = engines.get(wanted) if wanted else None
        if engine is None:
            return obs, classify(obs, engines, self.namespace)
        # Where the engine's socket most likely is: our instances' members and leaders.
        likely = [pid for pids in obs.members.values() for pid in pids]
        likely += [r.leader_pid for r in obs.records if r.leader_pid is not None]
        # One read of the socket table per pass; listeners only once READY (ours listens).
        sockets = ports.table(bound=not ready)
        holders = gather.port_holders(engine.port, likely, sockets)
        port_free = not holders and ports.is_free(engine.host, engine.port, None if ready else sockets)
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
            result = probe.check(engine, engine.liveness_timeout_s if ready else None)
        else:
            result = Probe(False, _not_listening(mine, engine.port))
        return replace(obs, port_free={engine.port: port_free}, probe=result,
                       warmup=warmed.get(instance) if instance else None), view

    def units_after(self, actions: Iterable[Action], outcome: Outcome, before: Iterable[Unit],
                    exits: Exits) -> tuple[tuple[Unit, ...], Unit | None]:
        """The units once the actions ran, and the one started if any: what the state then
        reports. A scan only where something did not go as planned."""
        if outcome.stopped_early:
            units = classify(self.snapshot(exits), self.source.catalog.engines, self.namespace).units
        else:  # every kill was verified: what is left is known without a scan
            killed = {key for a in actions if isinstance(a, Kill) for key in a.units}
            units = tuple(u for u in before if (u.model, u.instance) not in killed)
        if outcome.started is None:
            return units, None
        started = next((u for u in units if u.instance == outcome.started.cookie.instance), None)
        if started is None:
            started = self._started_unit(outcome.started)
            units = (*units, started)
        return units, started

    def _started_unit(self, spawned: Spawned) -> Unit:
        """The engine just spawned, without a scan of the table: its leader and its record
        (so the state names its pid at once, and its output is followed from the start)."""
        cookie = spawned.cookie
        leader = gather.process(spawned.process.pid)
        return Unit(cookie.model, cookie.instance, (leader,) if leader is not None else (), cookie.started_at,
                    self.records.written(cookie.instance))

    def gpu_sample(self) -> Gpu:
        """The GPU's processes, sampled every GPU_EVERY_S at most."""
        now = clock.monotonic()
        if now - self._gpu_at >= GPU_EVERY_S:
            self._gpu, self._gpu_at = gpu.observe(), now
        return self._gpu


def memory_of(unit: Unit | None) -> tuple[int | None, str | None]:
    """The engine's memory: its cgroup's memory.current where kept, else its members' RSS."""
    if unit is None or not unit.procs:
        return None, None
    if unit.record is not None and unit.record.cgroup is not None:
        current = cgroups.memory_bytes(Path(unit.record.cgroup))
        if current is not None:
            return current, "cgroup"
    return gather.rss(unit.pids), "rss"


def _not_listening(units: list[Unit], port: int) -> str:
    bound = any(port in p.listens for u in units for p in u.procs)
    return f"port {port} bound, not listening yet" if bound else "not listening yet"
