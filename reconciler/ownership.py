"""Who owns each process: one of our engine instances, a stray copy of a catalog engine, or nobody.

Pure functions over a gathered process table. "Nobody" is the important answer: a
process that carries none of our cookies and matches no catalog pattern is never killed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.catalog import Engine
from reconciler.facts import Observation, Proc


@dataclass(frozen=True)
class Unit:
    """A set of processes that lives and dies together: one instance, or one model's strays."""

    model: str
    instance: str | None  # our instance id; None for strays (no cookie of ours)
    procs: tuple[Proc, ...]
    started_at: float  # from the cookie, or the oldest process's create time

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self.procs)

    @property
    def root_pid(self) -> int | None:
        """The process the others descend from (the engine's main process), if it is alive."""
        pids = {p.pid for p in self.procs}
        roots = sorted(p.pid for p in self.procs if p.ppid not in pids)
        return roots[0] if roots else None

    def listens_on(self, port: int) -> bool:
        return any(port in p.listens for p in self.procs)


@dataclass(frozen=True)
class View:
    units: tuple[Unit, ...]
    foreign_listeners: Mapping[int, tuple[Proc, ...]]  # port -> processes we may not kill

    def of_model(self, model: str) -> list[Unit]:
        return [u for u in self.units if u.model == model]


def match_engine(proc: Proc, engines: Mapping[str, Engine]) -> str | None:
    for name, engine in engines.items():
        if any(pattern in proc.cmdline for pattern in engine.match):
            return name
    return None


def descendants(roots: Iterable[Proc], procs: Iterable[Proc]) -> set[Proc]:
    """Roots plus every process whose parent chain reaches one of them."""
    children: dict[int, list[Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found: set[Proc] = set()
    stack = list(roots)
    while stack:
        proc = stack.pop()
        if proc in found:
            continue
        found.add(proc)
        stack.extend(children.get(proc.pid, ()))
    return found


def classify(obs: Observation, engines: Mapping[str, Engine], namespace: str) -> View:
    # A zombie holds no memory, VRAM or port: it is dead, only not yet reaped by its parent
    # (or by an init that never reaps, as in some containers).
    procs = [p for p in obs.procs if p.pid not in obs.self_pids and not p.zombie]
    owner: dict[Proc, tuple[str, str | None]] = {}
    for proc in procs:
        cookie = proc.cookie
        if cookie is not None and cookie.namespace == namespace:
            owner[proc] = (cookie.model, cookie.instance)
        else:
            model = match_engine(proc, engines)
            if model is not None:
                owner[proc] = (model, None)
    # Children inherit their parent's owner unless they carry a cookie of their own, and so
    # does every member of an owned group leader's process group.
    for root in list(owner):
        for child in descendants([root], procs):
            owner.setdefault(child, owner[root])
    leaders = {p.pid: key for p, key in owner.items() if p.pgid == p.pid}
    for proc in procs:
        if proc.pgid in leaders:
            owner.setdefault(proc, leaders[proc.pgid])
    groups: dict[tuple[str, str | None], list[Proc]] = {}
    for proc, key in owner.items():
        groups.setdefault(key, []).append(proc)
    units = tuple(
        Unit(model, instance, tuple(sorted(members, key=lambda p: p.pid)), _started(members))
        for (model, instance), members in sorted(groups.items(), key=lambda kv: str(kv[0]))
    )
    foreign: dict[int, list[Proc]] = {}
    for proc in procs:
        if proc not in owner:
            for port in proc.listens:
                foreign.setdefault(port, []).append(proc)
    return View(units, {port: tuple(ps) for port, ps in foreign.items()})


def _started(members: list[Proc]) -> float:
    cookies = [p.cookie.started_at for p in members if p.cookie is not None]
    return min(cookies) if cookies else min(p.create_time for p in members)
