"""Who owns each process: one of our recorded engine instances, a stray copy of a catalog
engine, or nobody. The rules are docs/OWNERSHIP.md; this module is them, as pure functions.

"Nobody" is the important answer: a process that is not in one of our instances and is not
recognised precisely as a catalog engine is never killed. A process of ours is proven by
the instance record the executor wrote when it started it (its cgroup in cgroup mode;
its leader, session and group otherwise). The environment cookie only corroborates: anyone
can set it, and vLLM's setproctitle wipes it.
"""

from __future__ import annotations

import functools
import os.path
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from reconciler.domain.catalog import Engine
from reconciler.domain.facts import Observation, Proc, Record

# A child's create time can read a few ms before its parent's (clock ticks of 10 ms).
CREATE_TIME_SLACK_S = 0.05
PYTHON = "{python}"
_PYTHON_NAME = re.compile(r"python[0-9.]*")
_TITLE_SUFFIX = re.compile(r"_[A-Za-z0-9_]+")
# Where an install's instance cgroups live: "ailayer-<namespace>" (reconciler/act/cgroups.py).
_INSTALL_CGROUP = re.compile(r"^ailayer-([0-9a-f]{12})$")
UNRECORDED = "(unrecorded)"


@dataclass(frozen=True)
class Unit:
    """A set of processes that lives and dies together: one instance, or one model's strays."""

    model: str
    instance: str | None  # our instance id; None for strays
    procs: tuple[Proc, ...]
    started_at: float  # from the record, or the oldest process's create time
    record: Record | None = None  # None: a stray, or our cookie/cgroup with its record lost

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self.procs)

    @property
    def root_pid(self) -> int | None:
        """The process the others descend from (the engine's main process), if it is alive."""
        if self.record is not None and self.record.leader_pid in {p.pid for p in self.procs}:
            return self.record.leader_pid
        pids = {p.pid for p in self.procs}
        roots = sorted(p.pid for p in self.procs if p.ppid not in pids)
        return roots[0] if roots else None

    def listens_on(self, port: int) -> bool:
        return any(port in p.listens for p in self.procs)

    def uids(self) -> set[int]:
        return {p.uid for p in self.procs}


@dataclass(frozen=True)
class View:
    units: tuple[Unit, ...]  # ours (instance set) and strays (instance None)
    foreign_listeners: Mapping[int, tuple[Proc, ...]]  # port -> processes we may not kill
    forged: tuple[Proc, ...] = ()  # our namespace's cookie on another uid's process: never ours

    def of_model(self, model: str) -> list[Unit]:
        return [u for u in self.units if u.model == model]

    def strays(self) -> list[Unit]:
        return [u for u in self.units if u.instance is None]


def argv_matches(pattern: tuple[str, ...], argv: tuple[str, ...]) -> bool:
    """Prefix match; element 0 against the program (see catalog.Strays).

    A console script (``vllm``, ``ollama`` is Go) runs as ``python3 /path/bin/vllm serve …``:
    when argv[0] is an interpreter and argv[1] a script path, the script is the program too.
    """
    if (pattern and pattern[0] != PYTHON and len(argv) > 1 and "/" in argv[1]
            and _PYTHON_NAME.fullmatch(os.path.basename(argv[0])) and _prefix(pattern, argv[1:])):
        return True
    return _prefix(pattern, argv)


def _prefix(pattern: tuple[str, ...], argv: tuple[str, ...]) -> bool:
    if not pattern or len(argv) < len(pattern):
        return False
    head, program = pattern[0], argv[0]
    if head == PYTHON:
        ok = _PYTHON_NAME.fullmatch(os.path.basename(program)) is not None
    elif "/" in head:
        ok = program == head or program.endswith("/" + head)
    else:
        ok = os.path.basename(program) == head
    return ok and tuple(argv[1:len(pattern)]) == pattern[1:]


def title_matches(title: str, proc: Proc) -> bool:
    shown = proc.cmdline.strip()
    if not shown.startswith(title):
        return False
    rest = shown[len(title):]
    return rest == "" or _TITLE_SUFFIX.fullmatch(rest) is not None


def recognise(proc: Proc, engines: Mapping[str, Engine]) -> str | None:
    """The catalog engine ``proc`` is a copy of; the longest argv pattern wins a tie."""
    best: tuple[int, str] | None = None
    for name, engine in engines.items():
        for pattern in engine.strays.argv:
            if argv_matches(pattern, proc.argv) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), name)
        if best is None and any(title_matches(t, proc) for t in engine.strays.titles):
            best = (0, name)
    return best[1] if best else None


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


def _born_after(proc: Proc, record: Record) -> bool:
    start = record.leader_create_time
    return start is not None and proc.create_time >= start - CREATE_TIME_SLACK_S


def _is_leader(proc: Proc, record: Record) -> bool:
    start = record.leader_create_time
    return (proc.pid == record.leader_pid and start is not None
            and abs(proc.create_time - start) <= CREATE_TIME_SLACK_S)


def members(record: Record, procs: list[Proc], cgroup_procs: frozenset[int] | None,
            namespace: str) -> set[Proc]:
    """The record's processes: its cgroup, or (record mode) leader/session/group/cookie + tree."""
    if record.cgroup is not None:
        # cgroup.procs and the process table are read one after the other: a child forked in
        # between is in the table with the instance's cgroup but not in the list. It is the
        # same instance (taking it for a second one killed the whole engine as a duplicate).
        tail = tuple(PurePosixPath(record.cgroup).parts[-2:])
        return {p for p in procs if (cgroup_procs and p.pid in cgroup_procs) or _in_cgroup(p, tail)}
    # A session or group id outlives its leader; once another process has taken the
    # leader's pid (PID reuse), that id may name someone else's session: stop trusting it.
    reused = any(p.pid == record.leader_pid and not _is_leader(p, record) for p in procs)
    seeds = set()
    for proc in procs:
        if _is_leader(proc, record):
            seeds.add(proc)
        elif proc.uid != record.uid or not _born_after(proc, record):
            continue  # another user's process is never ours by session, group or cookie
        elif not reused and record.leader_pid in (proc.sid, proc.pgid):  # spawned with setsid
            seeds.add(proc)
        elif (proc.cookie is not None and proc.cookie.namespace == namespace
              and proc.cookie.instance == record.instance):
            seeds.add(proc)  # the cookie reaches a worker that escaped with setsid
    return descendants(seeds, procs)


def _in_cgroup(proc: Proc, tail: tuple[str, ...]) -> bool:
    """Whether ``proc``'s cgroup path (as the scan saw it) is the instance cgroup whose last
    two components are ``tail`` (``ailayer-<ns>``, the instance), or below it."""
    parts = (proc.cgroup or "").split("/")
    return any(tuple(parts[i:i + len(tail)]) == tail for i in range(len(parts) - len(tail) + 1))


def _install_of(proc: Proc) -> str | None:
    """The namespace of the ailayer install whose instance cgroup holds ``proc``, if any."""
    return _install_in(proc.cgroup or "")


@functools.lru_cache(maxsize=4096)
def _install_in(cgroup: str) -> str | None:
    """Most processes share a handful of cgroups: each path is parsed once."""
    for part in cgroup.split("/"):
        found = _INSTALL_CGROUP.match(part)
        if found:
            return found.group(1)
    return None


def _belongs_elsewhere(proc: Proc, by_pid: Mapping[int, Proc], namespace: str) -> bool:
    """Another install's process: its cookie or cgroup, or an ancestor's, names that install."""
    seen: set[int] = set()
    current: Proc | None = proc
    while current is not None and current.pid not in seen:
        seen.add(current.pid)
        install = _install_of(current)
        if install is not None and install != namespace:
            return True
        if current.cookie is not None and current.cookie.namespace != namespace:
            return True
        current = by_pid.get(current.ppid)
    return False


def classify(obs: Observation, engines: Mapping[str, Engine], namespace: str) -> View:
    # A zombie holds no memory, VRAM or port: it is dead, only not yet reaped by its parent
    # (or by an init that never reaps, as in some containers).
    procs = [p for p in obs.procs if p.pid not in obs.self_pids and not p.zombie]
    by_pid = {p.pid: p for p in procs}
    claimed: dict[Proc, Unit] = {}
    units: list[Unit] = []

    def add(unit: Unit) -> None:
        fresh = tuple(sorted((p for p in unit.procs if p not in claimed), key=lambda p: p.pid))
        unit = Unit(unit.model, unit.instance, fresh, unit.started_at, unit.record)
        for proc in fresh:
            claimed[proc] = unit
        units.append(unit)

    for record in sorted(obs.records, key=lambda r: r.started_at):
        mine = members(record, procs, obs.members.get(record.instance), namespace)
        if mine:
            add(Unit(record.model, record.instance, tuple(mine), record.started_at, record))

    # Ours without a record (the reconciler died between spawn and writing it, or the state
    # dir was wiped): our cgroup proves it; our cookie does only on our own uid.
    orphans: dict[str, list[Proc]] = {}
    forged: list[Proc] = []
    for proc in procs:
        if proc in claimed:
            continue
        cookie = proc.cookie
        in_our_cgroup = _install_of(proc) == namespace
        if in_our_cgroup:
            orphans.setdefault((proc.cgroup or "").rsplit("/", 1)[-1], []).append(proc)
        elif cookie is not None and cookie.namespace == namespace:
            if proc.uid == obs.self_uid:
                orphans.setdefault(cookie.instance, []).append(proc)
            else:
                forged.append(proc)
    for instance, seeds in sorted(orphans.items()):
        tree = descendants(seeds, procs)
        model = next((p.cookie.model for p in tree if p.cookie and p.cookie.namespace == namespace),
                     UNRECORDED)
        add(Unit(model, instance, tuple(tree), min(p.create_time for p in tree)))

    # One stray unit per model and session: a copy someone started by hand is judged (and
    # spared or killed) apart from another user's copy elsewhere on the machine.
    strays: dict[tuple[str, int], set[Proc]] = {}
    for proc in procs:
        if proc in claimed or proc in forged:
            continue
        copy_of = recognise(proc, engines)  # first: most processes are no engine's copy
        if copy_of is not None and not _belongs_elsewhere(proc, by_pid, namespace):
            strays.setdefault((copy_of, proc.sid), set()).add(proc)
    # A stray's children, and the members of a stray group leader's group, go with it.
    for (model, _), found in sorted(strays.items()):
        leaders = {p.pid for p in found if p.pgid == p.pid}
        group = {p for p in procs if p.pgid in leaders}
        tree = {p for p in descendants(found | group, procs)
                if p not in claimed and p not in forged}
        if tree:
            add(Unit(model, None, tuple(tree), min(p.create_time for p in tree)))

    foreign: dict[int, list[Proc]] = {}
    for proc in procs:
        if proc not in claimed:
            for port in proc.listens:
                foreign.setdefault(port, []).append(proc)
    return View(tuple(units), {port: tuple(ps) for port, ps in foreign.items()}, tuple(forged))
