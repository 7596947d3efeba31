"""Thin gathering from the live machine into frozen facts; no decisions here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import replace

import psutil

from reconciler import ports
from reconciler.facts import COOKIE_ENV, Cookie, Proc

# A process's environ is fixed once it has exec'd; cache it by (pid, create_time, cmdline)
# so a pass costs one /proc read per *new* process. The cmdline is in the key because a
# child caught between fork and exec still shows its parent's environ (no cookie yet).
# Its cgroup is cached the same way: only root moves a process, and we do it before exec.
_cookie_cache: dict[tuple[int, float, str], tuple[Cookie | None, str | None]] = {}


def _identity(proc: psutil.Process, key: tuple[int, float, str]) -> tuple[Cookie | None, str | None]:
    if key in _cookie_cache:
        return _cookie_cache[key]
    try:
        raw = proc.environ().get(COOKIE_ENV)
    except (psutil.Error, OSError):
        raw = None
    found = (Cookie.decode(raw) if raw else None, _cgroup(key[0]))
    _cookie_cache[key] = found
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


def processes() -> tuple[Proc, ...]:
    seen: list[Proc] = []
    live_keys: set[tuple[int, float, str]] = set()
    attrs = ["pid", "ppid", "name", "cmdline", "create_time", "status", "uids"]
    for proc in psutil.process_iter(attrs):
        info = proc.info
        if info.get("create_time") is None:
            continue
        pid = int(info["pid"])
        argv = tuple(info.get("cmdline") or ())
        cmdline = " ".join(argv)
        key = (pid, float(info["create_time"]), cmdline)
        live_keys.add(key)
        try:
            pgid, sid = os.getpgid(pid), os.getsid(pid)
        except OSError:
            continue
        uids = info.get("uids")
        cookie, cgroup = _identity(proc, key)
        seen.append(Proc(
            pid=pid,
            ppid=int(info["ppid"] or 0),
            create_time=key[1],
            cmdline=cmdline,
            name=info.get("name") or "",
            pgid=pgid,
            sid=sid,
            cookie=cookie,
            zombie=info.get("status") == psutil.STATUS_ZOMBIE,
            uid=int(uids.real) if uids is not None else -1,
            argv=argv,
            cgroup=cgroup,
        ))
    for stale in set(_cookie_cache) - live_keys:
        del _cookie_cache[stale]
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
