"""The reverse proxy to the active engine: unbuffered, uncapped, cancellable.

Plain inference requests are proxied by the front door (reconciler/gate/frontdoor.py); the
handlers here serve every other request on those routes (chunked or large bodies, HTTP/1.0,
Expect, ...) through aiohttp. Both keep the same rules, from reconciler/gate/rules.py.

Settings that matter and why (issue 3, item 7; issue 14):
* one connection pool (reconciler/gate/upstream.py, llhttp's parser: a third of aiohttp's
  client's CPU per request) with no connection cap and a keep-alive shorter than the engine's
  (vLLM/uvicorn closes idle connections after 5 s; reusing one it just closed fails);
* no total timeout (a generation may last an hour); only connecting is short, and silence
  before or inside a response is bounded by the configurable ``gate.read_timeout_s``;
* no decompression and no body parsing, except reading the ``model`` field of a JSON
  request to refuse a mismatch (409) or map a catalog name to the served name, and
  pinning ``keep_alive`` on Ollama's model-loading routes (``pin_keep_alive``);
* streams are copied chunk by chunk as they arrive (``Response.chunk``), with
  ``X-Accel-Buffering: no`` so a fronting nginx does not buffer them either;
* a request whose engine stops being the active one (a switch began) is cancelled and
  ends with an error the client's library understands, so nothing hangs on a dying engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from reconciler.domain.catalog import Catalog
from reconciler.gate import budget, clients, errors, upstream
from reconciler.gate.admission import admit
from reconciler.gate.bodies import pin_keep_alive
from reconciler.gate.clients import Body
from reconciler.gate.errors import Code, Refusal
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.rules import (
    DROP_REQUEST,
    DROP_RESPONSE,
    SEND_ATTEMPTS,
    STREAM_TYPES,
    WHOLE_BODY_MAX,
    Ending,
    Rules,
    Tracked,
    cancel_switched,
    ending,
    engine_failed,
)
from reconciler.gate.statefollow import StateFollower, Target
from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Below vLLM's (uvicorn's) 5 s idle timeout, so we never send on a connection it is closing.
UPSTREAM_KEEPALIVE_S = 4.0

class InFlight:
    """A request proxied by an aiohttp handler: cancelling is cancelling its task."""

    __slots__ = ("refusal", "target", "task")

    def __init__(self, target: Target, task: asyncio.Task[Any]) -> None:
        self.target = target
        self.task = task
        self.refusal: Refusal | None = None

    def cancel(self) -> object:
        return self.task.cancel()


def _headers(pairs: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """Copy headers minus hop-by-hop ones, including any the Connection header names."""
    out: list[tuple[str, str]] = []
    extra: set[str] = set()
    for key, value in pairs:
        low = key.lower()
        if low == "connection":
            extra.update(t.strip().lower() for t in value.split(","))
        if low not in drop:
            out.append((key, value))
    if extra:
        out = [(k, v) for k, v in out if k.lower() not in extra]
    return out


class Proxy:
    """Owns the upstream session and the set of requests in flight."""

    def __init__(self, catalog: Catalog, follower: StateFollower, metrics: GateMetrics) -> None:
        self._gate = catalog.gate
        self._follower = follower
        self._metrics = metrics
        self.rules = Rules(catalog)
        self._pool: upstream.Pool | None = None
        self.flights: set[Tracked] = set()  # the front door adds and removes its own directly
        self.budget = budget.BodyBudget()
        follower.add_listener(lambda _old, new: cancel_switched(self.flights, new))

    def use(self, catalog: Catalog) -> None:
        """Serve this catalog's engines from now on (the file changed). Timeouts stay those the
        upstream session was made with."""
        self.rules.use(catalog)

    async def start(self) -> None:
        gate = self._gate
        read = gate.read_timeout_s
        # No cookie jar, no proxy from the environment, no decompression, no added headers:
        # what the client sent (minus hop-by-hop headers) is what the engine gets.
        self._pool = upstream.Pool(
            connect_s=clock.real_seconds(gate.connect_timeout_s),
            read_s=None if read is None else clock.real_seconds(read),
            keepalive_s=clock.real_seconds(UPSTREAM_KEEPALIVE_S),
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    @property
    def inflight(self) -> int:
        return len(self.flights)

    @property
    def pool(self) -> upstream.Pool:
        assert self._pool is not None, "start() first"
        return self._pool

    # ------------------------------------------------------------------ switch

    # ------------------------------------------------------------------ routes

    def handler(self, route: str, family: str, model_field: str | None) -> Handler:
        """A handler for ``route``; ``model_field`` names the JSON key that carries the model."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if _dot_segments(request.raw_path):
                self._metrics.request(route, Code.BAD_PATH)
                return errors.respond(Refusal(400, Code.BAD_PATH, "a path with '.' or '..' segments is not "
                                              "forwarded: the engine could read it as another route"),
                                      family, stale=self._follower.stale())
            verdict = admit(self._follower, self.rules.known)
            if not isinstance(verdict, Refusal):
                verdict = self.rules.trusted(verdict)
            if isinstance(verdict, Refusal):
                self._metrics.request(route, verdict.code)
                return errors.respond(verdict, family, stale=self._follower.stale())
            task = asyncio.current_task()
            assert task is not None
            flight = InFlight(verdict, task)
            self.flights.add(flight)
            try:
                return await self._proxy(request, route, family, model_field, flight)
            finally:
                self.flights.discard(flight)

        return handle

    async def _proxy(
        self, request: web.Request, route: str, family: str, model_field: str | None,
        flight: InFlight,
    ) -> web.StreamResponse:
        target = flight.target
        resp: web.StreamResponse | None = None
        ctype = ""
        try:
            up = await self._forward(request, route, family, model_field, target)
            if isinstance(up, Refusal):
                self._metrics.request(route, up.code)
                return errors.respond(up, family, stale=False)
            async with up:
                headers = CIMultiDict(_headers(up.headers, DROP_RESPONSE))
                ctype = up.header("Content-Type")
                length = up.content_length
                streaming = length is None or ctype.startswith(STREAM_TYPES)
                if not streaming and length is not None and length <= WHOLE_BODY_MAX:
                    data = await up.read()
                    self._metrics.request(route, Code.PROXIED)
                    return web.Response(status=up.status, reason=up.reason, body=data,
                                        headers=headers)
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
                if streaming:
                    resp.headers.update(errors.NO_BUFFERING)
                if length is not None:
                    resp.content_length = length
                await resp.prepare(request)
                return await self._relay(route, up, resp, streaming)
        except asyncio.CancelledError:
            refusal = flight.refusal
            if refusal is None:
                if resp is not None:
                    self._metrics.streams.labels(Code.CLIENT_GONE).inc()
                self._metrics.request(route, Code.CLIENT_GONE)
                raise  # the client left (or we are shutting down): the engine request is closed
            flight.task.uncancel()
            self._metrics.request(route, refusal.code)
            return await self._end_with(request, resp, ctype, refusal, family)
        except (upstream.UpstreamError, aiohttp.ClientError, TimeoutError, ConnectionResetError) as exc:
            if isinstance(exc, ConnectionResetError) and resp is not None:
                # Writing to the client failed: it left mid-stream; the engine side is closed.
                self._metrics.streams.labels(Code.CLIENT_GONE).inc()
                self._metrics.request(route, Code.CLIENT_GONE)
                return resp
            refusal = engine_failed(exc, flight, self.flights, self._follower)
            self._metrics.request(route, refusal.code)
            return await self._end_with(request, resp, ctype, refusal, family)

    async def _forward(
        self, request: web.Request, route: str, family: str, model_field: str | None, target: Target,
    ) -> upstream.Response | Refusal:
        """Read the body within the budget, check it, send it; the budget is held (and the
        body kept) only until the engine's answer starts."""
        size = clients.body_size(request)
        if self.budget.take(size):  # the common case: room at once, no context manager
            try:
                return await self._checked_send(request, route, family, model_field, target)
            finally:
                self.budget.give(size)
        async with self.budget.hold(size) as room:
            if not room:
                return budget.too_busy()
            return await self._checked_send(request, route, family, model_field, target)

    async def _checked_send(
        self, request: web.Request, route: str, family: str, model_field: str | None, target: Target,
    ) -> upstream.Response | Refusal:
        """Read the body, check it (model, keep_alive) and send it."""
        body = await clients.read_body(request, self._gate.client_body_idle_s)
        if isinstance(body, Refusal):
            return body
        if model_field is not None and body:
            checked = await clients.off_loop(
                body, lambda b: self.rules.check_model(b, target, family, model_field))
            if isinstance(checked, Refusal):
                return checked
            body = checked
        if body and self.rules.pins_keep_alive(route, target):
            body = await clients.off_loop(body, pin_keep_alive)
        return await self._send(request, target, body)

    async def _send(self, request: web.Request, target: Target, body: Body) -> upstream.Response:
        """Send upstream; once more on a fresh connection if a pooled one turned out dead.

        llama.cpp's server closes the connection after a streamed response while its headers
        said keep-alive, so the next request on that pooled connection meets a closed socket
        before the engine has seen it (2-30 % of requests right after a stream got a 502).
        Only a connection that closed before any byte of an answer is retried.
        """
        assert self._pool is not None
        address = self.rules.address(target)
        headers = _headers(request.headers.items(), DROP_REQUEST)
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                # raw_path is sent as the client wrote it (already encoded: no requoting).
                return await self._pool.request(request.method, *address, request.raw_path, headers, body,
                                                fresh=attempt > 1)
            except upstream.Disconnected as exc:
                if attempt == SEND_ATTEMPTS or exc.answered:
                    raise
        raise AssertionError("unreachable")

    async def _relay(
        self, route: str, up: upstream.Response, resp: web.StreamResponse, streaming: bool
    ) -> web.StreamResponse:
        """Copy chunks as they arrive (never waiting to fill a buffer); count streams."""
        metrics = self._metrics
        if streaming:
            metrics.streams_active.inc()
        try:
            while (chunk := await up.chunk()) is not None:
                await resp.write(chunk)
            await resp.write_eof()
        finally:
            if streaming:
                metrics.streams_active.dec()
        if streaming:
            metrics.streams.labels(Code.COMPLETED).inc()
        metrics.request(route, Code.PROXIED)
        return resp

    async def _end_with(
        self, request: web.Request, resp: web.StreamResponse | None, ctype: str,
        refusal: Refusal, family: str,
    ) -> web.StreamResponse:
        """Say what happened (rules.ending): an error answer, an error item in the stream, or a cut."""
        began = resp is not None and resp.prepared
        # Only a body without a declared length can carry one more item (as on the front door).
        how, chunk = ending(refusal, began, ctype, began and resp is not None and resp.content_length is None)
        if how is Ending.ANSWER or resp is None:
            return errors.respond(refusal, family, stale=self._follower.stale())
        self._metrics.streams.labels(refusal.code).inc()
        if how is Ending.STREAM_ITEM and chunk is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write(chunk)
                await resp.write_eof()
                return resp
        if request.transport is not None:
            request.transport.abort()
        return resp


def _dot_segments(raw_path: str) -> bool:
    """'.' or '..' as a path segment, plain or percent-encoded: the route we matched is the
    normalised path, but the engine would get (and might resolve) the raw one. A target that
    is not a path (absolute form) counts too: it is sent on as written."""
    if not raw_path.startswith("/"):
        return True
    path = raw_path.split("?", 1)[0]
    if "%" not in path and "/." not in path:
        return False  # the common case, without unquoting and splitting
    path = urllib.parse.unquote(path)
    return any(segment in (".", "..") for segment in path.split("/"))
