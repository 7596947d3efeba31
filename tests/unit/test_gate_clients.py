"""The gate's per-client limits that need no server: the body budget and off-loop parsing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from reconciler.gate import budget as body_budget
from reconciler.gate import clients


def test_bodies_over_the_budget_wait_for_room_and_then_proceed() -> None:
    async def scenario() -> list[str]:
        budget, order = body_budget.BodyBudget(limit=100), []

        async def upload(name: str, size: int, hold_s: float) -> None:
            async with budget.hold(size) as room:
                assert room
                order.append(f"{name} in")
                await asyncio.sleep(hold_s)
            order.append(f"{name} out")

        first = asyncio.create_task(upload("a", 60, 0.05))
        await asyncio.sleep(0)  # a holds 60 of 100
        await asyncio.gather(first, upload("b", 60, 0))
        assert budget.free == budget.limit
        return order

    assert asyncio.run(scenario()) == ["a in", "a out", "b in", "b out"]


def test_a_body_that_finds_no_room_in_time_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_budget, "BODY_BUDGET_WAIT_S", 0.05)

    async def scenario() -> bool:
        budget = body_budget.BodyBudget(limit=100)
        async with budget.hold(100), budget.hold(1) as room:
            return room

    assert asyncio.run(scenario()) is False


def test_a_body_larger_than_the_budget_reserves_all_of_it_rather_than_waiting_forever() -> None:
    async def scenario() -> bool:
        async with body_budget.BodyBudget(limit=100).hold(10_000) as room:
            return room

    assert asyncio.run(scenario()) is True


def test_large_bodies_are_parsed_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()

    async def scenario() -> tuple[int, int]:
        small = await clients.off_loop(b"{}", lambda _: threading.get_ident())
        large = await clients.off_loop(b" " * (clients.OFFLOAD_JSON_BYTES + 1), lambda _: threading.get_ident())
        return small, large

    small, large = asyncio.run(scenario())
    assert small == loop_thread and large != loop_thread
