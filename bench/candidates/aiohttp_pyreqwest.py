"""Candidate: aiohttp server + pyreqwest's client (Rust reqwest/hyper on a tokio runtime)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from aiohttp import web
from common import args, run
from pyreqwest.client import ClientBuilder

ns = args()
UP = f"http://{ns.upstream}"


async def main() -> None:
    client = ClientBuilder().http1_only().pool_idle_timeout(timedelta(seconds=4)).build()

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        req = (client.request(request.method, UP + request.raw_path)
               .header("Content-Type", request.headers.get("Content-Type", "")).body_bytes(body).build())
        resp = await req.send()
        data = await resp.bytes()
        return web.Response(status=resp.status, body=bytes(data),
                            content_type=resp.headers.get("content-type", "application/json"))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ns.port, backlog=4096).start()
    await asyncio.Event().wait()


run(main(), ns.uvloop)
