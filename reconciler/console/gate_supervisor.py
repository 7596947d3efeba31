"""``ailayer up`` keeps its gate running: a gate that dies is started again, with backoff.

A SIGKILLed gate used to stay dead while ``up`` ran on: the phase READY, /healthz refused
(issue 25). A thread now waits on the gate process (the wait returns the moment it dies),
says how it ended, waits a backoff, starts a new one and waits until it listens. The activity
log says each step, and the observed state carries the facts (``reconciler.gate``: pid,
restarts, how the last one ended, when it was restarted), handed over through ``on_change``.

Stopping ``up`` stops this first: from the moment ``up``'s stop event is set (its signal
handlers set it) no gate is started, so a gate being stopped is never restarted and none is
left behind. Ctrl-C in a terminal and ``systemctl stop`` signal the gate as well, which may
exit before ``up`` is out of its loop: that is not a gate dying.

The kernel's parent-death signal (gate_child) follows the *thread* that started the gate: a
gate started here gets SIGTERM when this thread ends, which it does only once ``up`` stops.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace

from reconciler.console import gate_child
from reconciler.kit import clock
from reconciler.kit.logs import ActivityLog
from reconciler.plan.report import GateFacts

# A dead gate is started again after this: the new one takes about a second to listen, and the
# issue asks it back within 2 s. The delay doubles while gates keep dying young, so a gate that
# cannot start never spins a core, up to GATE_RESTART_MAX_S.
GATE_RESTART_FIRST_S = 0.1
GATE_RESTART_MAX_S = 30.0
# Not a timeout: a gate that ran this long died of something new; its restart is quick again.
GATE_STABLE_S = 60.0


def restart_delay(previous: float | None, ran_s: float) -> float:
    """The wait before the next start: the first one short, then doubling while gates die young."""
    if previous is None or ran_s >= GATE_STABLE_S:
        return GATE_RESTART_FIRST_S
    return min(previous * 2, GATE_RESTART_MAX_S)


def how_it_ended(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exit 1``: Popen's negative code is the signal's number."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class GateSupervisor:
    """Watches ``proc`` (a gate that listens) from a thread and restarts it when it dies."""

    def __init__(self, proc: subprocess.Popen[bytes], where: list[str], port: int, log: ActivityLog,
                 on_change: Callable[[GateFacts], None], stopping: threading.Event) -> None:
        self.proc = proc
        self._where = where
        self._port = port
        self._log = log
        self._on_change = on_change
        self._facts = GateFacts(pid=proc.pid)
        self._stopping = stopping  # `up`'s own stop event
        self._lock = threading.Lock()  # a gate is started, or `stop` ends the last one: never both
        self._thread = threading.Thread(target=self._run, name="gate-supervisor", daemon=True)

    def start(self) -> None:
        self._on_change(self._facts)
        self._thread.start()

    def stop(self) -> None:
        """No gate is started from now on (the stop event is set); the running one gets SIGTERM
        and drains."""
        with self._lock:
            self._stopping.set()
            self.proc.terminate()

    def join(self) -> None:
        """After ``stop``: wait for the gate to exit (SIGKILL past its grace), and for the thread."""
        gate_child.stop(self.proc)
        self._thread.join()

    def _publish(self, facts: GateFacts) -> None:
        self._facts = facts
        self._on_change(facts)

    def _run(self) -> None:
        delay: float | None = None
        started = clock.monotonic()
        while True:
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            down_at = clock.monotonic()
            delay = restart_delay(delay, down_at - started)
            self._log.event(f"gate (pid {self.proc.pid}) died: {how_it_ended(code)}; restarting it in {delay:g} s",
                            "error")
            self._publish(replace(self._facts, pid=None, last_exit=f"pid {self.proc.pid} {how_it_ended(code)}"))
            proc = None
            while proc is None:
                if clock.sleep(delay, self._stopping):
                    return
                proc = self._spawn()
                delay = restart_delay(delay, 0.0) if proc is None else delay
            started = clock.monotonic()
            self._publish(replace(self._facts, restarts=self._facts.restarts + 1, last_restart_at=clock.iso()))
            self._listen(proc, down_at)

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """A new gate; None where none may or can be started (``up`` stops; no fork: EAGAIN)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            try:
                self.proc = gate_child.start(self._where)
            except OSError as exc:
                self._log.event(f"gate: cannot start a new one: {exc}", "error")
                return None
            return self.proc

    def _listen(self, proc: subprocess.Popen[bytes], down_at: float) -> None:
        """Wait until the new gate listens and say so. One that neither listens nor exits within
        gate_child.GATE_START_LIMIT_S is stopped, and so restarted like one that died."""
        if gate_child.listening(proc, self._port):
            self._log.event(f"gate restarted (pid {proc.pid}) listening on port {self._port}, "
                            f"{clock.monotonic() - down_at:.1f} s after the last one died "
                            f"(restart {self._facts.restarts})")
            self._publish(replace(self._facts, pid=proc.pid))
        elif proc.poll() is None and not self._stopping.is_set():
            self._log.event(f"gate (pid {proc.pid}) did not listen within {gate_child.GATE_START_LIMIT_S:g} s; "
                            "stopping it", "error")
            gate_child.stop(proc)
