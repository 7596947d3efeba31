"""The gate's aiohttp application and its entry points: ``serve`` (async) and ``run`` (blocking).

Every connection starts at the front door (reconciler/gate/frontdoor.py), which answers plain
inference requests itself and hands the rest to aiohttp's server (every route, the dashboard,
SSE); to the engine, the llhttp pool of reconciler/gate/upstream.py; uvloop; ``gate.workers``
such processes on one port (reconciler/gate/workers.py). Chosen by measurement:
docs/PERFORMANCE.md, issue 14.
Server settings that must be explicit: ``handler_cancellation=True`` (a client that
leaves cancels its handler, which closes the engine request), a large backlog, and a
keep-alive above a fronting proxy's so the proxy, not us, closes idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import uvloop
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from reconciler.domain.catalog import Catalog, CatalogSource, GateConfig
from reconciler.gate import compiled, errors
from reconciler.gate.auth import Guard
from reconciler.gate.clients import MAX_REQUEST_BYTES
from reconciler.gate.dashboard import Dashboard
from reconciler.gate.errors import OLLAMA, OPENAI, Code, Refusal
from reconciler.gate.frontdoor import Door, routes_of
from reconciler.gate.hosts import HostPolicy, name_of
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.proxy import Proxy
from reconciler.gate.statefollow import StateFollower
from reconciler.gate.statusapi import StatusApi
from reconciler.gate.toggle import Toggle
from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

# Above nginx's upstream keepalive_timeout (60 s): the proxy in front closes idle
# connections first, so it never sends a request on one we are closing.
KEEPALIVE_S = 75.0
# Bursts of new connections (a UI reconnecting, a load test) must queue, not be refused;
# the kernel caps this at net.core.somaxconn.
BACKLOG = 4096
# On stop, requests still running get this long before they are cancelled; streams that
# could last an hour must not hold Ctrl-C hostage.
SHUTDOWN_GRACE_S = 2.0
# How often the gate looks whether the catalog file changed (one stat() when it did not).
CATALOG_RECHECK_S = 1.0

# (method, path, family, JSON field naming the model or None)
INFERENCE_ROUTES: tuple[tuple[str, str, str, str | None], ...] = (
    ("POST", "/v1/chat/completions", OPENAI, "model"),
    ("POST", "/v1/completions", OPENAI, "model"),
    ("POST", "/v1/embeddings", OPENAI, "model"),
    ("GET", "/v1/models", OPENAI, None),
    ("GET", "/v1/models/{name:.+}", OPENAI, None),
    ("POST", "/api/generate", OLLAMA, "model"),
    ("POST", "/api/chat", OLLAMA, "model"),
    ("POST", "/api/embed", OLLAMA, "model"),
    ("POST", "/api/embeddings", OLLAMA, "model"),
    ("GET", "/api/tags", OLLAMA, None),
    ("GET", "/api/ps", OLLAMA, None),
    ("POST", "/api/show", OLLAMA, "model"),
)

Listening = Callable[[list[str]], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_check(gate: GateConfig) -> Callable[..., Any]:
    """421 for a Host name we do not serve (reconciler/gate/hosts.py)."""
    policy = HostPolicy(gate)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.host or ""
        if policy.allowed(host):
            return await handler(request)
        return errors.respond(Refusal(421, Code.HOST_NOT_ALLOWED,
                                      f"this gate does not answer for Host {name_of(host)[:100]!r}; add it to "
                                      "gate.allowed_hosts in the catalog if it is yours"),
                              errors.family_of(request.path), stale=False)

    return check


async def _follow_catalog(source: CatalogSource, proxy: Proxy, toggle: Toggle,
                          dashboard: Dashboard, guard: Guard) -> None:
    """Pick up engines added to (or removed from) the catalog without a restart, as the loop
    does: a model added to engines.yaml got 422 from /toggle until the gate restarted."""
    error = None
    while source.path is not None:
        await asyncio.sleep(clock.real_seconds(CATALOG_RECHECK_S))
        if source.refresh():
            proxy.use(source.catalog)
            toggle.use(source.catalog)
            dashboard.use(source.catalog)
            guard.use(source.catalog.gate)
            log.info("catalog %s reloaded: models %s", source.path, ", ".join(source.catalog.names()))
        if source.error != error and source.error:
            log.warning("catalog not reloaded: %s", source.error)
        error = source.error


class Parts(NamedTuple):
    """What the front door shares with the app (reconciler/gate/frontdoor.py)."""

    proxy: Proxy
    follower: StateFollower
    metrics: GateMetrics


PARTS = web.AppKey("parts", Parts)


def build_app(catalog: Catalog) -> web.Application:
    """All routes, with the state follower and upstream session tied to the app's life."""
    gate = catalog.gate
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_host_check(gate)])
    follower = StateFollower(catalog.observed_path, gate.stale_after_s)
    metrics = GateMetrics()
    proxy = Proxy(catalog, follower, metrics)
    app[PARTS] = Parts(proxy, follower, metrics)
    guard = Guard(gate)  # the token check and its limiter: /toggle and the reads of engine output
    status_api = StatusApi(follower, metrics, lambda: proxy.inflight, lambda: proxy.budget.free, guard)
    toggle = Toggle(catalog, metrics, follower.stale, lambda: follower.revision, guard)

    for method, path, family, field in INFERENCE_ROUTES:
        route = path.split("{")[0].rstrip("/") + ("/*" if "{" in path else "")
        app.router.add_route(method, path, proxy.handler(route, family, field))
    app.router.add_get("/status", status_api.status)
    app.router.add_get("/events", status_api.events)
    app.router.add_get("/healthz", status_api.healthz)
    app.router.add_post("/toggle", toggle.handle)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    dashboard = Dashboard(catalog, follower, metrics, guard)
    dashboard.install(app)  # GET / (the page), /ui/*, /logs, /switches

    async def lifetime(_: web.Application) -> AsyncIterator[None]:
        await follower.start()
        metrics.watch(follower)
        await proxy.start()
        watcher = asyncio.create_task(_follow_catalog(CatalogSource(catalog, catalog.path), proxy, toggle,
                                                      dashboard, guard))
        yield
        watcher.cancel()
        await proxy.close()

    async def on_shutdown(_: web.Application) -> None:
        await follower.close()  # ends long-polls and /events before the grace period

    app.cleanup_ctx.append(lifetime)
    app.on_shutdown.append(on_shutdown)
    return app


async def serve(
    catalog: Catalog,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Listening | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve on ``catalog.gate`` host:port until ``stop`` is set (or the task is cancelled).

    ``on_listening`` gets the bound URLs (useful with port 0). ``reuse_port``: one of several
    workers on the port (SO_REUSEPORT; the kernel spreads connections over them).
    """
    app = build_app(catalog)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=clock.real_seconds(KEEPALIVE_S),
        shutdown_timeout=clock.real_seconds(SHUTDOWN_GRACE_S),
    )
    await runner.setup()
    server: asyncio.Server | None = None
    door: Door | None = None
    try:
        # Our own listener rather than a TCPSite: every connection starts at the front door,
        # which answers the plain inference requests itself and hands the rest to aiohttp.
        assert runner.server is not None
        proxy, follower, metrics = app[PARTS]
        door = Door(proxy.rules, proxy.pool, proxy.budget, proxy.flights, follower, metrics, catalog.gate,
                    routes_of(INFERENCE_ROUTES), runner.server,
                    clock.real_seconds(KEEPALIVE_S))
        server = await asyncio.get_running_loop().create_server(
            door.protocol, catalog.gate.host, catalog.gate.port, backlog=BACKLOG,
            reuse_address=True, reuse_port=reuse_port or None)
        urls = [_url(sock.getsockname()) for sock in server.sockets]
        (on_listening or _log_listening)(urls)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        if server is not None:
            server.close()
        if door is not None:
            await door.close(clock.real_seconds(SHUTDOWN_GRACE_S))
        await runner.cleanup()


def _url(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"http://[{host}]:{addr[1]}" if ":" in host else f"http://{host}:{addr[1]}"
    return str(addr)


def _log_listening(urls: list[str]) -> None:
    log.info("gate listening on %s", ", ".join(urls))


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one: systemd's default soft limit (1,024) let 10,000
    slow connections starve health checks. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(
    catalog: Catalog,
    *,
    stop: threading.Event | None = None,
    on_listening: Listening | None = None,
    reuse_port: bool = False,
) -> None:
    """Blocking: serve until SIGINT/SIGTERM (main thread) or until ``stop`` is set.

    From another thread (``ailayer up`` running the reconciler beside it), pass ``stop``;
    signals are only handled when called from the main thread.
    """

    raise_fd_limit()
    log.info("gate: %s", compiled.describe())

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, done.set)
        if stop is not None:
            def relay() -> None:
                stop.wait()
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    loop.call_soon_threadsafe(done.set)

            threading.Thread(target=relay, name="gate-stop", daemon=True).start()
        await serve(catalog, stop=done, on_listening=on_listening, reuse_port=reuse_port)

    # uvloop: about 7 % less CPU per proxied request than asyncio's own loop (issue 14,
    # bench/gate_throughput.py); the same asyncio API, so nothing else changes.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
