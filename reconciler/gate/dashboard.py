"""The dashboard page at ``/`` and the read-only routes it needs besides /status and /events.

The page is three static files shipped in the package (``ui/``): no build step and nothing
fetched from elsewhere, because these servers are often offline. Every URL the page uses is
relative, so it works the same at ``/`` and under a sub-path behind a reverse proxy. A strict
Content-Security-Policy (no inline script, nothing from another origin, no framing) limits
what a hostile log line or model name could do even if it slipped past ``textContent``.

Routes: ``GET /`` (the page), ``GET /ui/{asset}``, ``GET /ui/info`` (the catalog's models and
whether toggling is possible), ``GET /logs`` (the activity log over Server-Sent Events,
``?model=NAME`` to filter) and ``GET /switches`` (recent switches and their durations).
Changing state stays with ``POST /toggle`` and its bearer token. The activity log holds engine
output (a prompt an engine logged), so with a token configured ``/logs`` needs it too, in the
same header (reconciler/gate/auth.py); the page sends it with ``fetch``, never in the URL.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from reconciler import __version__
from reconciler.domain.catalog import Catalog
from reconciler.gate import auth, errors
from reconciler.gate.auth import Guard
from reconciler.gate.errors import Code
from reconciler.gate.logtail import LogTail
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.statefollow import StateFollower
from reconciler.gate.switches import SwitchLog
from reconciler.kit import clock

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Same cadence as /events: keeps an idle stream open through proxies.
LOGS_HEARTBEAT_S = 15.0
LOGS_RETRY_MS = 2000


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Read the page's files once; they are small and never change while the gate runs."""
    folder = resources.files("reconciler.gate").joinpath("ui")
    found = {}
    for name, content_type in ASSETS.items():
        body = folder.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        found[name] = Asset(body, gzip.compress(body, 9, mtime=0), etag, content_type)
    return found


class Dashboard:
    """The page, its catalog summary, the log stream and the switch history."""

    def __init__(self, catalog: Catalog, follower: StateFollower, metrics: GateMetrics, guard: Guard) -> None:
        self._guard = guard
        self._follower = follower
        self._metrics = metrics
        self._assets = load_assets()
        self.switches = SwitchLog()
        self.logs = LogTail(())
        self.use(catalog)

    def use(self, catalog: Catalog) -> None:
        """Describe this catalog from now on (the file changed)."""
        self._catalog = catalog
        self.logs.use((catalog.log_file, catalog.state_dir / "ai_layer_activity.log"))

    def install(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/ui/info", self.info)
        app.router.add_get("/ui/{name}", self.asset)
        app.router.add_get("/logs", self.log_events)
        app.router.add_get("/switches", self.switch_list)

        async def start(_: web.Application) -> None:
            self.switches.watch(self._follower)

        async def stop(_: web.Application) -> None:
            await self.logs.close()  # ends /logs streams before the grace period

        app.on_startup.append(start)
        app.on_shutdown.append(stop)

    # ------------------------------------------------------------------ static

    def _send(self, request: web.Request, name: str) -> web.Response:
        asset = self._assets[name]
        headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding"}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        body = asset.body
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = asset.gzipped
            headers["Content-Encoding"] = "gzip"
        headers["Content-Type"] = asset.content_type
        return web.Response(body=body, headers=headers)

    async def page(self, request: web.Request) -> web.Response:
        self._metrics.request("/", Code.OK)
        return self._send(request, "index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets or name == "index.html":
            raise web.HTTPNotFound(headers=SECURITY_HEADERS)
        self._metrics.request("/ui", Code.OK)
        return self._send(request, name)

    # ------------------------------------------------------------------ data

    async def info(self, _: web.Request) -> web.Response:
        """What the page cannot learn from /status: the models and whether it may toggle."""
        catalog = self._catalog
        gate = catalog.gate
        reason = None if gate.token else (
            f"toggling is disabled: the gate has no token configured (set ${gate.token_env} "
            f"before starting it, or gate.token in the catalog)")
        body = {
            "version": __version__,
            "models": [{"name": e.name, "kind": e.kind, "port": e.port, "served_name": e.served_name,
                        "boot_timeout_s": e.boot_timeout_s} for e in catalog.engines.values()],
            "toggle": {"enabled": gate.token is not None, "reason": reason,
                       "token_env": gate.token_env},
            # /logs and the engine's last line in /status and /events: the same token.
            "reads_need_token": gate.token is not None,
            "log_file": str(self.logs.path) if self.logs.path else None,
        }
        return web.json_response(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def switch_list(self, _: web.Request) -> web.Response:
        self._metrics.request("/switches", Code.OK)
        return web.json_response({"switches": self.switches.as_json()},
                                 headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def log_events(self, request: web.Request) -> web.StreamResponse:
        """The activity log as Server-Sent Events: the last lines, then each new batch."""
        decision = self._guard.check(request.headers.get("Authorization"), request.remote)
        denied = auth.refusal(decision, "GET /logs (engine output)")
        if denied is not None:
            self._metrics.request("/logs", denied.code)
            return errors.respond(denied, errors.OPENAI, stale=self._follower.stale())
        model = request.query.get("model") or None
        headers = {"Content-Type": "text/event-stream", **errors.NO_BUFFERING}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        self._metrics.request("/logs", Code.OK)
        self._metrics.waiters.inc()
        watcher, backlog = self.logs.subscribe(model)
        closed = asyncio.ensure_future(self.logs.closed())
        try:
            path = self.logs.path
            first = {"lines": backlog, "backlog": True, "file": str(path) if path else None}
            await resp.write(f"retry: {LOGS_RETRY_MS}\n\n".encode() + _event("log", first))
            while not self.logs.closing:
                batch = asyncio.ensure_future(watcher.queue.get())
                done, _ = await asyncio.wait({batch, closed}, timeout=clock.real_seconds(LOGS_HEARTBEAT_S),
                                             return_when=asyncio.FIRST_COMPLETED)
                if batch not in done:
                    batch.cancel()
                    if not done:
                        await resp.write(f": heartbeat {clock.iso()}\n\n".encode())
                    continue
                lines = batch.result()
                while not watcher.queue.empty():  # whatever else piled up goes in the same event
                    lines += watcher.queue.get_nowait()
                payload: dict[str, Any] = {"lines": lines}
                if watcher.dropped:
                    payload["dropped"], watcher.dropped = watcher.dropped, 0
                await resp.write(_event("log", payload))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            closed.cancel()
            self.logs.unsubscribe(watcher)
            self._metrics.waiters.dec()
        return resp


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
