"""Candidate: an ASGI app (served by uvicorn+httptools or granian) with aiohttp's client."""

from __future__ import annotations

from typing import Any

import aiohttp

UP = ""
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                         skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    async with _session.request(scope["method"], UP + scope["path"], data=body,
                                headers={"Content-Type": "application/json"}) as up:
        data = await up.read()
        await send({"type": "http.response.start", "status": up.status,
                    "headers": [(b"content-type", up.headers.get("Content-Type", "").encode()),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
