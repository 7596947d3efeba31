"""Prometheus metrics for the gate, on a registry of its own (several apps may share a process).

With several gate workers (reconciler/gate/workers.py) the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` to a per-run directory: the traffic metrics (requests, streams,
watchers) then live in prometheus-client's per-process files there, and every worker's
/metrics sums them across all workers, the dead ones' counters included. The metrics derived
from the observed state (phase, revision, switches, boots, ...) stay per process and are not
summed: every worker follows the same state file, so each one's own value is the answer
(summing would count one switch once per worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from reconciler.domain.status import Phase
from reconciler.gate.statefollow import Snapshot, StateFollower

# Boots run from seconds (a warm small model) to 45 minutes (a big one on a slow disk).
BOOT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, float("inf"))
NO_PHASE = "UNKNOWN"
# Set by the worker supervisor; read by prometheus-client when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TRAFFIC = ("ailayer_gate_requests", "ailayer_gate_streams_active", "ailayer_gate_streams",
           "ailayer_gate_watchers")


class _Summed:
    """The traffic metrics of all workers, summed from prometheus-client's per-process files."""

    def __init__(self, path: str) -> None:
        self._all = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for family in self._all.collect():  # type: ignore[no-untyped-call]
            if family.name in TRAFFIC:
                yield family


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


class _BeforeScrape:
    """Publishes counts kept outside prometheus-client (the front door's) before a scrape reads
    the registry; registered first, so it runs before the counters are collected."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for hook in self.hooks:
            hook()
        return iter(())


class GateMetrics:
    """What the issue asks for: phase, switches, boots, restarts, requests, streams."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._before_scrape = _BeforeScrape()
        r.register(self._before_scrape)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.phase = Enum("ailayer_phase", "The reconciler's phase as the gate last read it",
                          states=[*(p.value for p in Phase), NO_PHASE], registry=r)
        self.stale = Gauge("ailayer_reconciler_stale",
                           "1 when the reconciler's heartbeat is too old or its state is missing",
                           registry=r)
        self.revision = Gauge("ailayer_state_revision", "Revision of the observed state",
                              registry=r)
        self.restarts = Gauge("ailayer_engine_restarts",
                              "Engine restarts counted by the reconciler", registry=r)
        self.switches = Counter("ailayer_switches",
                                "Changes of the desired model seen by the gate", registry=r)
        self.boots = Histogram("ailayer_boot_duration_seconds",
                               "Engine boot time, spawn to READY, as seen by the gate",
                               buckets=BOOT_BUCKETS, registry=r)
        shared = os.environ.get(MULTIPROC_ENV)
        # Several workers: the traffic metrics go to the shared files only, and are exposed summed.
        t = None if shared else r
        if shared:
            r.register(_Summed(shared))
        self.requests = Counter("ailayer_gate_requests", "Requests by route and outcome",
                                ["route", "outcome"], registry=t)
        self.streams_active = Gauge("ailayer_gate_streams_active",
                                    "Streamed responses being relayed now", registry=t,
                                    multiprocess_mode="livesum")
        self.streams = Counter("ailayer_gate_streams", "Streamed responses relayed, by how they ended",
                               ["outcome"], registry=t)
        self.boot_percent = Gauge("ailayer_boot_progress_percent",
                                  "Percent of the loading engine's current boot stage, from its "
                                  "output (boot.progress); NaN when unknown or not loading",
                                  registry=r)
        self.boot_percent.set(float("nan"))
        self.waiters = Gauge("ailayer_gate_watchers",
                             "Long-poll and /events clients waiting for a change", registry=t,
                             multiprocess_mode="livesum")
        self._children: dict[tuple[str, str], Counter] = {}
        self._boot_started: str | None = None

    def request(self, route: str, outcome: str) -> None:
        """Count one answer."""
        self.counter(route, outcome).inc()

    def before_scrape(self, hook: Callable[[], None]) -> None:
        """``hook`` runs before this process answers a scrape."""
        self._before_scrape.hooks.append(hook)

    def counter(self, route: str, outcome: str) -> Counter:
        """The requests counter of one (route, outcome), made once: this is on the hot path."""
        key = (route, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, outcome)
        return child

    def watch(self, follower: StateFollower) -> None:
        self.stale.set_function(lambda: 1.0 if follower.stale() else 0.0)
        self.observe(follower, follower.snapshot, follower.snapshot)
        follower.add_listener(lambda old, new: self.observe(follower, old, new))

    def observe(self, follower: StateFollower, old: Snapshot, new: Snapshot) -> None:
        data = new.data or {}
        phase = new.phase if new.phase in Phase.__members__ else None
        self.phase.state(phase or NO_PHASE)
        self.revision.set(new.revision)
        self.restarts.set(float(data.get("restarts") or 0))
        old_data = old.data or {}
        if old is not new and old.present and old_data.get("desired_model") != data.get(
                "desired_model"):
            self.switches.inc()
        boot = data.get("boot")
        if isinstance(boot, dict) and boot.get("started_at"):
            self._boot_started = str(boot["started_at"])
        progress = boot.get("progress") if isinstance(boot, dict) else None
        percent = progress.get("percent") if isinstance(progress, dict) else None
        self.boot_percent.set(float(percent) if isinstance(percent, int | float) else float("nan"))
        if new.phase == Phase.READY and old.phase != Phase.READY and old is not new:
            took = _seconds_between(self._boot_started, data.get("phase_since"))
            if took is not None and took >= 0:
                self.boots.observe(took)
            self._boot_started = None
