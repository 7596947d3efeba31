"""Candidate: aiohttp server + rnet's client (Rust, wreq/hyper on a tokio runtime)."""

from __future__ import annotations

import asyncio

import rnet
from aiohttp import web
from common import args, run

ns = args()
UP = f"http://{ns.upstream}"


async def main() -> None:
    client = rnet.Client()

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        resp = await client.request(rnet.Method.POST, UP + request.raw_path, body=body,
                                    headers={"Content-Type": request.headers.get("Content-Type", "")})
        data = await resp.bytes()
        return web.Response(status=resp.status_code.as_int(),
                            body=bytes(data), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ns.port, backlog=4096).start()
    await asyncio.Event().wait()


run(main(), ns.uvloop)
