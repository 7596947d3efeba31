"""POST /toggle: the HTTP twin of ``ailayer toggle``, through the very same atomic writer.

Selecting a model starts or kills processes on the GPU server, so it needs a bearer
token; with no token configured the endpoint is off rather than open.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from reconciler.domain import desired
from reconciler.domain.catalog import DEFAULT_TOKEN_ENV as TOKEN_ENV
from reconciler.domain.catalog import Catalog
from reconciler.gate import auth, errors
from reconciler.gate.auth import Access, Guard
from reconciler.gate.errors import Code, Refusal
from reconciler.gate.metrics import GateMetrics
from reconciler.kit.schemas import InvalidFile
from reconciler.store import desired_file

# {"model": "..."} is tiny; anything bigger is not a toggle.
MAX_BODY_BYTES = 4096
MAX_REQUESTED_BY = 200


class Toggle:
    def __init__(
        self, catalog: Catalog, metrics: GateMetrics, stale: Callable[[], bool],
        revision: Callable[[], int], guard: Guard,
    ) -> None:
        self._guard = guard  # the token check and its limiter, shared with the reads
        self._stale = stale
        self._revision = revision  # the observed state's: what GET /status?since= compares
        self._metrics = metrics
        self.use(catalog)

    def use(self, catalog: Catalog) -> None:
        """Validate toggles against this catalog from now on (the file changed)."""
        self._catalog = catalog

    def _refuse(self, refusal: Refusal) -> web.Response:
        self._metrics.request("/toggle", refusal.code)
        return errors.respond(refusal, errors.OPENAI, stale=self._stale())

    def _authorized(self, request: web.Request) -> Refusal | None:
        decision = self._guard.check(request.headers.get("Authorization"), request.remote)
        if decision.access is Access.OPEN:
            return Refusal(403, Code.TOGGLE_DISABLED,
                           f"POST /toggle is disabled: no token is configured (set gate.token "
                           f"or gate.token_env in the catalog, default ${TOKEN_ENV})")
        return auth.refusal(decision, "POST /toggle")

    async def handle(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return self._refuse(denied)
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return self._refuse(Refusal(413, Code.BODY_TOO_LARGE, "a toggle body is a few bytes"))
        parsed = self._parse(await request.read())
        if isinstance(parsed, Refusal):
            return self._refuse(parsed)
        model, who = parsed
        requested_by = f"{who or 'gate'} via http from {request.remote}"
        try:
            wish = await asyncio.to_thread(desired_file.write, self._catalog, model, requested_by)
        except desired.UnknownModel as exc:
            return self._refuse(Refusal(
                422, Code.UNKNOWN_MODEL,
                f"unknown model {model!r}; known models: {', '.join(exc.known)}",
                detail={"known_models": exc.known}))
        except (InvalidFile, OSError) as exc:
            return self._refuse(Refusal(500, Code.WRITE_FAILED, f"could not write the wish: {exc}"))
        self._metrics.request("/toggle", Code.ACCEPTED)
        body = {
            "model": wish.model,
            "generation": wish.generation,
            "desired_state": str(self._catalog.desired_path),
            "revision": self._revision(),
            "follow": "GET /status?wait=50&since=REVISION (this answer's revision) or GET /events",
        }
        stale = "true" if self._stale() else "false"
        return web.json_response(body, status=202, headers={errors.STALE_HEADER: stale})

    @staticmethod
    def _parse(raw: bytes) -> tuple[str | None, str | None] | Refusal:
        try:
            doc: Any = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "model" not in doc:
            return Refusal(400, Code.BAD_REQUEST,
                           'body must be JSON {"model": "NAME"} or {"model": null}')
        model, who = doc["model"], doc.get("requested_by")
        if model is not None and not isinstance(model, str):
            return Refusal(400, Code.BAD_REQUEST, "model must be a string or null")
        if who is not None and not isinstance(who, str):
            return Refusal(400, Code.BAD_REQUEST, "requested_by must be a string")
        return model, who[:MAX_REQUESTED_BY] if who else None
