"""The warm-up request: it makes Ollama load the model (an act, so not in observe/).

Ollama before 0.32.4 lists a model in /api/ps as soon as its runner starts; only the
warm-up's answer says the load finished, so the planner waits for it (docs/ENGINES.md).
"""

from __future__ import annotations

import threading

from reconciler.domain.catalog import Engine
from reconciler.domain.facts import WarmupPhase, WarmupState
from reconciler.kit import clock
from reconciler.kit.logs import ActivityLog
from reconciler.kit.loopback import ERRORS, describe, request


def send(engine: Engine, timeout_s: float) -> WarmupState:
    """Send the engine's warm-up request; DONE or FAILED with why. Blocks up to ``timeout_s``."""
    warm = engine.ready.warmup
    if warm is None:
        return WarmupState(WarmupPhase.DONE)
    try:
        status, body = request(engine.url(warm.url), timeout_s, warm.method, warm.json)
    except ERRORS as exc:
        return WarmupState(WarmupPhase.FAILED, describe(exc))
    if 200 <= status < 300:
        return WarmupState(WarmupPhase.DONE)
    return WarmupState(WarmupPhase.FAILED, f"HTTP {status} {body[:200].decode('utf-8', 'replace').strip()}")


class Warmups:
    """The warm-ups sent, one thread each: Ollama's preload can take as long as the boot
    budget allows, and no pass may wait for it."""

    def __init__(self, log: ActivityLog) -> None:
        self.log = log
        self._states: dict[str, WarmupState] = {}
        self._lock = threading.Lock()

    def start(self, engine: Engine, instance: str) -> None:
        with self._lock:
            self._states[instance] = WarmupState(WarmupPhase.PENDING)

        def wait_for_answer() -> None:
            result = send(engine, clock.real_seconds(engine.boot_timeout_s))
            with self._lock:
                self._states[instance] = result
            self.log.event(f"warm-up of {engine.name}: {result}")

        threading.Thread(target=wait_for_answer, name=f"warmup-{instance}", daemon=True).start()

    def states(self) -> dict[str, WarmupState]:
        """instance -> its warm-up, as of now."""
        with self._lock:
            return dict(self._states)
