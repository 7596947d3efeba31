"""``ailayer down``'s stop protocol: have the running reconciler stop its engines and exit,
kill it if it does not, then stop whatever engines are left, with the state dir's lock held.

The other side of the protocol, the running reconciler taking ``stopper.DOWN_SIGNAL`` as
"stop the engines, then exit", is ``console.signals``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

from reconciler import preflight
from reconciler.act import stopper
from reconciler.console import Refused
from reconciler.domain.catalog import Catalog
from reconciler.kit.lock import AlreadyRunning, StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.kit.schemas import InvalidFile
from reconciler.loop import Reconciler, namespace_of
from reconciler.store import desired_file


class NotDown(Refused):
    """``down`` could not stop everything; the message is the line that says why."""


def stop_all(catalog: Catalog, lock: StateLock, say: Callable[[str], None]) -> str:
    """Stop the reconciler holding ``lock`` (if any) and every engine; ``say`` reports the wait.

    Returns the line that says what was stopped. ``lock`` is held on return: the caller
    keeps it until it exits, so nothing starts an engine meanwhile.
    """
    pid = stopper.holder(lock.path)
    if pid is None:
        try:
            lock.acquire()
        except AlreadyRunning as exc:  # one started just now
            raise NotDown(str(exc)) from None
        stopped = "no reconciler was running"
    else:
        _stop_reconciler(lock, pid, say)
        stopped = f"reconciler pid {pid} stopped"
    _stop_engines(catalog, lock)
    return f"ailayer is down: {stopped}; no engine is running{_still_selected(catalog)}"


def _stop_reconciler(lock: StateLock, pid: int, say: Callable[[str], None]) -> None:
    """Ask ``pid`` to stop, SIGKILL it past the deadline; return once ``lock`` is ours."""
    _signal_reconciler(pid)
    say(f"ailayer: asked the reconciler (pid {pid}) to stop its engines and exit; "
        f"waiting up to {stopper.STOP_DEADLINE_S:g} s")
    waited, other = stopper.wait_released(lock, pid, stopper.STOP_DEADLINE_S)
    if waited is stopper.Waited.TIMEOUT:
        say(f"ailayer: the reconciler (pid {pid}) did not stop within "
            f"{stopper.STOP_DEADLINE_S:g} s; killing it and stopping the engines here")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        waited, other = stopper.wait_released(lock, pid, stopper.KILLED_RELEASE_S)
    if waited is not stopper.Waited.RELEASED:
        why = (f"another reconciler (pid {other}) took the state dir as soon as it stopped: "
               "a supervisor restarts it (`systemctl stop ailayer`, then `ailayer down`)"
               if waited is stopper.Waited.TAKEN else "it still holds the state dir lock")
        raise NotDown(f"not down: {why}")


def _signal_reconciler(pid: int) -> None:
    try:
        os.kill(pid, stopper.DOWN_SIGNAL)
    except ProcessLookupError:
        pass  # it exited meanwhile: the lock is free
    except PermissionError:
        raise NotDown(f"the reconciler (pid {pid}) runs as another user: run `sudo ailayer down`") from None


def _stop_engines(catalog: Catalog, lock: StateLock) -> None:
    """Whatever the reconciler left (a `reconcile` without --stop-on-exit, or one killed)
    goes too, and the state says so, whoever ran the engines."""
    log = ActivityLog(catalog.log_file, catalog.state_dir, terminal=sys.stdout)
    try:
        try:
            rec = Reconciler(catalog, log)
        except OSError as exc:  # its identity mode cannot work here
            raise NotDown(f"{exc.strerror or exc}") from None
        rec.lock = lock
        if preflight.running_instances(catalog, rec.namespace):
            log.event("stopping managed engines (ailayer down)")
            rec.stop_engines()
        left = preflight.running_instances(catalog, namespace_of(catalog.state_dir))
        rec.mark_stopped(engines_stopped=not left)
    finally:
        log.close()
    if left:
        raise NotDown("not down: engine processes survived the stop: " +
                      "; ".join(f"{u.model} pids {u.pids}" for u in left))


def _still_selected(catalog: Catalog) -> str:
    """A note when the desired state still selects a model: the next `up` loads it."""
    try:
        wish = desired_file.read(catalog).model
    except InvalidFile:
        wish = None
    return f" (desired_state.yaml still selects {wish}: the next `up` loads it; " \
           f"`toggle none` clears it)" if wish else ""
