"""Thin gathering from the live machine into frozen facts; no decisions here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import replace

import psutil

from reconciler.domain.facts import COOKIE_ENV, Cookie, Proc
from reconciler.observe import ports

# A process's environ is fixed once it has exec'd; cache it by (pid, create_time, cmdline)
# so a pass costs one /proc read per *new* process. The cmdline is in the key because a
# child caught between fork and exec still shows its parent's environ (no cookie yet).
# Its cgroup is cached the same way: only root moves a process, and we do it before exec.
# So is its real uid, with the owner of /proc/PID (the effective uid) in the key: dropping
# privileges changes that.
_identity_cache: dict[tuple[tuple[int, float, str], int], tuple[Cookie | None, str | None, int]] = {}


def _identity(key: tuple[int, float, str], pid: str, owner: int) -> tuple[Cookie | None, str | None, int]:
    cached = _identity_cache.get((key, owner))
    if cached is not None:
        return cached
    try:
        raw = psutil.Process(key[0]).environ().get(COOKIE_ENV)
    except (psutil.Error, OSError):
        raw = None
    found = (Cookie.decode(raw) if raw else None, _cgroup(key[0]), _real_uid(pid, owner))
    _identity_cache[(key, owner)] = found
    return found


def _socket_inodes(pid: int) -> set[int]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    found = set()
    for name in names:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if link.startswith("socket:["):
                found.add(int(link[8:-1]))
    return found


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _holders_by_table(port: int) -> dict[int, bool]:
    """The bind-test fallback: psutil sees listening sockets only (via /proc/net/tcp)."""
    found: dict[int, bool] = {}
    with contextlib.suppress(psutil.AccessDenied, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.pid and conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                found[conn.pid] = True
    return found


def port_holders(port: int, likely: Iterable[int], sockets: list[ports.Socket] | None = None,
                 ) -> dict[int, bool]:
    """pid -> whether it listens, for every process holding ``port`` bound or listening.

    The kernel's table names socket inodes; finding their processes means reading
    /proc/PID/fd. The ``likely`` pids (our engines) are looked at first, and the whole
    machine only when some socket is still unaccounted for.
    """
    if ports.observer() != "sock_diag":
        return _holders_by_table(port)
    by_inode = {s.inode: s.listening for s in ports.holders(port, sockets)}
    found: dict[int, bool] = {}
    for batch in (list(likely), None):
        for pid in batch if batch is not None else _all_pids():
            if not by_inode:
                return found
            for inode in _socket_inodes(pid) & set(by_inode):
                found[pid] = found.get(pid, False) or by_inode.pop(inode)
    return found


def with_holders(procs: tuple[Proc, ...], port: int, holders: dict[int, bool]) -> tuple[Proc, ...]:
    return tuple(replace(p, listens=p.listens | {port}) if p.pid in holders else p for p in procs)


def _cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            for line in handle:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COMM_MAX = 15  # the kernel keeps this many characters of a process's name
PROC_READ_BYTES = 16384


def _read(path: str) -> bytes:
    """A whole /proc file with bare syscalls (``open()``'s file objects cost more than the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, PROC_READ_BYTES)]
        while len(chunks[-1]) == PROC_READ_BYTES:  # a long command line
            chunks.append(os.read(fd, PROC_READ_BYTES))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _real_uid(pid: str, owner: int) -> int:
    """The real uid. /proc/PID is owned by the effective uid, and by root for a process that
    is not dumpable (setuid programs, prctl): only then is /proc/PID/status worth a read."""
    if owner != 0:
        return owner
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    return owner


def _argv(data: str) -> tuple[str, ...]:
    """/proc/PID/cmdline as psutil splits it: NUL-separated, or, for a title written over the
    argv area (setproctitle), space-separated."""
    if not data:
        return ()
    sep = "\0" if data.endswith("\0") else " "
    parts = data.removesuffix(sep).split(sep)
    if sep == "\0" and len(parts) == 1 and " " in parts[0]:
        parts = parts[0].split(" ")
    return tuple(parts)


def _one(pid: str, boot: float, live: set[tuple[int, float, str]]) -> Proc | None:
    """One process from /proc/PID/stat, cmdline and owner; None if it is gone. Its key goes
    into ``live``."""
    try:
        stat = _read(f"/proc/{pid}/stat")
        raw_argv = _read(f"/proc/{pid}/cmdline")
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    close = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1:close].decode(errors="replace")
    fields = stat[close + 2:].split()
    argv = _argv(raw_argv.decode(errors="surrogateescape"))
    cmdline = " ".join(argv)
    create_time = boot + int(fields[19]) / _CLOCK_TICKS
    key = (int(pid), create_time, cmdline)
    live.add(key)
    try:
        cookie, cgroup, uid = _identity(key, pid, owner)
    except OSError:
        return None
    base = os.path.basename(argv[0]) if argv else ""
    name = base if len(comm) >= COMM_MAX and base.startswith(comm) else comm  # comm is truncated
    return Proc(pid=key[0], ppid=int(fields[1]), create_time=create_time, cmdline=cmdline, name=name,
                pgid=int(fields[2]), sid=int(fields[3]), cookie=cookie, zombie=fields[0] == b"Z",
                uid=uid, argv=argv, cgroup=cgroup)


def process(pid: int) -> Proc | None:
    """One process, read as ``processes`` reads each (a just-spawned engine, without a scan)."""
    return _one(str(pid), psutil.boot_time(), set())


def processes() -> tuple[Proc, ...]:
    """Every process, read straight from /proc: stat, cmdline and the owner, ~20 us each.

    psutil's process_iter took ~100 us a process (a file per attribute, two more syscalls
    for session and group): 200 ms a pass with 2,000 processes on the machine.
    """
    boot = psutil.boot_time()  # what psutil's create_time counts from: the two agree
    live: set[tuple[int, float, str]] = set()
    seen = [proc for pid in os.listdir("/proc") if pid.isdigit()
            and (proc := _one(pid, boot, live)) is not None]
    for stale in [k for k in _identity_cache if k[0] not in live]:
        del _identity_cache[stale]
    return tuple(seen)


def rss(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


def boot_time() -> float:
    """When the machine booted (epoch seconds)."""
    return float(psutil.boot_time())


def self_and_ancestors() -> frozenset[int]:
    """Never targets: the reconciler, whoever started it, and its own helper threads' pids."""
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return frozenset(pids)
