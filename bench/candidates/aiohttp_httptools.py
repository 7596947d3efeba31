"""Candidate: aiohttp server + a thin keep-alive pool over httptools (llhttp) as the client.

A prototype for measuring only: no timeouts, no backpressure, no retry; whole bodies only.
"""

from __future__ import annotations

import asyncio

import httptools
from aiohttp import web
from common import args, run

ns = args()
HOST, PORT = ns.upstream.rsplit(":", 1)


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.done: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep = False
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))

    async def request(self, head: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.body, self.headers = [], []
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(head + body)
        return await self.done


POOL: list[Conn] = []


async def get() -> Conn:
    while POOL:
        conn = POOL.pop()
        if conn.keep and conn.transport is not None and not conn.transport.is_closing():
            return conn
    _, conn = await asyncio.get_running_loop().create_connection(Conn, HOST, int(PORT))
    return conn


async def main() -> None:
    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        head = (f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {ns.upstream}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        conn = await get()
        status, _headers, data = await conn.request(head, body)
        if conn.keep:
            POOL.append(conn)
        return web.Response(status=status, body=data, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ns.port, backlog=4096).start()
    await asyncio.Event().wait()


run(main(), ns.uvloop)
