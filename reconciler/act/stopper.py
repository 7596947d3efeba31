"""``ailayer down``: find the reconciler that holds a state dir's lock and have it stop.

The holder is named by the kernel (``/proc/locks`` lists each flock with its pid and the
file's device and inode), never by the pid written in the file, which a stale or replaced
file could get wrong. It is asked with :data:`DOWN_SIGNAL`, which ``up`` and ``reconcile``
take as "stop the engines, then exit" whatever ``--stop-on-exit`` says.
"""

from __future__ import annotations

import enum
import os
import signal
from pathlib import Path

from reconciler.kit import clock
from reconciler.kit.lock import AlreadyRunning, StateLock

PROC_LOCKS = Path("/proc/locks")
DOWN_SIGNAL = signal.SIGUSR1
# How long `down` waits for the reconciler to stop its engines and exit: a pass may be in a
# kill when asked (killer.KILL_VERIFY_S, 60 s), the stop then kills the engines (60 s more at
# most) and the gate drains (console.gate_child.GATE_STOP_GRACE_S, 15 s). Past it the reconciler is SIGKILLed
# and `down` stops the engines itself.
STOP_DEADLINE_S = 180.0
# After SIGKILL the kernel drops the lock once the process is gone; one stuck in the kernel
# (a GPU driver call, D state) may take a moment.
KILLED_RELEASE_S = 10.0
POLL_S = 0.1


class Waited(enum.Enum):
    RELEASED = "released"  # the lock is ours now
    TIMEOUT = "timeout"  # the holder is still running
    TAKEN = "taken"  # it stopped, and another reconciler took the lock first


def holder(lock_path: Path) -> int | None:
    """The pid holding the flock on ``lock_path``, or None when nobody does."""
    try:
        st = os.stat(lock_path)
        table = PROC_LOCKS.read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 8468 fe:00:2146547 0 EOF"; blocked waiters carry "->".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            return int(fields[4])
    return None


def wait_released(lock: StateLock, pid: int, seconds: float) -> tuple[Waited, int | None]:
    """Take ``lock`` once ``pid`` let it go; who holds it instead if someone else got it first."""
    deadline = clock.monotonic() + seconds
    while True:
        try:
            lock.acquire()
            return Waited.RELEASED, None
        except AlreadyRunning:
            now = holder(lock.path)
            if now is not None and now != pid:
                return Waited.TAKEN, now
        if clock.monotonic() >= deadline:
            return Waited.TIMEOUT, pid
        clock.sleep(POLL_S)
