"""The reverse proxy to the active engine: unbuffered, uncapped, cancellable.

Plain inference requests are proxied by the front door (reconciler/gate/fastpath.py) with
this module's rules (``trusted``, ``check_model``, ``pin_keep_alive``, ``upstream_refusal``,
the switch cancellation); the handlers here serve every other request on those routes
(chunked or large bodies, HTTP/1.0, Expect, ...) through aiohttp.

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
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from reconciler.domain.catalog import Catalog
from reconciler.gate import budget, clients, errors, upstream
from reconciler.gate.admission import SELECT_HINT, admit
from reconciler.gate.bodies import names_served, pin_keep_alive
from reconciler.gate.clients import Body
from reconciler.gate.errors import OLLAMA, Refusal
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.statefollow import Snapshot, StateFollower, Target
from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Below vLLM's (uvicorn's) 5 s idle timeout, so we never send on a connection it is closing.
UPSTREAM_KEEPALIVE_S = 4.0
# A request that met a dead pooled connection before any answer is sent once more.
SEND_ATTEMPTS = 2
# A non-streamed answer up to this size is read whole and sent in one piece (fewer writes);
# larger ones and all streams are relayed chunk by chunk.
WHOLE_BODY_MAX = 1 << 20
# Retry hint after an engine that should be READY refused the connection: the reconciler's
# liveness probe needs a few seconds to notice and restart it.
RETRY_ENGINE_DOWN_S = 5.0
# Retry-After when the state file routes to a URL the catalog does not name (planted, or
# written by another install): the reconciler rewrites the state within a resync.
UNTRUSTED_RETRY_S = 5.0

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})  # fmt: skip
# Expect: the gate has the whole body and sends it at once; an engine's 100 Continue is skipped.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
# Ollama's routes whose request loads the model and sets how long it stays (keep_alive).
KEEP_ALIVE_ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})


class Tracked(Protocol):
    """A proxied request and the engine it went to; ``refusal`` is set when it is aborted,
    then ``cancel`` ends it (with that refusal as its answer or last stream item)."""

    target: Target
    refusal: Refusal | None

    def cancel(self) -> object: ...


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


def _switch_refusal(old: Target, new: Snapshot) -> Refusal:
    data = new.data or {}
    now = new.target.model if new.target else data.get("desired_model")
    message = (
        f"request ended by the gate: model {old.model!r} stopped being served "
        f"(phase now {new.phase or 'unknown'}, desired model {data.get('desired_model')!r}); "
        "the gate never finishes a request on an engine that is being switched away"
    )
    detail = {"phase": new.phase, "previous_model": old.model, "model": now,
              "revision": new.revision}
    return Refusal(503, "model_switched", message, None, detail)


class Proxy:
    """Owns the upstream session and the set of requests in flight."""

    def __init__(self, catalog: Catalog, follower: StateFollower, metrics: GateMetrics) -> None:
        self._gate = catalog.gate
        self._follower = follower
        self._metrics = metrics
        self.use(catalog)
        self._pool: upstream.Pool | None = None
        self._addresses: dict[str, tuple[str, int]] = {}  # engine base URL -> (host, port)
        self.flights: set[Tracked] = set()  # the front door adds and removes its own directly
        self.budget = budget.BodyBudget()
        follower.add_listener(self._on_state)

    def use(self, catalog: Catalog) -> None:
        """Serve this catalog's engines from now on (the file changed). Timeouts stay those the
        upstream session was made with."""
        self._catalog = catalog
        self.known = catalog.names()  # a new list when the catalog changes (caches compare identity)
        self._by_served = {e.served_name: name for name, e in catalog.engines.items()}
        self._ollama = frozenset(name for name, e in catalog.engines.items() if e.kind == "ollama")

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

    def pins_keep_alive(self, route: str, target: Target) -> bool:
        """Whether this request's body gets ``keep_alive`` pinned (see ``pin_keep_alive``)."""
        return route in KEEP_ALIVE_ROUTES and self.ollama(target)

    def ollama(self, target: Target) -> bool:
        return target.model in self._ollama

    def address(self, target: Target) -> tuple[str, int]:
        """(host, port) of an engine URL, parsed once per URL."""
        address = self._addresses.get(target.url)
        if address is None:
            parts = urllib.parse.urlsplit(target.url)
            address = self._addresses[target.url] = (parts.hostname or "127.0.0.1", parts.port or 80)
        return address

    # ------------------------------------------------------------------ switch

    def _on_state(self, old: Snapshot, new: Snapshot) -> None:
        """A new valid state that no longer routes to a request's engine ends that request."""
        if new.data is None:
            return  # the file vanished: we know nothing new about the engine, keep going
        for flight in list(self.flights):
            if flight.target != new.target and flight.refusal is None:
                flight.refusal = _switch_refusal(flight.target, new)
                flight.cancel()

    # ------------------------------------------------------------------ routes

    def handler(self, route: str, family: str, model_field: str | None) -> Handler:
        """A handler for ``route``; ``model_field`` names the JSON key that carries the model."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if _dot_segments(request.raw_path):
                self._metrics.request(route, "bad_path")
                return errors.respond(Refusal(400, "bad_path", "a path with '.' or '..' segments is not "
                                              "forwarded: the engine could read it as another route"),
                                      family, stale=self._follower.stale())
            verdict = admit(self._follower, self.known)
            if not isinstance(verdict, Refusal):
                verdict = self.trusted(verdict)
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

    def trusted(self, target: Target) -> Target | Refusal:
        """Proxy only to an engine URL the catalog names: the state file says where prompts
        (and clients' Authorization headers) go, and a planted one must not send them elsewhere."""
        engine = self._catalog.engines.get(target.model)
        if engine is not None and target.url == engine.base_url:
            return target
        return Refusal(503, "untrusted_state",
                       f"the observed state routes {target.model!r} to {target.url[:200]}, which the "
                       "catalog does not name; not proxying", UNTRUSTED_RETRY_S,
                       {"model": target.model})

    def check_model(self, body: Body, target: Target, family: str, field: str) -> Body | Refusal:
        """Refuse another model by name (409); map the catalog name to the served name."""
        if names_served(body, target.served_name, field):
            return body
        try:
            doc = json.loads(body)
        except ValueError:
            return body  # not JSON: the engine gives its own error
        if not isinstance(doc, dict):
            return body
        name = doc.get(field)
        if not isinstance(name, str) or not name or name == target.served_name:
            return body
        if name == target.model:
            doc[field] = target.served_name
            return json.dumps(doc, separators=(",", ":")).encode()
        if family == OLLAMA and ":" not in name and target.served_name == name + ":latest":
            return body
        return self._mismatch(name, target)

    def _mismatch(self, name: str, target: Target) -> Refusal:
        catalog_name = name if name in self._catalog.engines else self._by_served.get(name)
        served = "" if target.served_name == target.model else f" (served as {target.served_name!r})"
        message = (
            f"model {name!r} is not the active model; the active model is {target.model!r}"
            f"{served}. The gate never switches models by itself: "
        )
        if catalog_name:
            message += (f"run `ailayer toggle {catalog_name}` or POST /toggle "
                        f'{{"model": "{catalog_name}"}} to switch')
        else:
            message += f"{name!r} is not in the catalog either (known: {', '.join(self.known)})"
        detail = {"requested_model": name, "active_model": target.model,
                  "served_name": target.served_name, "known_models": self.known,
                  "how_to_select": SELECT_HINT}
        return Refusal(409, "model_not_active", message, None, detail,
                       {"X-AILayer-Active-Model": target.model})

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
                    self._metrics.request(route, "proxied")
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
                    self._metrics.streams.labels("client_gone").inc()
                self._metrics.request(route, "client_gone")
                raise  # the client left (or we are shutting down): the engine request is closed
            flight.task.uncancel()
            self._metrics.request(route, refusal.code)
            return await self._end_with(request, resp, ctype, refusal, family)
        except (upstream.UpstreamError, aiohttp.ClientError, TimeoutError, ConnectionResetError) as exc:
            if isinstance(exc, ConnectionResetError) and resp is not None:
                # Writing to the client failed: it left mid-stream; the engine side is closed.
                self._metrics.streams.labels("client_gone").inc()
                self._metrics.request(route, "client_gone")
                return resp
            refusal = self.upstream_refusal(exc, target)
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
                body, lambda b: self.check_model(b, target, family, model_field))
            if isinstance(checked, Refusal):
                return checked
            body = checked
        if body and self.pins_keep_alive(route, target):
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
        address = self.address(target)
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
            metrics.streams.labels("completed").inc()
        metrics.request(route, "proxied")
        return resp

    @staticmethod
    def upstream_refusal(exc: BaseException, target: Target) -> Refusal:
        detail = {"engine_url": target.url, "model": target.model, "error": repr(exc)}
        if isinstance(exc, TimeoutError | upstream.ReadTimeout):
            return Refusal(504, "engine_timeout",
                           f"engine for {target.model!r} at {target.url} went silent: {exc!r}",
                           None, detail)
        if isinstance(exc, upstream.ConnectFailed):
            return Refusal(502, "engine_unreachable",
                           f"engine for {target.model!r} at {target.url} refused the connection"
                           " (the reconciler restarts it if it died)",
                           RETRY_ENGINE_DOWN_S, detail)
        return Refusal(502, "engine_error",
                       f"engine for {target.model!r} at {target.url} broke off: {exc!r}",
                       RETRY_ENGINE_DOWN_S, detail)

    async def _end_with(
        self, request: web.Request, resp: web.StreamResponse | None, ctype: str,
        refusal: Refusal, family: str,
    ) -> web.StreamResponse:
        """Say what happened: an error answer, an error item in the stream, or a cut."""
        if resp is None or not resp.prepared:
            return errors.respond(refusal, family, stale=self._follower.stale())
        self._metrics.streams.labels(refusal.code).inc()
        chunk = errors.stream_error_chunk(refusal, ctype)
        if chunk is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write(chunk)
                await resp.write_eof()
                return resp
        # A fixed-length body or an unknown format cannot carry an error: cut the
        # connection so the client sees a truncated response, never a plausible one.
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
