"""The gate's front door: every connection's bytes are parsed by llhttp here first.

Why (issue 14, bench/gate_throughput.py): with aiohttp's server in front, a proxied small
request cost ~110 µs of CPU against nginx's ~11, and ~60 µs of that was aiohttp's request
machinery (a task, a request object, a response object per request). The hot routes are
served here instead, without a coroutine per request: httptools (llhttp, Node's parser)
parses the client's request, the upstream pool's connection (reconciler/gate/upstream.py)
parses the engine's answer, and callbacks move the bytes between them. This module is compiled
with mypyc at install (reconciler/gate/compiled.py).

A request takes this path only when it is plain: HTTP/1.1, an inference route of fixed
path (``INFERENCE_ROUTES``), a Host we serve, a Content-Length body of at most
``FAST_BODY_MAX`` bytes, and no Expect, Upgrade, Transfer-Encoding or Connection options
beyond keep-alive/close. Every other request — other routes, the dashboard, /status, SSE,
chunked or large bodies, dot segments — and every later request on its connection goes to
aiohttp's own protocol on the same socket: the requests are re-serialised from what llhttp
parsed (method, target, version, headers as received; bodies re-chunked when chunked), so
aiohttp sees canonical HTTP/1.1 and nothing here parses HTTP by hand.

Both paths judge and end a request by the same rules (reconciler/gate/rules.py: the trusted
engine URL, the model check, Ollama's keep_alive pin, the answer for a failed engine, a switch
ending the request, how a begun answer is ended), and one table of requests runs through both
(tests/e2e/test_request_rules.py). What only a connection's side can do is done here the way
aiohttp does it there: the head deadline (``gate.client_header_timeout_s``), the body idle
timeout (408), the keep-alive idle close, backpressure both ways, the same metrics
(tests/e2e/test_front_door.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import enum
import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import NamedTuple

import httptools

from reconciler.domain.catalog import GateConfig
from reconciler.domain.status import Phase
from reconciler.gate import errors, upstream
from reconciler.gate.admission import admit
from reconciler.gate.bodies import names_served, pin_keep_alive
from reconciler.gate.budget import BodyBudget
from reconciler.gate.clients import body_stalled
from reconciler.gate.errors import NO_BUFFERING, Code, Refusal
from reconciler.gate.hosts import HostPolicy
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.rules import (
    DROP_RESPONSE,
    KEEP_ALIVE_ROUTES,
    SEND_ATTEMPTS,
    STREAM_TYPES,
    WHOLE_BODY_MAX,
    Ending,
    Rules,
    Tracked,
    ending,
    engine_failed,
)
from reconciler.gate.statefollow import Snapshot, StateFollower, Target
from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

# Request bodies up to this size are served by the front door (chat prompts are a few KiB); larger ones
# go to aiohttp's path, which reads them in place under the shared body budget.
FAST_BODY_MAX = 1 << 16
# A request head (request line and headers) may not grow past this while it arrives: llhttp
# and httptools buffer an unfinished head without a bound, and aiohttp (which refused lines
# over 8,190 bytes) sees a head only once it is complete. 431, then the connection is closed.
MAX_HEAD_BYTES = 1 << 16
# What the client's headers mean to the front door; any other header is sent on as it came.
# Hop-by-hop ones and those we set are dropped; Transfer-Encoding, Expect, Upgrade or a
# Connection option beyond keep-alive/close send the request to aiohttp.
class _Header(enum.Enum):
    LENGTH = enum.auto()
    HOST = enum.auto()
    CONNECTION = enum.auto()
    DROP = enum.auto()
    NOT_PLAIN = enum.auto()


_LENGTH, _HOST, _CONNECTION, _DROP, _NOT_PLAIN = _Header
_REQUEST_HEADERS = {
    b"content-length": _LENGTH, b"host": _HOST, b"connection": _CONNECTION,
    **dict.fromkeys((b"keep-alive", b"te", b"trailer", b"proxy-connection", b"proxy-authorization",
                     b"proxy-authenticate"), _DROP),
    **dict.fromkeys((b"transfer-encoding", b"expect", b"upgrade"), _NOT_PLAIN),
}  # fmt: skip
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_DROP_STREAMED = frozenset(k.lower().encode() for k in NO_BUFFERING)
_CHUNKED_END = b"0\r\n\r\n"
_BODYLESS = frozenset({204, 304})

Route = tuple[str, str, str | None]  # (metrics label, family, JSON field naming the model)
AioFactory = Callable[[], asyncio.Protocol]


def _plain_connection(value: bytes) -> bool:
    return {t.strip().lower() for t in value.split(b",")} <= _PLAIN_CONNECTION


class Door:
    """What every connection of one server shares: the rules, the engine pool, the routes, the policies."""

    def __init__(self, rules: Rules, pool: upstream.Pool, budget: BodyBudget, tracked: set[Tracked],
                 follower: StateFollower, metrics: GateMetrics, gate: GateConfig,
                 routes: dict[tuple[bytes, bytes], Route], aio: AioFactory, keepalive_s: float) -> None:
        self.rules = rules
        self.pool = pool  # started with the app, before any connection
        self.budget = budget
        self.tracked = tracked  # shared with the aiohttp handlers: a switch ends them all
        self.follower = follower
        self.metrics = metrics
        self.routes = routes
        self.aio = aio
        self.hosts = HostPolicy(gate)
        self.head_s = clock.real_seconds(gate.client_header_timeout_s)
        self.body_idle_s = clock.real_seconds(gate.client_body_idle_s)
        self.body_idle_clock_s = gate.client_body_idle_s  # as configured, for the 408's text
        read = gate.read_timeout_s
        self.read_s = None if read is None else clock.real_seconds(read)
        self.keepalive_s = keepalive_s
        self._date_at = 0
        self._date = ""
        self._idle: dict[tuple[str, bool], tuple[Snapshot, list[str], bytes]] = {}
        self._ready: tuple[Snapshot, list[str], Target, float] | None = None
        self._loop = asyncio.get_running_loop()
        # Bound once: a method looked up by name on every call was a measurable share of a
        # small request's cost once the rest was compiled.
        self.now: Callable[[], float] = self._loop.time
        # Answers counted here, added to ailayer_gate_requests before this process answers a
        # scrape and at most COUNTS_PUBLISH_S later for the other workers' scrapes: the
        # counter's inc (a lock and four Python calls) was ~2.5 µs of a ~24 µs request, and
        # publishing once per turn of the event loop still cost ~2 µs (a turn serves 1-2).
        self._pending: dict[tuple[str, str], int] = {}
        self._publish: asyncio.TimerHandle | None = None
        metrics.before_scrape(self.flush_counts)
        self._engine: Engine | None = None
        self.fronts: set[Front] = set()  # open connections not handed to aiohttp
        self.flights = 0  # plain requests being answered
        self.closing = False
        self._quiet: asyncio.Event | None = None

    async def close(self, grace_s: float) -> None:
        """Stop: idle connections close now, each busy one after its answer; what is still
        running after ``grace_s`` is cut (aiohttp's connections are closed by its own cleanup)."""
        self.closing = True
        for front in list(self.fronts):
            front.close_if_idle()
        if self.flights:
            self._quiet = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._quiet.wait()
        for front in list(self.fronts):
            front.abort()
        self.flush_counts()

    def flight_ended(self) -> None:
        self.flights -= 1
        if not self.flights and self._quiet is not None:
            self._quiet.set()

    def protocol(self) -> Front:
        return Front(self)

    def count(self, route: str, outcome: str) -> None:
        """One answer in ``ailayer_gate_requests`` (published by ``flush_counts``)."""
        if self._publish is None:
            self._publish = self._loop.call_later(COUNTS_PUBLISH_S, self.flush_counts)
        key = (route, outcome)
        self._pending[key] = self._pending.get(key, 0) + 1

    def flush_counts(self) -> None:
        """Add the counts kept since the last call to the prometheus counter."""
        if self._publish is not None:
            self._publish.cancel()
            self._publish = None
        pending = self._pending
        for (route, outcome), n in pending.items():
            self.metrics.counter(route, outcome).inc(n)
        pending.clear()

    def engine(self, target: Target) -> Engine:
        """What sending to ``target`` needs, made once per target."""
        known = self._engine
        if known is None or known.target is not target:
            host, port = self.rules.address(target)
            line = b"Host: %s:%d\r\n" % (host.encode(), port)
            known = self._engine = Engine(target, (host, port), line, self.rules.ollama(target))
        return known

    def date(self) -> str:
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    def refusal(self, refusal: Refusal, family: str, close: bool) -> bytes:
        return errors.render(refusal, family, stale=self.follower.stale(), date=self.date(), close=close)

    def admitted(self, family: str, close: bool) -> Target | tuple[str, bytes]:
        """The engine to proxy to, or (reason code, the whole answer) to give instead.

        The 428 of an IDLE state is the same bytes for every request until the state or the
        catalog changes, so it is rendered once, with a placeholder where its Date goes.
        """
        follower = self.follower
        snap = follower.snapshot
        known = self.rules.known
        ready = self._ready
        if ready is not None and ready[0] is snap and ready[1] is known and self.now() < ready[3]:
            return ready[2]  # judged already for this snapshot and catalog, and still fresh
        if snap.phase == Phase.IDLE:
            cached = self._idle.get((family, close))
            if cached is not None and cached[0] is snap and cached[1] is known and not follower.stale():
                return Code.NO_MODEL_SELECTED, self._dated(cached[2])
        verdict = admit(follower, known)
        if not isinstance(verdict, Refusal):
            verdict = self.rules.trusted(verdict)
        if not isinstance(verdict, Refusal):
            # Fresh until the heartbeat this snapshot carries turns stale (a new heartbeat is a
            # new snapshot): one comparison per request instead of reading the clock's age.
            left = clock.real_seconds(follower.stale_after_s - follower.heartbeat_age())
            self._ready = (snap, known, verdict, self.now() + left)
            return verdict
        rendered = errors.render(verdict, family, stale=follower.stale(), date=_DATE_MARK, close=close)
        if verdict.code is Code.NO_MODEL_SELECTED:
            self._idle[(family, close)] = (snap, known, rendered)
        return verdict.code, self._dated(rendered)

    def _dated(self, rendered: bytes) -> bytes:
        return rendered.replace(_DATE_MARK_BYTES, self.date().encode(), 1)


class Engine(NamedTuple):
    """The active engine as the front door sends to it."""

    target: Target
    address: tuple[str, int]
    host_line: bytes  # our Host header, CRLF included
    ollama: bool  # its keep_alive is pinned on KEEP_ALIVE_ROUTES


# With several gate workers, the longest an answer may be missing from another worker's scrape
# (a worker's own scrape, and the only one with one worker, is always exact).
COUNTS_PUBLISH_S = 0.25
# Where a cached answer's Date goes (the same length as every real one).
_DATE_MARK = "Thu, 01 Jan 1970 00:00:00 GMT"
_DATE_MARK_BYTES = _DATE_MARK.encode()


class Request:
    """A plain request, parsed whole (head and body) and waiting for its answer."""

    __slots__ = ("body", "close", "family", "field", "headers", "method", "route", "size", "url")

    def __init__(self, method: bytes, url: bytes, route: Route, headers: list[tuple[bytes, bytes]],
                 size: int) -> None:
        self.method = method
        self.url = url
        self.route, self.family, self.field = route
        self.headers = headers  # the client's, minus hop-by-hop and those we set
        self.size = size  # reserved in the body budget until the engine's answer starts
        self.body: list[bytes] = []
        self.close = False


class Front(asyncio.Protocol):
    """One client connection: plain requests answered here, the rest by aiohttp's protocol."""

    def __init__(self, door: Door) -> None:
        self.door = door
        self.loop = asyncio.get_running_loop()
        self.now = door.now
        parser = self.parser = httptools.HttpRequestParser(self)
        # The parser's methods each request calls, bound once (as the transport's write).
        self.feed: Callable[[bytes], None] = parser.feed_data
        self.method: Callable[[], bytes] = parser.get_method
        self.version: Callable[[], str] = parser.get_http_version
        self.keep_alive: Callable[[], bool] = parser.should_keep_alive
        self.transport: asyncio.Transport | None = None
        self.send: Callable[[bytes], object] | None = None  # the transport's write, bound once
        self.aio: asyncio.Protocol | None = None  # aiohttp's, once a request was not plain
        self.pending = bytearray()  # for aio, while answers of earlier plain requests are owed
        self.raw = False  # after an Upgrade: bytes go to aio unparsed
        self.chunked = False  # the message being forwarded to aio has a chunked body
        self.queue: collections.deque[Request] = collections.deque()
        self.flight: Flight | None = None
        self.req: Request | None = None  # a plain request whose body is being read
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.served = False  # a request head arrived: the head deadline is met
        self.in_head = True  # the bytes now arriving are a request head
        self.head_bytes = 0  # of the head being received
        self.chunk_body = 0  # body bytes parsed from the current read
        self.started = self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # the client's socket is not taking our writes
        self.held = False  # we stopped reading the client's socket (pipelined requests)
        self.last_request = False  # a request said Connection: close; what follows is not read
        self.closed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.transport = stream
        self.send = stream.write
        self.door.fronts.add(self)
        self.started = self.last = self.now()
        self.timer = self.loop.call_at(self.started + self.door.head_s, self._tick)

    def data_received(self, data: bytes) -> None:
        self.last = self.now()
        if self.last_request:
            return
        if self.raw:
            self._to_aio(data)
            return
        self.chunk_body = 0
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as exc:
            self.raw = True
            self._to_aio(data[exc.args[0]:])
        except httptools.HttpParserCallbackError:
            log.exception("gate: a request broke the front door; connection closed")
            self.abort()
        except httptools.HttpParserError as exc:
            if not self.last_request:  # llhttp refuses bytes after a close; they are ignored
                self._bad_request(exc)
        else:
            if self.in_head:
                # Overcounts by at most the end of the previous head, when one read carried it too.
                self.head_bytes += len(data) - self.chunk_body
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._head_too_large()
                    return
            if self.req is not None and self.timer is not None and self.aio is None \
                    and self.timer.when() > self.last + self.door.body_idle_s:
                self._arm(self.last + self.door.body_idle_s)  # a body that did not come whole

    def eof_received(self) -> bool | None:
        if self.aio is not None:
            return self.aio.eof_received()
        # As aiohttp does: a client that stops sending has left; its requests are ended (the
        # engine's connections closed) rather than answered into a half-closed socket.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.door.fronts.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.flight is not None:
            self.flight.client_gone()
        self.drop_queue()
        if self.req is not None:
            self.door.budget.give(self.req.size)
            self.req = None
        if self.aio is not None:
            self.aio.connection_lost(exc)

    def pause_writing(self) -> None:
        self.paused = True
        if self.aio is not None:
            self.aio.pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        if self.flight is not None:
            self.flight.wake()
        if self.aio is not None:
            self.aio.resume_writing()

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.served = True
        self.in_head = False
        self.head_bytes = 0
        if self.aio is None:
            self.req = self._plain()
            if self.req is not None:
                return
            self.aio = self.door.aio()
            self.aio.connection_made(self.transport)  # type: ignore[arg-type]  # aiohttp's own timers from here
            self.door.fronts.discard(self)  # aiohttp's now, stopped by its cleanup
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        parser = self.parser
        self.chunked = any(n.lower() == b"transfer-encoding" and v.lower().rstrip().endswith(b"chunked")
                           for n, v in self.headers)
        head = [b"%s %s HTTP/%s\r\n" % (parser.get_method(), self.url, parser.get_http_version().encode())]
        head += [b"%s: %s\r\n" % pair for pair in self.headers]
        head.append(b"\r\n")
        self._to_aio(b"".join(head))

    def on_body(self, body: bytes) -> None:
        self.chunk_body += len(body)
        req = self.req
        if req is not None:
            req.body.append(body)
        elif self.chunked:
            self._to_aio(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self._to_aio(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        req = self.req
        if req is None:
            if self.chunked:
                self._to_aio(_CHUNKED_END)
            self.last_request = not self.parser.should_keep_alive() and not self.parser.should_upgrade()
            return
        self.req = None
        req.close = self.last_request = not self.keep_alive()
        self.queue.append(req)
        if self.flight is None:
            self._next()
        elif not self.held and self.transport is not None:
            self.held = True
            self.transport.pause_reading()  # pipelined: no more until this one is answered

    # ------------------------------------------------------------------ requests

    def _plain(self) -> Request | None:
        """The request if the front door serves it (its body budget reserved), else None."""
        if self.version() != "1.1":
            return None
        method, url = self.method(), self.url
        query = url.find(b"?")
        path = url if query < 0 else url[:query]
        route = self.door.routes.get((method, path))
        if route is None:
            return None  # an exact route's path has no dot segments or escapes to check
        size = 0
        host = None
        kept = []
        for name, value in self.headers:
            what = _REQUEST_HEADERS.get(name.lower())
            if what is None:
                kept.append((name, value))
            elif what is _LENGTH:
                size = int(value)  # llhttp accepted it: digits, one value
            elif what is _HOST:
                host = value
            elif what is _NOT_PLAIN or (what is _CONNECTION and not _plain_connection(value)):
                return None
        if host is None or size > FAST_BODY_MAX or not self.door.hosts.allowed(host):
            return None
        if not self.door.budget.take(size):
            return None  # aiohttp's path waits for room, then answers 503
        return Request(method, url, route, kept, size)

    def _next(self) -> None:
        """Answer the next queued plain request, or hand aiohttp what came after them."""
        while self.flight is None and self.queue and not self.closed:
            self.flight = Flight.start(self, self.queue.popleft())
        if self.flight is None and not self.queue:
            if self.pending and self.aio is not None:
                data = bytes(self.pending)
                self.pending.clear()
                self.aio.data_received(data)
            if self.held and self.transport is not None and not self.closed:
                self.held = False
                self.transport.resume_reading()

    def answered(self, close: bool) -> None:
        """The flight's answer is written whole."""
        self.flight = None
        self.last = self.now()  # keep-alive idleness counts from the answer's end
        if close or self.closed or self.door.closing:
            self.drop_queue()
            if self.transport is not None:
                self.transport.close()
            return
        self._next()

    def drop_queue(self) -> None:
        """Forget the requests not yet answered (the connection closes), and their budget."""
        for req in self.queue:
            self.door.budget.give(req.size)
        self.queue.clear()

    def write(self, data: bytes) -> None:
        assert self.send is not None
        self.send(data)

    def _to_aio(self, data: bytes) -> None:
        assert self.aio is not None
        if self.flight is None and not self.queue:
            self.aio.data_received(data)
        else:
            self.pending += data

    def _bad_request(self, exc: Exception) -> None:
        """llhttp refused the bytes: 400 and close (aiohttp would answer the same)."""
        self._close_with(Refusal(400, Code.BAD_REQUEST, f"malformed HTTP request: {str(exc)[:100]}"))

    def _head_too_large(self) -> None:
        self._close_with(Refusal(431, Code.HEAD_TOO_LARGE, f"request heads are limited to {MAX_HEAD_BYTES >> 10} KiB"))

    def _close_with(self, refusal: Refusal) -> None:
        """Answer and close; if answers are still owed on the connection, only close."""
        if self.aio is None and self.flight is None and not self.queue and self.transport is not None:
            self.write(self.door.refusal(refusal, errors.OPENAI, close=True))
            self.transport.close()
        else:
            self.abort()

    def close_if_idle(self) -> None:
        if self.flight is None and not self.queue and self.req is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ deadlines

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """One timer per connection, re-armed lazily: the head deadline before the first request,
        the body idle timeout inside a plain body, the keep-alive idle close between requests."""
        self.timer = None
        if self.closed or self.aio is not None or self.transport is None:
            return
        door, now = self.door, self.now()
        if self.flight is not None or self.queue:
            self._arm(now + door.keepalive_s)  # the engine's read timeout covers a request
            return
        if self.req is not None:
            due = self.last + door.body_idle_s
            if now >= due:
                refusal = body_stalled(door.body_idle_clock_s)
                door.count(self.req.route, refusal.code)
                self.write(door.refusal(refusal, self.req.family, close=True))
                self.transport.close()
                return
        elif not self.served:
            due = self.started + door.head_s
            if now >= due:
                self.transport.close()
                return
        else:
            due = self.last + door.keepalive_s
            if now >= due:
                self.transport.close()
                return
        self._arm(due)


class Flight:
    """One plain request being answered: sent to the engine on a pooled connection, its
    answer relayed as the engine's connection reports it (upstream.Sink)."""

    __slots__ = ("address", "attempt", "begun", "body", "budget_held", "conn", "connecting", "done", "front",
                 "host_line", "parts", "refusal", "replied", "req", "shape", "target")

    def __init__(self, front: Front, req: Request, target: Target, body: bytes) -> None:
        self.front = front
        self.req = req
        self.target = target
        engine = front.door.engine(target)
        self.address, self.host_line = engine.address, engine.host_line
        front.door.flights += 1
        self.body = body
        self.refusal: Refusal | None = None  # set by rules.cancel_switched when a switch ends it
        self.conn: upstream.Connection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.attempt = 1
        self.budget_held = True
        self.begun = False  # the engine's answer head arrived and was judged
        self.replied = False  # bytes of the answer went to the client
        self.shape = _UNKNOWN  # how the engine's answer is relayed, known once its head came
        self.parts: list[bytes] = []
        self.done = False

    @classmethod
    def start(cls, front: Front, req: Request) -> Flight | None:
        """Judge the request and send it, or answer it at once (then None)."""
        door = front.door
        verdict = door.admitted(req.family, req.close)
        body = b"".join(req.body) if len(req.body) != 1 else req.body[0]
        if not isinstance(verdict, Target):
            code, answer = verdict  # spelt out: mypyc passed a star-unpacked tuple whole here
            cls._answer(front, req, code, answer)
            return None
        if req.field is not None and body and not names_served(body, verdict.served_name, req.field):
            checked = door.rules.check_model(body, verdict, req.family, req.field)
            if isinstance(checked, Refusal):
                cls._answer(front, req, checked.code, door.refusal(checked, req.family, req.close))
                return None
            body = bytes(checked)
        if body and req.route in KEEP_ALIVE_ROUTES and door.engine(verdict).ollama:
            body = bytes(pin_keep_alive(body))
        flight = cls(front, req, verdict, body)
        door.tracked.add(flight)
        flight.send(fresh=False)
        return None if flight.done else flight

    @staticmethod
    def _answer(front: Front, req: Request, code: str, answer: bytes) -> None:
        """The gate's own answer instead of the engine's (the request never left)."""
        front.door.budget.give(req.size)
        front.door.count(req.route, code)
        front.write(answer)
        if req.close and front.transport is not None:
            front.drop_queue()
            front.transport.close()

    # ------------------------------------------------------------------ the engine's side

    def send(self, fresh: bool) -> None:
        conn = None if fresh else self.front.door.pool.take(self.address)
        if conn is None:
            self.connecting = self.front.loop.create_task(self._connect(self.address))
            return
        self._send_on(conn)

    async def _connect(self, address: tuple[str, int]) -> None:
        try:
            conn = await self.front.door.pool.connect(address[0], address[1])
        except upstream.ConnectFailed as exc:
            self.connecting = None
            if not self.done:
                self._failed(exc)
            return
        self.connecting = None
        if self.done:
            conn.abort()
            return
        self._send_on(conn)

    def _send_on(self, conn: upstream.Connection) -> None:
        self.conn = conn
        assert conn.send is not None
        conn.send(_head(self.req, self.host_line, self.body) + self.body)
        conn.watch(self, self.front.door.read_s)

    def engine_paced(self) -> bool:
        return self.front.paused

    def wake(self) -> None:
        """Something happened on the engine's connection (or the client took our writes)."""
        conn = self.conn
        if self.done or conn is None:
            return
        if conn.error is not None:
            error = conn.error
            if isinstance(error, upstream.Disconnected) and not error.answered and not self.begun \
                    and self.attempt < SEND_ATTEMPTS:
                # A pooled connection the engine had closed (llama.cpp after a stream): once more.
                self.attempt += 1
                self._drop_conn()
                self.send(fresh=True)
                return
            self._failed(error)
            return
        if not self.begun:
            if not conn.head:
                return
            self._begin(conn)
        shape = self.shape
        if shape.whole:
            if conn.complete or conn.bodyless:
                self._reply_whole()
            return
        if self.front.paused:
            return  # the engine waits on the client (its socket stops being read past HIGH_WATER)
        if conn.chunks:
            data = conn.drain()
            self.front.write(b"%x\r\n%s\r\n" % (len(data), data) if shape.chunked else data)
        if conn.complete or conn.bodyless:
            if shape.chunked:
                self.front.write(_CHUNKED_END)
            self._finish(Code.PROXIED, Code.COMPLETED)

    def take(self, body: bytes) -> bool:
        """The engine's body as it is parsed: kept for a whole answer, relayed at once in a
        stream unless the client is slow (then left on the connection, which pauses reading)."""
        if self.shape.whole:
            self.parts.append(body)
            return True
        conn = self.conn
        if self.front.paused or (conn is not None and conn.chunks):
            return False
        self.front.write(b"%x\r\n%s\r\n" % (len(body), body) if self.shape.chunked else body)
        return True

    def _begin(self, conn: upstream.Connection) -> None:
        """The engine's head: free the body budget, choose how the body is relayed."""
        self.begun = True
        self._give_budget()
        conn.bodyless = self.req.method == b"HEAD" or conn.status in _BODYLESS
        shape = _shape(conn)
        self.shape = shape
        if shape.whole:
            return
        self.front.write(self._head(shape))
        self.replied = True
        if shape.streaming:
            self.front.door.metrics.streams_active.inc()

    def _head(self, shape: Shape) -> bytes:
        return b"%s%s\r\n%s\r\n" % (shape.head, self.front.door.date().encode(),
                                      b"Connection: close\r\n" if self.req.close else b"")

    def _reply_whole(self) -> None:
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.front.write(self._head(self.shape) + body)
        self.replied = True
        self._finish(Code.PROXIED, None)

    # ------------------------------------------------------------------ endings

    def cancel(self) -> None:
        """A switch: the engine stopped being the active one (``refusal`` says so)."""
        if not self.done and self.refusal is not None:
            self._end_with(self.refusal)

    def client_gone(self) -> None:
        if self.done:
            return
        if self.replied and self.shape.streaming:
            self.front.door.metrics.streams.labels(Code.CLIENT_GONE).inc()
        self._drop_conn()
        self._finish(Code.CLIENT_GONE, None, quiet=True)

    def _failed(self, exc: upstream.UpstreamError) -> None:
        door = self.front.door
        self._end_with(engine_failed(exc, self, door.tracked, door.follower))

    def _end_with(self, refusal: Refusal) -> None:
        """Say what happened: an error answer, an error item in the stream, or a cut."""
        self._drop_conn()
        front = self.front
        how, chunk = ending(refusal, self.replied, self.shape.ctype if self.replied else "",
                            self.replied and self.shape.chunked)
        if how is Ending.ANSWER:
            self.parts.clear()
            front.write(front.door.refusal(refusal, self.req.family, self.req.close))
            self._finish(refusal.code, None)
        elif how is Ending.STREAM_ITEM and chunk is not None:
            front.write(b"%x\r\n%s\r\n%s" % (len(chunk), chunk, _CHUNKED_END))
            self._finish(refusal.code, refusal.code)
        else:
            front.abort()
            self._finish(refusal.code, refusal.code, quiet=True)

    def _drop_conn(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.conn is not None:
            self.conn.sink = None
            self.conn.abort()
            self.conn = None

    def _give_budget(self) -> None:
        if self.budget_held:
            self.budget_held = False
            self.front.door.budget.give(self.req.size)

    def _finish(self, outcome: str, stream_outcome: str | None, quiet: bool = False) -> None:
        """Count the answer, give the engine connection back (or close it), next request."""
        self.done = True
        door = self.front.door
        door.flight_ended()
        self._give_budget()
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.sink = None
            door.pool.give_back(self.address, conn)
        door.tracked.discard(self)
        door.count(self.req.route, outcome)
        if self.replied and self.shape.streaming:
            door.metrics.streams_active.dec()
            if stream_outcome is not None:
                door.metrics.streams.labels(stream_outcome).inc()
        if not quiet:
            self.front.answered(self.req.close)
        else:
            self.front.flight = None


class Shape(NamedTuple):
    """How an engine's answer is relayed, and our head for it up to its Date value."""

    whole: bool  # read whole, then one write (a small answer of known length)
    chunked: bool  # the client gets a chunked body (the engine gave no length)
    streaming: bool  # counted as a stream, sent with the no-buffering headers
    ctype: str
    head: bytes  # status line and headers, ending in "Date: "


_UNKNOWN = Shape(True, False, False, "", b"")
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
_DROP_RESPONSE = frozenset(name.encode() for name in DROP_RESPONSE)
_NO_BUFFERING = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in NO_BUFFERING.items())
# Shapes by the engine's status and headers: a small answer's head is built once, not per request.
_SHAPES: dict[tuple[int, bytes, bool, tuple[tuple[bytes, bytes], ...]], Shape] = {}
SHAPES_MAX = 256


def _shape(conn: upstream.Connection) -> Shape:
    headers = tuple(conn.headers)
    key = (conn.status, conn.reason, conn.bodyless, headers)
    shape = _SHAPES.get(key)
    if shape is None:
        if len(_SHAPES) >= SHAPES_MAX:
            _SHAPES.clear()  # headers that differ per answer (a request id): building is cheap
        shape = _SHAPES[key] = _new_shape(conn.status, conn.reason, conn.bodyless, headers)
    return shape


def _new_shape(status: int, reason: bytes, bodyless: bool, headers: tuple[tuple[bytes, bytes], ...]) -> Shape:
    length: int | None = 0 if bodyless else None
    ctype = b""
    named: set[bytes] = set()
    for name, value in headers:
        low = name.lower()
        if low == b"content-length" and length is None:
            length = int(value)  # llhttp accepted it: digits, one value
        elif low == b"content-type":
            ctype = value
        elif low == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    text = ctype.decode("latin-1")
    streaming = length is None or text.startswith(STREAM_TYPES)
    whole = not streaming and length is not None and length <= WHOLE_BODY_MAX
    chunked = length is None
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _PHRASES.get(status, b""))]
    for name, value in headers:
        low = name.lower()
        if low not in _DROP_RESPONSE and low not in named and not (streaming and low in _DROP_STREAMED):
            lines.append(b"%s: %s\r\n" % (name, value))
    if streaming:
        lines.append(_NO_BUFFERING)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif length is not None and not bodyless:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"Date: ")
    return Shape(whole, chunked, streaming, text, b"".join(lines))


def _head(req: Request, host_line: bytes, body: bytes) -> bytes:
    """The request head for the engine: the client's method, target and headers (llhttp
    accepted them, so no CR/LF), our Host and length."""
    parts = [b"%s %s HTTP/1.1\r\n%s" % (req.method, req.url, host_line)]
    parts += [b"%s: %s\r\n" % pair for pair in req.headers]
    if body or req.method in (b"POST", b"PUT", b"PATCH"):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts)


def routes_of(table: Iterable[tuple[str, str, str, str | None]]) -> dict[tuple[bytes, bytes], Route]:
    """The front door's routes: those of fixed path (a templated one stays with aiohttp)."""
    return {(method.encode(), path.encode()): (path, family, field)
            for method, path, family, field in table if "{" not in path}

