"""``ailayer up``'s gate, a child process: started, waited for until it listens, stopped.

The gate runs as its own process: the proxy's latency never waits on a process scan. It
dies with its parent (PR_SET_PDEATHSIG): an orphaned gate would go on serving an old state.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from reconciler.console import Refused
from reconciler.kit import clock

# The gate drains in-flight requests on SIGTERM; past this it is killed so Ctrl-C never hangs.
GATE_STOP_GRACE_S = 15.0
# The gate imports aiohttp and binds: about a second here; a loaded machine may take longer.
GATE_START_LIMIT_S = 30.0
GATE_START_POLL_S = 0.05
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start(where: list[str]) -> subprocess.Popen[bytes]:
    """``python -m reconciler.gate`` with the catalog options ``where``, bound to our life."""
    return subprocess.Popen([sys.executable, "-m", "reconciler.gate", *where],
                            preexec_fn=_die_with_parent(os.getpid()))


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For preexec_fn: SIGTERM this child when its parent dies (Linux), even if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until the gate itself listens on ``port`` (not merely someone: a squatter accepts
    connections too); False as soon as it exits, or at the limit. With gate.workers > 1 the
    listeners are the gate's worker processes, its children."""
    import psutil

    from reconciler.observe.gather import port_holders

    deadline = clock.monotonic() + GATE_START_LIMIT_S
    while proc.poll() is None and clock.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            ours = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]
            if any(port_holders(port, likely=ours).get(pid) for pid in ours):
                return True
        clock.sleep(GATE_START_POLL_S)
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, let it drain, SIGKILL past the grace."""
    proc.terminate()
    try:
        proc.wait(timeout=clock.real_seconds(GATE_STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_listening(where: list[str], host: str, port: int) -> subprocess.Popen[bytes]:
    """``start``, then wait until it listens; Refused (with the gate's exit) if it never does."""
    proc = start(where)
    if not listening(proc, port):
        stop(proc)
        raise Refused(f"the gate could not listen on {host}:{port} (exit {proc.returncode}; "
                      "its reason is above); ailayer is not up")
    return proc
