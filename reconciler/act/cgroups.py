"""cgroup v2 identity: each engine instance in a cgroup of its own; membership is the instance.

Why: a cgroup survives everything that fooled the other signals (setproctitle wiping the
environment, re-parenting to init, setsid, double forks), only root can move a process
into it, and ``cgroup.kill`` ends every member at once. Instance cgroups live in
``<parent>/ailayer-<namespace>/<instance>``, so two installs never share one.

Detection decides the mode once at start: cgroup where we can create that directory (root,
a writable cgroup2 hierarchy, and our own cgroup either the root, delegated by systemd with
Delegate=yes, or not a systemd unit's), else the record mode, with the reason said.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler.domain.catalog import Identity
from reconciler.kit import clock

MOUNTINFO = Path("/proc/self/mountinfo")
SELF_CGROUP = Path("/proc/self/cgroup")
# systemd marks a delegated subtree with one of these extended attributes (v251+).
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")
SYSTEMD_UNIT_SUFFIXES = (".service", ".scope", ".slice")
CGROUP_DIR_MODE = 0o755
# Between looks at cgroup.events while members die (a GPU driver may hold one in D state).
POLL_S = 0.05


@dataclass(frozen=True)
class Mode:
    """The identity mode in use, and why: shown in the status, the log and ``validate``."""

    name: str  # "cgroup" or "record"
    reason: str
    base: Path | None = None  # <parent>/ailayer-<namespace>, in cgroup mode


def cgroup2_mount() -> Path | None:
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def own_cgroup() -> str | None:
    try:
        for line in SELF_CGROUP.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def _delegated(path: Path) -> bool:
    for name in DELEGATE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, name) == b"1":
                return True
    return False


def _default_parent() -> tuple[Path | None, str]:
    mount, own = cgroup2_mount(), own_cgroup()
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy is mounted"
    here = mount / own.lstrip("/")
    if own == "/" or _delegated(here):
        return here, f"cgroup v2 at {here}"
    if any(part.endswith(SYSTEMD_UNIT_SUFFIXES) for part in own.split("/")):
        return None, (f"our cgroup {own} belongs to systemd and is not delegated "
                      "(set Delegate=yes in the unit)")
    return here, f"cgroup v2 at {here}"


def detect(namespace: str, setting: Identity) -> Mode:
    """Pick the mode. ``mode: cgroup`` that cannot work is an error, never a silent fallback."""
    if setting.mode == "record":
        return Mode("record", "identity.mode is record in the catalog")
    parent, why = (setting.cgroup_parent, "identity.cgroup_parent") if setting.cgroup_parent \
        else _default_parent()
    problem = why if parent is None else _try_base(parent / f"ailayer-{namespace}")
    if problem is None and parent is not None:
        return Mode("cgroup", f"each engine instance in its own cgroup under {parent}",
                    parent / f"ailayer-{namespace}")
    if setting.mode == "cgroup":
        raise OSError(errno.EPERM, f"identity.mode is cgroup, but {problem}")
    return Mode("record", f"cgroups unavailable ({problem}); using instance records")


def _try_base(base: Path) -> str | None:
    try:
        base.mkdir(mode=CGROUP_DIR_MODE, exist_ok=True)
    except OSError as exc:
        return f"cannot create {base}: {exc.strerror}"
    if not (base / "cgroup.procs").exists():
        return f"{base} is not in a cgroup v2 hierarchy"
    return None


def create(base: Path, instance: str) -> Path:
    # The base again: an rmdir of empty cgroups from outside (a cleanup script) may have taken
    # it since detect(), and every spawn would then fail until a restart.
    base.mkdir(mode=CGROUP_DIR_MODE, exist_ok=True)
    path = base / instance
    path.mkdir(mode=CGROUP_DIR_MODE)
    return path


def join_self(path: Path) -> None:
    """Move the calling process into ``path``; runs in the child between fork and exec.

    Writing "0" moves the writer, so the engine is a member before its first instruction
    and nothing it forks can start outside. Only os-level calls: no locks, no allocation
    worth speaking of, safe after fork in a threaded parent.
    """
    fd = os.open(path / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def _walk(path: Path) -> list[Path]:
    found = [path]
    with contextlib.suppress(OSError):
        found += [p for child in path.iterdir() if child.is_dir() for p in _walk(child)]
    return found


def procs(path: Path) -> frozenset[int]:
    """Every pid in the cgroup and below it; empty when it is gone."""
    pids: set[int] = set()
    for directory in _walk(path):
        with contextlib.suppress(OSError):
            pids.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
    return frozenset(pids)


def populated(path: Path) -> bool:
    try:
        text = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in text


def kill(path: Path) -> None:
    """SIGKILL every member: cgroup.kill (Linux 5.14+) or, without it, each listed pid."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
        return
    for pid in procs(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_empty(path: Path, deadline: float, tick: Callable[[Iterable[int]], None] | None = None) -> bool:
    """Wait on the clock seam until ``populated 0``; False if members are left at ``deadline``.

    ``tick`` hears the members still there on each look.
    """
    while populated(path):
        if clock.monotonic() >= deadline:
            return False
        kill(path)  # members forked since the last look are killed too
        if tick is not None:
            tick(procs(path))
        clock.sleep(POLL_S)
    return True


def remove(path: Path) -> None:
    """rmdir the (empty) cgroup and any sub-cgroups an engine made; gone already is fine."""
    for directory in reversed(_walk(path)):
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()


def memory_bytes(path: Path) -> int | None:
    """memory.current where the memory controller is enabled for the cgroup, else None."""
    try:
        return int((path / "memory.current").read_text())
    except (OSError, ValueError):
        return None
