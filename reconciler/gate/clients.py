"""What one client may cost the gate: silence inside a body, and the size of a body (the head
deadline is the front door's, reconciler/gate/frontdoor.py; the memory all bodies may take
together is reconciler/gate/budget.py).

Bodies are read because the gate checks the ``model`` field; streaming them through unread
would lose the 409.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from reconciler.gate.errors import Code, Refusal
from reconciler.kit import clock

# Request bodies are read whole to check the model; multimodal prompts carry base64 images.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# A body larger than this is parsed (the model check, Ollama's keep_alive pin) in a thread,
# so one big prompt never stalls every other request on the event loop.
OFFLOAD_JSON_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = bytes | bytearray  # a request body as read (in place) and passed on


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
    return Refusal(408, Code.BODY_TIMEOUT, f"the request body stalled for {idle_s:g} s (gate.client_body_idle_s)")


def _too_large() -> Refusal:
    return Refusal(413, Code.BODY_TOO_LARGE, f"request bodies are limited to {MAX_REQUEST_BYTES >> 20} MiB")


async def off_loop(body: Body, work: Callable[[Body], Any]) -> Any:
    """``work(body)`` here for small bodies, in a thread for large ones."""
    if len(body) > OFFLOAD_JSON_BYTES:
        return await asyncio.to_thread(work, body)
    return work(body)
