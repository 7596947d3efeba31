"""The gate's HTTP/1.1 client to the engine: a keep-alive connection pool over llhttp's parser.

Why not aiohttp's ClientSession: issue 14 measured it at about 115 µs of CPU per proxied small
request, over half of the gate's cost; bench/gate_throughput.py measured aiohttp's server with
this pool at 52 µs per request against 159 µs with aiohttp's client (docs/PERFORMANCE.md has
the table). The response is parsed by httptools, the binding of llhttp (Node.js's parser, the
one aiohttp's own C parser is built on); nothing here parses HTTP by hand. The request head is
written here: the method and target come from aiohttp's parser, the headers are the client's
minus hop-by-hop ones (checked for CR/LF anyway), the length is ours. The front door
(reconciler/gate/frontdoor.py) uses the same connections without a coroutine: it becomes the
connection's ``Sink`` and is called back on each event.

What it keeps from the aiohttp client it replaces:
* **backpressure**: at most ``HIGH_WATER`` bytes of a response are buffered; past it the
  socket is no longer read until the gate has written them on, so a slow client slows the
  engine's stream through TCP instead of filling memory;
* **cancellation**: a response given up before its end (client gone, switch, error) closes
  the engine connection (``abort``), which is how an engine learns to stop generating;
* **one retry on a dead pooled connection** (``Disconnected`` before any answer): the caller
  sends once more on a fresh connection (llama.cpp closes after a stream while saying
  keep-alive);
* **strict framing**: llhttp refuses Content-Length with Transfer-Encoding, duplicate lengths,
  bare LF, bad chunk sizes; such a response is ``BadResponse`` and its connection is dropped,
  never reused. A response body without a length ends at the connection's close and the
  connection is not reused;
* **timeouts**: connect (``gate.connect_timeout_s``) and the longest silence while waiting for
  the answer or inside it (``gate.read_timeout_s``; None: no limit); idle pooled connections
  are used only within ``keepalive_s`` of their last answer (below the engines' own idle
  timeout, so we never send on one the engine is closing).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import httptools

# Past this many buffered response bytes the engine's socket is not read until the gate has
# written them on (aiohttp's client pauses at 64 KiB too).
HIGH_WATER = 1 << 16
_BODYLESS = frozenset({204, 304})
# A request body up to this size is sent in the same write as the head (one syscall).
_JOIN_MAX = 1 << 16


class UpstreamError(Exception):
    """The engine's side of a request failed."""


class ConnectFailed(UpstreamError):
    """Nothing accepted the connection (refused, unreachable, or connect timed out)."""


class Disconnected(UpstreamError):
    """The engine closed the connection before its answer was complete."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered  # False: closed before any byte of an answer (safe to resend)


class ReadTimeout(UpstreamError):
    """The engine was silent for longer than the read timeout (not a TimeoutError: a compiled
    class derives from one built-in exception at most)."""


class BadResponse(UpstreamError):
    """The engine's bytes are not a valid HTTP/1.1 response."""


class Sink(Protocol):
    """Who is told of every event on a connection instead of a waiting coroutine: the front
    door's callback-driven requests (reconciler/gate/frontdoor.py)."""

    def wake(self) -> None: ...

    def take(self, body: bytes) -> bool:
        """A piece of the body as it is parsed: True if taken (relayed or kept), False to
        leave it buffered on the connection until the next ``wake``."""

    def engine_paced(self) -> bool:
        """True while the engine is not being read because the client is slow (no timeout)."""


class Connection(asyncio.Protocol):
    """One connection to an engine, with the state of the response being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        parser = self.parser = httptools.HttpResponseParser(self)
        # The parser's methods each response calls, bound once (as the transport's write).
        self.feed: Callable[[bytes], None] = parser.feed_data
        self.status_code: Callable[[], int] = parser.get_status_code
        self.keep_alive: Callable[[], bool] = parser.should_keep_alive
        self.closed = False
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()
        self.now: Callable[[], float] = self.loop.time  # bound once: called on every read
        self.send: Callable[[bytes], object] | None = None  # the transport's write, bound once
        self.quiet_since = 0.0  # the last data, or the start of the current wait if later
        self.timer: asyncio.TimerHandle | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self._reset()

    def _reset(self) -> None:
        # The read timer is kept from one response to the next (arming one per request was a
        # measurable part of a small request's cost): when it fires it looks at this response.
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []  # as received; decoded only where needed
        self.head = False  # the final (non-1xx) head is complete
        self.complete = False
        self.keep = False
        self.answered = False  # any byte of the answer arrived
        self.chunks.clear()
        self.buffered = 0
        self.paused = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Sink | None = None
        self.bodyless = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.transport = stream
        self.send = stream.write

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.quiet_since = self.now()
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the engine switched protocols; not proxied"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP response from the engine: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head and not self.complete and self._until_close():
            self.complete = True  # a body delimited by the connection's close
            self.keep = False
        elif not self.complete and self.error is None:
            self.error = Disconnected(f"the engine closed the connection{f': {exc}' if exc else ''}",
                                      self.answered)
        self._wake()

    def pause_writing(self) -> None:  # the request body is written whole; the kernel paces it
        pass

    def resume_writing(self) -> None:
        pass

    # ------------------------------------------------------------------ llhttp callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.status_code()
        if 100 <= status < 200:  # an interim answer: the final one follows
            self.headers, self.reason = [], b""
            return
        self.status = status
        self.head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and sink.take(body):
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head:
            return  # the end of a 1xx
        self.complete = True
        self.keep = self.keep_alive()
        self._wake()

    # ------------------------------------------------------------------ helpers

    def _until_close(self) -> bool:
        names = {k.lower() for k, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def drain(self) -> bytes:
        """All the body buffered so far, as one piece; reading resumes if it had paused."""
        chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        if self.sink is not None:
            self.sink.wake()
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    async def wait(self, timeout_s: float | None) -> None:
        """Until the next event on this connection (data, end, error), at most ``timeout_s``."""
        loop = self.loop
        self.quiet_since = loop.time()
        waiter = self.waiter = loop.create_future()
        # One timer per response, not one per wait (this runs once per chunk of a stream): when
        # it fires it looks how long the engine has really been quiet, and re-arms if not long.
        if timeout_s is not None and self.timer is None:
            self.timer = loop.call_at(self.quiet_since + timeout_s, self._check_quiet, timeout_s)
        try:
            await waiter
        finally:
            self.waiter = None

    def watch(self, sink: Sink, timeout_s: float | None) -> None:
        """Tell ``sink`` of every event from now on; fail the response after ``timeout_s`` of
        the engine's silence (not counting while the sink holds the engine back)."""
        self.sink = sink
        self.quiet_since = self.now()
        if timeout_s is not None and self.timer is None:
            self.timer = self.loop.call_at(self.quiet_since + timeout_s, self._check_quiet, timeout_s)

    def _check_quiet(self, timeout_s: float) -> None:
        self.timer = None
        sink = self.sink
        if sink is not None:
            now = self.loop.time()
            if sink.engine_paced():
                self.quiet_since = now
            elif now >= self.quiet_since + timeout_s:
                self._fail(ReadTimeout(f"the engine was silent for {timeout_s:g} s (gate.read_timeout_s)"))
                return
            self.timer = self.loop.call_at(self.quiet_since + timeout_s, self._check_quiet, timeout_s)
            return
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # not waiting now: the next wait arms the timer again
        due = self.quiet_since + timeout_s
        if self.loop.time() >= due:
            waiter.set_exception(ReadTimeout(f"the engine was silent for {timeout_s:g} s (gate.read_timeout_s)"))
        else:
            self.timer = self.loop.call_at(due, self._check_quiet, timeout_s)


class Response:
    """An engine's answer: status, reason and headers at once; the body as it arrives.

    Use as an async context manager: leaving it before the body's end closes the connection
    (the engine stops); after a complete keep-alive answer the connection goes back to the pool.
    """

    def __init__(self, pool: Pool, key: tuple[str, int], conn: Connection, read_s: float | None) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self._read_s = read_s
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.headers]

    def header(self, name: str, default: str = "") -> str:
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return default

    @property
    def content_length(self) -> int | None:
        if self._conn.bodyless:
            return 0
        raw = self.header("Content-Length")
        return int(raw) if raw.isdigit() else None  # llhttp refused any other form

    async def chunk(self) -> bytes | None:
        """The next piece of the body (all that is buffered at once); None at its end. A method,
        not an async generator: the compiled module has none (mypyc does not implement them)."""
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.drain()
            if conn.complete or conn.bodyless:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._read_s)

    async def read(self) -> bytes:
        parts = []
        while (piece := await self.chunk()) is not None:
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pool.give_back(self._key, self._conn)


class Pool:
    """Keep-alive connections per engine address; no cap (the engine's own queue decides)."""

    def __init__(self, connect_s: float, read_s: float | None, keepalive_s: float) -> None:
        self._connect_s = connect_s
        self._read_s = read_s
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def request(self, method: str, host: str, port: int, target: str,
                      headers: Iterable[tuple[str, str]], body: bytes | bytearray | memoryview,
                      fresh: bool = False) -> Response:
        """Send one request and wait for the answer's head. ``fresh``: not on a pooled connection."""
        key = (host, port)
        conn = None if fresh else self.take(key)
        if conn is None:
            conn = await self.connect(host, port)
        try:
            assert conn.transport is not None
            head = _head(method, host, port, target, headers, body)
            if len(body) <= _JOIN_MAX:
                conn.transport.write(head + body)  # one send for the common small request
            else:
                conn.transport.write(head)
                conn.transport.write(body)
            while not conn.head:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(self._read_s)
            conn.bodyless = method == "HEAD" or conn.status in _BODYLESS
            return Response(self, key, conn, self._read_s)
        except BaseException:
            conn.abort()  # cancelled, timed out or failed: the engine sees the request end
            raise

    def take(self, key: tuple[str, int]) -> Connection | None:
        """An idle pooled connection to ``key`` that is still fresh, if any."""
        idle = self._idle.get(key)
        oldest = time.monotonic() - self._keepalive_s
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= oldest:
                conn._reset()
                return conn
            conn.abort()
        return None

    async def connect(self, host: str, port: int) -> Connection:
        """A new connection (ConnectFailed if nothing accepts it within the connect timeout)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_s):
                _, conn = await loop.create_connection(Connection, host, port)
        except TimeoutError:
            raise ConnectFailed(f"connecting to {host}:{port} took over {self._connect_s:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def give_back(self, key: tuple[str, int], conn: Connection) -> None:
        """A connection done with: pooled again after a complete keep-alive answer whose body
        was all read, closed otherwise (the engine sees a request given up end)."""
        if (conn.complete or conn.bodyless) and conn.keep and conn.error is None and not conn.closed \
                and not conn.chunks:
            self._release(key, conn)
        else:
            conn.abort()

    def _release(self, key: tuple[str, int], conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        oldest = conn.idle_since - self._keepalive_s
        while idle and (idle[0].closed or idle[0].idle_since < oldest):
            idle.pop(0).abort()
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()


def _head(method: str, host: str, port: int, target: str, headers: Iterable[tuple[str, str]],
          body: bytes | bytearray | memoryview) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            continue  # aiohttp's parser never lets one through; never splice a header
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
