"""How a running ``up`` or ``reconcile`` is told to stop: SIGINT and SIGTERM stop the loop;
``ailayer down``'s signal (``stopper.DOWN_SIGNAL``) also has it stop the engines."""

from __future__ import annotations

import signal
import threading

from reconciler.act import stopper


def on_signals(stop: threading.Event, wake: threading.Event) -> threading.Event:
    """Set ``stop`` and ``wake`` on any of them; returns the event that says ``down`` asked."""
    down_asked = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if signum == stopper.DOWN_SIGNAL:
            down_asked.set()
        stop.set()
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM, stopper.DOWN_SIGNAL):
        signal.signal(sig, handler)
    return down_asked
