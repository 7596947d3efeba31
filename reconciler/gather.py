"""Thin gathering from the live machine into frozen facts; no decisions here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import replace

import psutil

from reconciler.facts import COOKIE_ENV, Cookie, Proc

# A process's environ is fixed once it has exec'd; cache it by (pid, create_time, cmdline)
# so a pass costs one /proc read per *new* process. The cmdline is in the key because a
# child caught between fork and exec still shows its parent's environ (no cookie yet).
_cookie_cache: dict[tuple[int, float, str], Cookie | None] = {}


def _cookie(proc: psutil.Process, key: tuple[int, float, str]) -> Cookie | None:
    if key in _cookie_cache:
        return _cookie_cache[key]
    try:
        raw = proc.environ().get(COOKIE_ENV)
    except (psutil.Error, OSError):
        raw = None
    cookie = Cookie.decode(raw) if raw else None
    _cookie_cache[key] = cookie
    return cookie


def listeners(ports: Iterable[int]) -> dict[int, set[int]]:
    """pid -> ports it listens on (or holds bound), among ``ports``."""
    wanted = set(ports)
    found: dict[int, set[int]] = {}
    if not wanted:
        return found
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return found
    for conn in conns:
        if conn.pid and conn.laddr and conn.laddr.port in wanted and (
            conn.status == psutil.CONN_LISTEN or not conn.raddr
        ):
            found.setdefault(conn.pid, set()).add(conn.laddr.port)
    return found


def _listening(pids: Iterable[int], port: int) -> set[int]:
    """Which of ``pids`` listen on ``port``: a per-process look, far cheaper than a full scan."""
    found = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in conns):
            found.add(pid)
    return found


def with_listeners(procs: tuple[Proc, ...], port: int, likely: Iterable[int]) -> tuple[Proc, ...]:
    """Mark who holds a busy ``port``: first among ``likely`` (engine processes), else everyone.

    The machine-wide socket table costs a /proc/*/fd walk of every process, so it is read
    only when the port is busy and none of the engines we know holds it.
    """
    holders = _listening(likely, port)
    if not holders:
        holders = {pid for pid, held in listeners({port}).items() if port in held}
    return tuple(replace(p, listens=p.listens | {port}) if p.pid in holders else p for p in procs)


def processes() -> tuple[Proc, ...]:
    seen: list[Proc] = []
    live_keys: set[tuple[int, float, str]] = set()
    attrs = ["pid", "ppid", "name", "cmdline", "create_time", "status"]
    for proc in psutil.process_iter(attrs):
        info = proc.info
        if info.get("create_time") is None:
            continue
        pid = int(info["pid"])
        cmdline = " ".join(info.get("cmdline") or [])
        key = (pid, float(info["create_time"]), cmdline)
        live_keys.add(key)
        try:
            pgid, sid = os.getpgid(pid), os.getsid(pid)
        except OSError:
            continue
        seen.append(Proc(
            pid=pid,
            ppid=int(info["ppid"] or 0),
            create_time=key[1],
            cmdline=cmdline,
            name=info.get("name") or "",
            pgid=pgid,
            sid=sid,
            cookie=_cookie(proc, key),
            zombie=info.get("status") == psutil.STATUS_ZOMBIE,
        ))
    for stale in set(_cookie_cache) - live_keys:
        del _cookie_cache[stale]
    return tuple(seen)


def self_and_ancestors() -> frozenset[int]:
    """Never targets: the reconciler, whoever started it, and its own helper threads' pids."""
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return frozenset(pids)
