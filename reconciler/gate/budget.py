"""The share of memory that buffered request bodies may take, across all requests.

aiohttp's server reads a body whole without a memory bound across requests: eight
concurrent 60 MiB bodies took the gate from 238 to 945 MiB. Its own module so that it is
compiled with the front door (reconciler/gate/compiled.py): every plain request takes and
gives back its share.
"""

from __future__ import annotations

import asyncio

from reconciler.gate.errors import Code, Refusal
from reconciler.kit import clock

# All bodies being read or sent upstream at once. A request whose body does not fit waits
# for room (the client's upload stalls, TCP pushes back), then gets 503.
BODY_BUDGET_BYTES = 128 * 1024 * 1024
BODY_BUDGET_WAIT_S = 30.0
RETRY_BODY_BUDGET_S = 2.0


class BodyBudget:
    """Bytes of request bodies held at once, across all requests."""

    def __init__(self, limit: int = BODY_BUDGET_BYTES) -> None:
        self.limit = limit
        self.free = limit
        self.waiting = 0  # requests queued for room
        self._notifiers: set[asyncio.Task[None]] = set()
        self.room = asyncio.Condition()

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes at once if there is room and nobody queues; ``give`` them back."""
        size = min(size, self.limit)
        if self.free >= size and not self.waiting:
            self.free -= size
            return True
        return False

    def give(self, size: int) -> None:
        self.free += min(size, self.limit)
        if self.waiting:
            task = asyncio.get_running_loop().create_task(self._notify())
            self._notifiers.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        async with self.room:
            self.room.notify_all()

    def hold(self, size: int) -> Hold:
        """``async with budget.hold(size) as room``: ``room`` is False if none came within
        BODY_BUDGET_WAIT_S; the bytes are given back when the block ends."""
        return Hold(self, min(size, self.limit))


class Hold:
    """One reservation as an async context manager (a class: the compiled module can have no
    generator-based one)."""

    def __init__(self, budget: BodyBudget, size: int) -> None:
        self.budget = budget
        self.size = size
        self.held = False

    async def __aenter__(self) -> bool:
        budget, size = self.budget, self.size
        # Room at once (nobody queued): no lock, no timer. Nothing awaits between the check and
        # the take, so it is atomic on the event loop.
        if not budget.take(size):
            budget.waiting += 1
            try:
                async with asyncio.timeout(clock.real_seconds(BODY_BUDGET_WAIT_S)), budget.room:
                    await budget.room.wait_for(lambda: budget.free >= size)
                    budget.free -= size
            except TimeoutError:
                return False
            finally:
                budget.waiting -= 1
        self.held = True
        return True

    async def __aexit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            self.budget.give(self.size)


def too_busy() -> Refusal:
    return Refusal(503, Code.GATE_BUSY, "too many large request bodies in flight; retry shortly",
                   RETRY_BODY_BUDGET_S)
