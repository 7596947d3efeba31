"""What ``ailayer validate`` checks beyond the schemas: would ``ailayer up`` work here, now?

Each finding is an error (``up`` would fail, or an engine could never start) or a warning
(it would run, but wait or refuse something), and names what to do. Nothing is changed:
no directory is created, no process signalled, no cgroup made.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from reconciler.act import cgroups, stopper
from reconciler.act.records import Records
from reconciler.domain.catalog import Catalog, Engine
from reconciler.domain.facts import Observation
from reconciler.kit.lock import StateLock
from reconciler.observe import gather
from reconciler.plan.ownership import Unit, View, classify

MAX_COMMAND_CHARS = 80


@dataclass(frozen=True)
class Finding:
    error: bool
    message: str


def check(catalog: Catalog, namespace: str) -> list[Finding]:
    found = [f for engine in catalog.engines.values() if (f := _executable(engine)) is not None]
    found += _writable("state dir", catalog.state_dir)
    found += _writable("log dir", catalog.log_file.parent, fallback=catalog.state_dir)
    found += _writable("desired state's dir", catalog.desired_path.parent)
    found += _ports(catalog, namespace)
    if not catalog.gate.token:
        found.append(Finding(False, f"no token: ${catalog.gate.token_env} is not set here, so the "
                                    "gate's POST /toggle answers 403 (set it where `ailayer up` runs)"))
    return found


def _executable(engine: Engine) -> Finding | None:
    program = engine.command[0]
    search = engine.env.get("PATH", os.environ.get("PATH", os.defpath))
    if "/" in program:
        path = Path(engine.cwd or ".", program) if not program.startswith("/") else Path(program)
        if os.access(path, os.X_OK) and path.is_file():
            return None
        return Finding(True, f"engine {engine.name}: {path} is not an executable file")
    if shutil.which(program, path=search) is not None:
        return None
    return Finding(True, f"engine {engine.name}: {program!r} is not found on PATH; install it, or "
                         "give its full path in `command`")


def _writable(what: str, directory: Path, fallback: Path | None = None) -> list[Finding]:
    """The directory, or the nearest existing one above it that would be made, is writable."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return []
    made = "" if existing == directory else f" (it would be made in {existing})"
    if fallback is not None:
        return [Finding(False, f"{what} {directory} is not writable{made}; the log goes to "
                               f"{fallback} instead (run as root, or set log_file)")]
    return [Finding(True, f"{what} {directory} is not writable{made}: run as root, or point it "
                          "at a directory you can write")]


def view(catalog: Catalog, namespace: str) -> View:
    """The machine's processes as the loop would see them: our instances, strays, the rest."""
    records = Records(catalog.state_dir).load()
    members = {r.instance: cgroups.procs(Path(r.cgroup)) for r in records if r.cgroup}
    obs = Observation(now=0.0, procs=gather.processes(), self_pids=gather.self_and_ancestors(),
                      self_uid=os.geteuid(), records=records, members=members)
    return classify(obs, catalog.engines, namespace)


def running_instances(catalog: Catalog, namespace: str) -> list[Unit]:
    """This install's engine instances that still have a live process."""
    return [u for u in view(catalog, namespace).units if u.instance is not None and u.procs]


def _ports(catalog: Catalog, namespace: str) -> list[Finding]:
    """Who holds each engine's port and the gate's: ours, a stray copy, or someone else."""
    owner = {p.pid: (u.model, u.instance) for u in view(catalog, namespace).units for p in u.procs}
    running = _reconciler_pid(catalog)
    found: list[Finding] = []
    wanted = [(f"engine {e.name}", e.port) for e in catalog.engines.values()]
    for label, port in [*wanted, ("the gate", catalog.gate.port)]:
        for pid in sorted(gather.port_holders(port, likely=list(owner))):
            model, instance = owner.get(pid, (None, None))
            if instance is not None:
                continue  # one of this install's own engine instances
            if model is not None:
                found.append(Finding(False, f"port {port} ({label}) is held by a copy of {model} that "
                                            f"ailayer did not start: {_describe(pid)}; it is stopped "
                                            "only if docs/OWNERSHIP.md's stray rules allow it"))
            elif running is not None and (pid == running or _parent(pid) == running):
                continue  # the running reconciler's gate
            else:
                effect = "`ailayer up` would fail" if label == "the gate" else \
                    f"the reconciler would wait (WAITING_PORT) to start {label[7:]}"
                found.append(Finding(False, f"port {port} ({label}) is held by a foreign process "
                                            f"{_describe(pid)}: {effect}"))
    return found


def _reconciler_pid(catalog: Catalog) -> int | None:
    return stopper.holder(StateLock(catalog.state_dir).path)


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        command = " ".join(proc.cmdline()) or proc.name()
        user = proc.username()
    except psutil.Error:
        return f"pid {pid}"
    if len(command) > MAX_COMMAND_CHARS:
        command = command[:MAX_COMMAND_CHARS] + "…"
    return f"pid {pid} ({user}: {command})"
