"""Running a demo engine's HTTP server: bind or listen, stop on a signal, and the injected
"hang once ready" fault."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from reconciler.kit import clock

SHUTDOWN_GRACE_S = 2.0  # scenario seconds a SIGTERMed engine waits for in-flight requests


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so shutdown runs our cleanup and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def set_after(event: asyncio.Event, seconds: float) -> None:
    """Set ``event`` after ``seconds`` of scenario time (used for injected *-ready faults)."""
    await asyncio.sleep(clock.real_seconds(seconds))
    event.set()


def hang_middleware(hang: asyncio.Event) -> Any:
    """Once ``hang`` is set, accept connections but never answer (a wedged engine)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if hang.is_set():
            await asyncio.Event().wait()
        return await handler(request)

    return middleware


async def start_site(
    app: web.Application, where: tuple[str, int] | socket.socket, access_log_class: type[Any]
) -> web.AppRunner:
    """Serve ``app`` on ``(host, port)``, or listen on an already bound socket.

    Handler cancellation is on so a client hang-up cancels work (a generation, a load).
    """
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log_class=access_log_class,
        shutdown_timeout=clock.real_seconds(SHUTDOWN_GRACE_S),
    )
    await runner.setup()
    site = web.SockSite(runner, where) if isinstance(where, socket.socket) else web.TCPSite(runner, *where)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
