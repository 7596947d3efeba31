"""A streaming upstream for bench/gate_throughput.py that cannot be the limit.

    python bench/stream_upstream.py --port P --tokens 100 --token-ms 10

Every POST gets an SSE answer of ``--tokens`` OpenAI-style chunks, chunked transfer encoding,
one chunk per token, then ``data: [DONE]``. Tokens are paced like a batching engine's steps:
one ticker every ``--token-ms`` writes the next token of every open stream, each as its own
``write`` on its own connection, so the proxy in front receives one small segment per token
per stream, as it does from vLLM. ``GET /count`` answers the number of tokens written so far
(the bench reads it before and after a run: tokens per run come from here, not from the
load generator, which misses streams cut at the end of its run).

Why not nginx: it cannot pace a body. Why not the demo engine: it is an aiohttp server, and
at 25,000 tokens/s its per-write cost would take most of the load core. This one is uvloop
(when installed) plus httptools, llhttp's parser, for the request head; per token it does
one ``transport.write`` of a pre-built chunk, a few microseconds. ``GET /count`` also reports
its own CPU seconds, so the bench shows how much of its core it used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource

import httptools

CHUNK = (
    'data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"stream",'
    '"choices":[{{"index":0,"delta":{{"content":"tok{i} "}},"finish_reason":null}}]}}\n\n'
)
DONE = "data: [DONE]\n\n"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


def _frame(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    def __init__(self, tokens: int, token_s: float) -> None:
        self.frames = [_frame(CHUNK.format(i=i)) for i in range(tokens)] + [_frame(DONE) + b"0\r\n\r\n"]
        self.token_s = token_s
        self.streams: dict[StreamProto, int] = {}
        self.written = 0

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.token_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            last = len(self.frames) - 1
            for proto, pos in list(self.streams.items()):
                if proto.transport is None or proto.transport.is_closing():
                    del self.streams[proto]
                    continue
                proto.transport.write(self.frames[pos])
                if pos < last:
                    self.written += 1
                    self.streams[proto] = pos + 1
                else:
                    del self.streams[proto]
                    proto.busy = False


class StreamProto(asyncio.Protocol):
    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        url, self.url = self.url, b""
        if self.parser.get_method() == b"GET" and url.startswith(b"/count"):
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            body = json.dumps({"tokens": self.up.written, "cpu_s": cpu.ru_utime + cpu.ru_stime,
                               "open": len(self.up.streams)}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        self.transport.write(HEAD)
        self.busy = True
        self.up.streams[self] = 0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--token-ms", type=float, default=10.0)
    ns = parser.parse_args()
    up = Upstream(ns.tokens, ns.token_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StreamProto(up), "127.0.0.1", ns.port, backlog=4096)
    print(f"stream upstream on {ns.port} pid {os.getpid()}", flush=True)
    ticker = asyncio.create_task(up.tick())
    try:
        await server.serve_forever()
    finally:
        ticker.cancel()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
