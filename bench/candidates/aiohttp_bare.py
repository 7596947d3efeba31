"""Candidate: aiohttp server + aiohttp ClientSession, nothing else (the floor of today's design)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from common import args, run

ns = args()
UP = f"http://{ns.upstream}"


async def main() -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.request(request.method, UP + request.raw_path, data=body,
                                   headers={"Content-Type": request.headers.get("Content-Type", "")}) as up:
            data = await up.read()
            return web.Response(status=up.status, body=data, content_type=up.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ns.port, backlog=4096).start()
    await asyncio.Event().wait()


run(main(), ns.uvloop)
