"""SIGKILL a set of processes and prove they are gone: the seed's cleanup_active_processes()."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from reconciler.domain.facts import Proc
from reconciler.kit import clock

# SIGKILL cannot be caught, but a process in uninterruptible sleep (a GPU driver freeing
# tens of GB of VRAM) dies only when the kernel call returns; give it this long per round.
KILL_VERIFY_S = 60.0
# A dying tree can fork between our scan and our signal; re-scan this many times.
MAX_ROUNDS = 5
# Longest wait between two looks at a dying process; its exit (pidfd) ends a wait at once.
POLL_S = 0.05
# While a kill waits, say what is still alive this often (the state keeps flowing, and the
# gate does not take a long kill for a dead reconciler).
PROGRESS_EVERY_S = 1.0

Progress = Callable[[tuple[int, ...], float], None]
"""Told (pids still alive, seconds since the first SIGKILL) while a kill waits."""


class Ticker:
    """Calls a Progress at most every PROGRESS_EVERY_S, timed from the kill's start."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.started = clock.monotonic()
        self._next = self.started + PROGRESS_EVERY_S

    def __call__(self, alive: Iterable[int]) -> None:
        now = clock.monotonic()
        if self.progress is not None and now >= self._next:
            self._next += PROGRESS_EVERY_S  # on the second's grid, unless far behind it
            if self._next <= now:
                self._next = now + PROGRESS_EVERY_S
            self.progress(tuple(sorted(alive)), now - self.started)


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


class ExitWatch:
    """pidfds of processes we wait to see die: a wait ends the moment one exits, instead of
    at the next fixed poll. Without pidfd_open (Linux < 5.3) waits are plain sleeps."""

    def __init__(self, procs: Iterable[psutil.Process]) -> None:
        self._poller = select.poll()
        self._fds: set[int] = set()
        for proc in procs:
            try:
                fd = os.pidfd_open(proc.pid)
            except (OSError, AttributeError):  # gone already, or no pidfd here
                continue
            self._poller.register(fd, select.POLLIN)
            self._fds.add(fd)

    def wait(self, seconds: float) -> None:
        if not self._fds:
            clock.sleep(seconds)
            return
        for fd, _ in clock.wait_io(self._poller, seconds):
            self._drop(fd)  # stays readable once exited: watching it again would spin

    def _drop(self, fd: int) -> None:
        self._poller.unregister(fd)
        self._fds.discard(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in list(self._fds):
            self._drop(fd)


def cleanup_active_processes(
    targets: Iterable[Proc],
    rescan: Callable[[], Iterable[Proc]],
    reap: Callable[[], None],
    tick: Ticker | None = None,
) -> KillResult:
    """SIGKILL every target, re-scan for late forks, and wait until all are dead.

    ``rescan`` returns processes that still belong to the doomed units (new children,
    cookie holders, port holders); ``reap`` collects exit statuses of our own children
    so they do not linger as zombies; ``tick`` hears what is still alive while it waits.
    """
    tick = tick or Ticker(None)
    killed: set[int] = set()
    pending = list(targets)
    survivors: list[psutil.Process] = []
    for _ in range(MAX_ROUNDS):
        alive = _signal(pending)
        killed.update(p.pid for p in alive)
        deadline = clock.monotonic() + KILL_VERIFY_S
        exits = ExitWatch(alive)
        try:
            while alive and clock.monotonic() < deadline:
                reap()
                alive = [p for p in alive if not _gone(p)]
                if alive:
                    tick(p.pid for p in alive)
                    exits.wait(POLL_S)
        finally:
            exits.close()
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
