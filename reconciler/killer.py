"""SIGKILL a set of processes and prove they are gone: the seed's cleanup_active_processes()."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from reconciler import clock
from reconciler.facts import Proc

# SIGKILL cannot be caught, but a process in uninterruptible sleep (a GPU driver freeing
# tens of GB of VRAM) dies only when the kernel call returns; give it this long per round.
KILL_VERIFY_S = 60.0
# A dying tree can fork between our scan and our signal; re-scan this many times.
MAX_ROUNDS = 5
POLL_S = 0.05


@dataclass(frozen=True)
class KillResult:
    killed: tuple[int, ...]
    survivors: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.survivors


def _same(proc: Proc) -> psutil.Process | None:
    """The live process only if it is still the one we saw (PID reuse guard)."""
    try:
        live = psutil.Process(proc.pid)
        if abs(live.create_time() - proc.create_time) > 0.01:
            return None
        return live if live.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def _signal(targets: Iterable[Proc]) -> list[psutil.Process]:
    alive = []
    for proc in targets:
        live = _same(proc)
        if live is None:
            continue
        try:
            live.send_signal(signal.SIGKILL)
            alive.append(live)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            alive.append(live)
    return alive


def _gone(live: psutil.Process) -> bool:
    try:
        return live.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def cleanup_active_processes(
    targets: Iterable[Proc],
    rescan: Callable[[], Iterable[Proc]],
    reap: Callable[[], None],
) -> KillResult:
    """SIGKILL every target, re-scan for late forks, and wait until all are dead.

    ``rescan`` returns processes that still belong to the doomed units (new children,
    cookie holders, port holders); ``reap`` collects exit statuses of our own children
    so they do not linger as zombies.
    """
    killed: set[int] = set()
    pending = list(targets)
    survivors: list[psutil.Process] = []
    for _ in range(MAX_ROUNDS):
        alive = _signal(pending)
        killed.update(p.pid for p in alive)
        deadline = clock.monotonic() + KILL_VERIFY_S
        while alive and clock.monotonic() < deadline:
            reap()
            alive = [p for p in alive if not _gone(p)]
            if alive:
                clock.sleep(POLL_S)
        survivors = alive
        if survivors:
            break
        pending = [p for p in rescan() if not p.zombie]
        if not pending:
            break
    else:
        # Forks found by the last re-scan were never signalled: they are survivors, not "ok".
        survivors = [live for live in map(_same, pending) if live is not None]
    reap()
    return KillResult(tuple(sorted(killed)), tuple(sorted(p.pid for p in survivors)))
