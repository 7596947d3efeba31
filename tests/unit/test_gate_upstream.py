"""The gate's client to the engine (reconciler/gate/upstream.py) against scripted loopback servers.

Each server answers with bytes written here, so the cases the gate must survive (a pooled
connection the engine closed, a smuggling-shaped answer, a silent engine, a stream faster than
the client) are exact. The end-to-end behaviour through real engines is tests/e2e/test_gate.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from reconciler.gate import upstream

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
# Waits in these tests are deadlines for things that happen in microseconds on loopback.
DEADLINE_S = 5.0


async def _request_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def _serve(script: Script) -> tuple[asyncio.Server, int, list[int]]:
    conns: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


def _pool(read_s: float | None = DEADLINE_S) -> upstream.Pool:
    return upstream.Pool(connect_s=DEADLINE_S, read_s=read_s, keepalive_s=DEADLINE_S)


async def _get(pool: upstream.Pool, port: int, fresh: bool = False) -> tuple[int, bytes]:
    async with await pool.request("POST", "127.0.0.1", port, "/v1/x", [("Content-Type", "application/json")],
                                  b'{"a":1}', fresh=fresh) as resp:
        return resp.status, await resp.read()


def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request() -> None:
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await _request_head(reader))
            writer.write(OK)

    async def main() -> None:
        server, port, conns = await _serve(script)
        pool = _pool()
        assert [await _get(pool, port) for _ in range(3)] == [(200, b"{}")] * 3
        assert len(conns) == 1
        pool.close()
        server.close()

    asyncio.run(main())
    assert heads[0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 7\r\n" in heads[0] and b"Content-Type: application/json\r\n" in heads[0]


def test_a_pooled_connection_the_engine_closed_is_a_disconnect_before_any_answer() -> None:
    """llama.cpp's case: it said keep-alive, then closed as the next request went out. One the
    engine closed while idle is skipped; one closed under the request is Disconnected with
    nothing answered, which the gate resends once on a fresh connection."""
    served = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _request_head(reader)
        served += 1
        if served == 1:
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.05)  # closed while idle
            return
        if served == 2:
            writer.write(OK)
            await writer.drain()
            await _request_head(reader)  # the next request arrives, and the engine hangs up
            return
        writer.write(OK)

    async def main() -> None:
        server, port, conns = await _serve(script)
        pool = _pool()
        assert await _get(pool, port) == (200, b"{}")
        await asyncio.sleep(0.2)
        assert await _get(pool, port) == (200, b"{}")  # the idle-closed one was skipped
        with pytest.raises(upstream.Disconnected) as err:
            await _get(pool, port)
        assert err.value.answered is False
        assert await _get(pool, port, fresh=True) == (200, b"{}")
        assert len(conns) == 3
        pool.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nX: a\nb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
])
def test_ambiguous_or_malformed_answers_are_refused_and_never_reused(answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request_head(reader)
            writer.write(answer)

    async def main() -> None:
        server, port, conns = await _serve(script)
        pool = _pool()
        for _ in range(2):
            with pytest.raises(upstream.BadResponse):
                await _get(pool, port)
        assert len(conns) == 2  # a fresh connection each time
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_fast_stream_is_not_buffered_past_the_high_water_mark() -> None:
    written = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        for _ in range(4096):  # 16 MiB, far past every buffer on the way
            writer.write(b"1000\r\n" + chunk + b"\r\n")
            await writer.drain()
            written += len(chunk)
        writer.write(b"0\r\n\r\n")

    async def main() -> None:
        server, port, _ = await _serve(script)
        pool = _pool()
        resp = await pool.request("GET", "127.0.0.1", port, "/", [], b"")
        async with resp:
            await asyncio.sleep(0.5)  # the reader does not read: the engine must be held back
            conn = resp._conn
            assert conn.paused and conn.buffered <= upstream.HIGH_WATER + 65536
            assert written < 16 << 20
            total = len(await resp.read())
        assert total == 16 << 20
        pool.close()
        server.close()

    asyncio.run(main())


def test_leaving_a_response_early_closes_the_engine_connection() -> None:
    closed = asyncio.Event

    async def main() -> None:
        seen_eof = closed()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"7\r\ndata: 1\r\n")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1), DEADLINE_S)  # b"": the gate hung up
                seen_eof.set()
            except TimeoutError:
                pass

        server, port, _ = await _serve(script)
        pool = _pool()
        async with await pool.request("POST", "127.0.0.1", port, "/", [], b"{}") as resp:
            assert await resp.chunk() == b"data: 1"  # then the client went away
        await asyncio.wait_for(seen_eof.wait(), DEADLINE_S)
        pool.close()
        server.close()

    asyncio.run(main())


def test_silence_past_the_read_timeout_and_a_refused_connect() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        await asyncio.sleep(DEADLINE_S)

    async def main() -> None:
        server, port, _ = await _serve(script)
        with pytest.raises(upstream.ReadTimeout):
            await _get(_pool(read_s=0.2), port)
        server.close()
        await server.wait_closed()
        with pytest.raises(upstream.ConnectFailed):
            await _get(_pool(), port)

    asyncio.run(main())


def test_interim_answers_bodyless_answers_and_bodies_ended_by_close() -> None:
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    ]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            await _request_head(reader)
            answer = answers.pop(0)
            writer.write(answer)
            if b"close" in answer:
                return

    async def main() -> None:
        server, port, _ = await _serve(script)
        pool = _pool()
        assert await _get(pool, port) == (200, b"ok")
        assert await _get(pool, port) == (204, b"")
        assert await _get(pool, port) == (200, b"until the end")
        pool.close()
        server.close()

    asyncio.run(main())


def test_the_read_timeout_counts_silence_inside_a_body_not_the_body_s_length() -> None:
    """A stream whose chunks come more often than the read timeout lasts as long as it likes;
    one that falls silent mid-body ends with ReadTimeout."""

    async def steady(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 0.8 s in all, a chunk every 0.1 s
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(DEADLINE_S)  # silent from here, as the next test's engine is

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        await writer.drain()
        await asyncio.sleep(DEADLINE_S)

    async def main() -> None:
        server, port, _ = await _serve(steady)
        pool = _pool(read_s=0.3)
        async with await pool.request("GET", "127.0.0.1", port, "/", [], b"") as resp:
            assert await resp.read() == b"x" * 8
        server.close()
        server, port, _ = await _serve(stalls)
        async with await pool.request("GET", "127.0.0.1", port, "/", [], b"") as resp:
            got = []
            started = asyncio.get_running_loop().time()
            with pytest.raises(upstream.ReadTimeout):
                while (chunk := await resp.chunk()) is not None:
                    got.append(chunk)
            assert got == [b"x"] and asyncio.get_running_loop().time() - started < DEADLINE_S
        pool.close()
        server.close()

    asyncio.run(main())
