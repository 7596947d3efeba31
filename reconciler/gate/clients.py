"""What one client may cost the gate: silence inside a body, and a share of the memory that
buffered bodies take (the head deadline is the front door's, reconciler/gate/fastpath.py).

aiohttp's server reads a body whole without a memory bound across requests: eight
concurrent 60 MiB bodies took the gate from 238 to 945 MiB. Bodies are read because the gate checks the ``model``
field; streaming them through unread would lose the 409.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from reconciler.gate.errors import Refusal
from reconciler.kit import clock

# Request bodies are read whole to check the model; multimodal prompts carry base64 images.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# All bodies being read or sent upstream at once. A request whose body does not fit waits
# for room (the client's upload stalls, TCP pushes back), then gets 503.
BODY_BUDGET_BYTES = 128 * 1024 * 1024
BODY_BUDGET_WAIT_S = 30.0
RETRY_BODY_BUDGET_S = 2.0
# A body larger than this is parsed (the model check, Ollama's keep_alive pin) in a thread,
# so one big prompt never stalls every other request on the event loop.
OFFLOAD_JSON_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = bytes | bytearray  # a request body as read (in place) and passed on


class BodyBudget:
    """Bytes of request bodies held at once, across all requests."""

    def __init__(self, limit: int = BODY_BUDGET_BYTES) -> None:
        self.limit = limit
        self.free = limit
        self._waiting = 0  # requests queued for room
        self._notifiers: set[asyncio.Task[None]] = set()
        self._room = asyncio.Condition()

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes at once if there is room and nobody queues; ``give`` them back."""
        size = min(size, self.limit)
        if self.free >= size and not self._waiting:
            self.free -= size
            return True
        return False

    def give(self, size: int) -> None:
        self.free += min(size, self.limit)
        if self._waiting:
            task = asyncio.get_running_loop().create_task(self._notify())
            self._notifiers.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[bool]:
        """Reserve ``size`` bytes; yields False if no room came within BODY_BUDGET_WAIT_S."""
        size = min(size, self.limit)
        if self.free >= size and not self._waiting:
            # The common case (room, nobody queued): no lock, no timer. Nothing awaits between
            # the check and the take, so this is atomic on the event loop.
            self.free -= size
            try:
                yield True
            finally:
                self.free += size
                if self._waiting:
                    async with self._room:
                        self._room.notify_all()
            return
        self._waiting += 1
        try:
            async with asyncio.timeout(clock.real_seconds(BODY_BUDGET_WAIT_S)), self._room:
                await self._room.wait_for(lambda: self.free >= size)
                self.free -= size
        except TimeoutError:
            yield False
            return
        finally:
            self._waiting -= 1
        try:
            yield True
        finally:
            async with self._room:
                self.free += size
                self._room.notify_all()


def too_busy() -> Refusal:
    return Refusal(503, "gate_busy", "too many large request bodies in flight; retry shortly",
                   RETRY_BODY_BUDGET_S)


def body_size(request: web.Request) -> int:
    """What to reserve: the declared length, or the cap for a chunked body."""
    if not request.body_exists:
        return 0
    return request.content_length if request.content_length is not None else MAX_REQUEST_BYTES


async def read_body(request: web.Request, idle_s: float) -> Body | Refusal:
    """The whole body, with a size cap and at most ``idle_s`` of silence between its chunks."""
    if not request.body_exists:
        return b""
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        return _too_large()
    if request.content.is_eof() and (request.content_length or 0) <= OFFLOAD_JSON_BYTES:
        # Already all here (a small body arrives with its head): no timer per chunk.
        whole = await request.content.read()
        return _too_large() if len(whole) > MAX_REQUEST_BYTES else whole
    # One buffer of the declared size, filled in place: joining chunks would hold the body
    # twice at its peak.
    body = bytearray(request.content_length or 0)
    view, total = memoryview(body), 0
    while True:
        try:
            async with asyncio.timeout(clock.real_seconds(idle_s)):
                chunk = await request.content.readany()
        except TimeoutError:
            return body_stalled(idle_s)
        if not chunk:
            view.release()
            return body
        end = total + len(chunk)
        if end > MAX_REQUEST_BYTES:
            return _too_large()
        if end <= len(view):
            view[total:end] = chunk
        else:  # chunked, or longer than declared (aiohttp enforces Content-Length)
            view.release()
            body[total:] = chunk
            view = memoryview(body)
        total = end


def body_stalled(idle_s: float) -> Refusal:
    return Refusal(408, "body_timeout", f"the request body stalled for {idle_s:g} s (gate.client_body_idle_s)")


def _too_large() -> Refusal:
    return Refusal(413, "body_too_large", f"request bodies are limited to {MAX_REQUEST_BYTES >> 20} MiB")


async def off_loop(body: Body, work: Callable[[Body], Any]) -> Any:
    """``work(body)`` here for small bodies, in a thread for large ones."""
    if len(body) > OFFLOAD_JSON_BYTES:
        return await asyncio.to_thread(work, body)
    return work(body)
