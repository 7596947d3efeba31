"""``ollama serve``'s HTTP API in the stand-in: the native routes (``/api/generate``,
``/api/chat``, ``/api/ps``, ...) answering as Ollama does, NDJSON streams by default, and
the OpenAI-compatible ``/v1`` routes over the same lazily loaded models."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from reconciler.engines.demo.generation import (
    DEFAULT_MAX_TOKENS,
    count_tokens,
    embedding_vector,
    generate_all,
    paced_tokens,
)
from reconciler.engines.demo.httpio import int_field, json_error, read_json, stream_out, text_of
from reconciler.engines.demo.ollama_models import CONTEXT_LENGTH, LoadedModel, PulledModel, normalize
from reconciler.engines.demo.ollama_sched import LoadError, Scheduler
from reconciler.engines.demo.ollama_settings import OllamaSettings, parse_keep_alive
from reconciler.engines.demo.openai_api import OpenAIApi, openai_error
from reconciler.engines.demo.options import EngineOptions
from reconciler.engines.demo.serving import hang_middleware
from reconciler.engines.demo.stats import Stats, add_stats_route
from reconciler.kit import clock


def ollama_error(status: int, message: str) -> web.HTTPException:
    """Ollama's native error body: ``{"error": "..."}``."""
    return json_error(status, {"error": message})


def not_found_message(name: object) -> str:
    return f'model "{name}" not found, try pulling it first'


class OllamaApi:
    """``ollama serve``'s HTTP API: the native /api routes and the OpenAI /v1 ones, over its
    scheduler's runners."""

    def __init__(self, opts: EngineOptions, pulled: dict[str, PulledModel], settings: OllamaSettings) -> None:
        self.opts = opts
        self.pulled = pulled
        self.settings = settings
        self.stats = Stats()
        self.hang = asyncio.Event()
        self.sched = Scheduler(opts, settings, self.hang)
        self.openai = OpenAIApi(
            resolve=self.resolve_openai,
            model_cards=self.model_cards,
            stats=self.stats,
            token_delay_ms=opts.token_delay_ms,
        )

    def build(self) -> web.Application:
        app = web.Application(middlewares=[hang_middleware(self.hang)])
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_post("/api/embeddings", self.embeddings_legacy)
        self.openai.add_routes(app)
        add_stats_route(app, self.stats)
        return app

    # ---------------------------------------------------------------- helpers

    def lookup(self, body: dict[str, Any]) -> tuple[str, PulledModel]:
        """The requested name (echoed back, as Ollama does) and its pulled model, or 4xx."""
        requested = body.get("model") or body.get("name")
        if not isinstance(requested, str) or not requested:
            raise ollama_error(400, "model is required")
        pulled = self.pulled.get(normalize(requested))
        if pulled is None:
            raise ollama_error(404, not_found_message(requested))
        return requested, pulled

    def _keep_alive(self, body: dict[str, Any]) -> float | None:
        """The request's keep_alive, which overrides OLLAMA_KEEP_ALIVE."""
        try:
            return parse_keep_alive(body.get("keep_alive"), self.settings.keep_alive_s)
        except ValueError as exc:
            raise ollama_error(400, str(exc)) from exc

    @contextlib.asynccontextmanager
    async def using(self, model: PulledModel, keep: float | None) -> AsyncIterator[LoadedModel]:
        """The scheduler's hold on ``model`` for one request; a failed load is Ollama's 500."""
        try:
            async with self.sched.using(model, keep) as loaded:
                yield loaded
        except LoadError as exc:
            raise ollama_error(500, str(exc)) from exc

    @staticmethod
    def _header(name: str) -> dict[str, Any]:
        return {"model": name, "created_at": clock.iso()}

    # ---------------------------------------------------------------- simple routes

    async def root(self, _: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": self.settings.version})

    async def tags(self, _: web.Request) -> web.Response:
        return web.json_response({"models": [m.tag_entry() for m in self.pulled.values()]})

    async def ps(self, _: web.Request) -> web.Response:
        """Loaded models; before 0.32.4 also those whose runner is still loading."""
        return web.json_response({"models": [m.ps_entry() for m in await self.sched.listed()]})

    async def show(self, request: web.Request) -> web.Response:
        body = await read_json(request, functools.partial(ollama_error, 400))
        _, m = self.lookup(body)
        info = {"general.architecture": m.family, f"{m.family}.context_length": CONTEXT_LENGTH}
        capabilities = ["embedding"] if "embed" in m.name else ["completion"]
        return web.json_response(
            {
                "license": "",
                "modelfile": f"# Modelfile generated by demo\nFROM {m.name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": m.details(),
                "model_info": info,
                "capabilities": capabilities,
                "modified_at": m.modified_at,
            }
        )

    def model_cards(self) -> list[dict[str, Any]]:
        created = int(clock.now().timestamp())
        return [{"id": name, "object": "model", "created": created, "owned_by": "library"} for name in self.pulled]

    async def resolve_openai(self, requested: object) -> str:
        """The /v1 routes: same catalogue and lazy load, OpenAI error envelope."""
        pulled = self.pulled.get(normalize(requested)) if isinstance(requested, str) else None
        if pulled is None:
            raise openai_error(404, not_found_message(requested), "api_error")
        try:
            loaded = await self.sched.ensure_loaded(pulled)
        except LoadError as exc:
            raise openai_error(500, str(exc), "api_error") from exc
        self.sched.set_expiry(loaded, self.settings.keep_alive_s)  # /v1 requests carry no keep_alive
        return str(requested)

    # ---------------------------------------------------------------- generation

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, functools.partial(ollama_error, 400))
        prompt = text_of(body.get("prompt"))
        return await self._answer(request, body, prompt, lambda text: {"response": text}, preload=not prompt)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, functools.partial(ollama_error, 400))
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise ollama_error(400, "messages must be a list")
        return await self._answer(
            request,
            body,
            text_of(messages),
            lambda text: {"message": {"role": "assistant", "content": text}},
            preload=not messages,
        )

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        prompt: str,
        piece: Callable[[str], dict[str, Any]],
        *,
        preload: bool,
    ) -> web.StreamResponse:
        """Shared by generate and chat: (pre)load, then stream NDJSON or answer once."""
        started = clock.monotonic()
        name, pulled = self.lookup(body)
        keep = self._keep_alive(body)
        if preload:
            return await self._preload(name, pulled, keep, piece)
        options = body.get("options")
        n = int_field(options if isinstance(options, dict) else {}, "num_predict", default=DEFAULT_MAX_TOKENS)
        async with self.using(pulled, keep):
            timing = _Timing(started, clock.monotonic() - started, count_tokens(prompt), n, self.opts.token_delay_ms)
            self.stats.prompt_tokens += timing.prompt_tokens
            if body.get("stream", True):
                chunks = self._ndjson(name, n, piece, timing)
                return await stream_out(request, self.stats, "application/x-ndjson", chunks)
            with self.stats.track(streaming=False):
                text = await generate_all(n, self.opts.token_delay_ms)
            self.stats.generation_tokens += n
            return web.json_response({**self._header(name), **piece(text), **timing.final()})

    async def _preload(
        self, name: str, pulled: PulledModel, keep: float | None, piece: Callable[[str], dict[str, Any]]
    ) -> web.Response:
        """No prompt: just load (or, with keep_alive 0, unload), as real Ollama does."""
        if keep == 0:
            await self.sched.unload(pulled.name)
            reason = "unload"
        else:
            async with self.using(pulled, keep):
                reason = "load"
        return web.json_response({**self._header(name), **piece(""), "done": True, "done_reason": reason})

    async def _ndjson(
        self, name: str, n: int, piece: Callable[[str], dict[str, Any]], timing: _Timing
    ) -> AsyncIterator[bytes]:
        async for token in paced_tokens(n, self.opts.token_delay_ms):
            self.stats.generation_tokens += 1
            yield _line({**self._header(name), **piece(token), "done": False})
        yield _line({**self._header(name), **piece(""), **timing.final()})

    async def embed(self, request: web.Request) -> web.Response:
        body = await read_json(request, functools.partial(ollama_error, 400))
        name, pulled = self.lookup(body)
        started = clock.monotonic()
        async with self.using(pulled, self._keep_alive(body)):
            load_s = clock.monotonic() - started
            raw = body.get("input", "")
            inputs = raw if isinstance(raw, list) else [raw]
            with self.stats.track(streaming=False):
                vectors = [embedding_vector(text_of(x)) for x in inputs]
        return web.json_response(
            {
                "model": name,
                "embeddings": vectors,
                "total_duration": int((clock.monotonic() - started) * 1e9),
                "load_duration": int(load_s * 1e9),
                "prompt_eval_count": sum(count_tokens(text_of(x)) for x in inputs),
            }
        )

    async def embeddings_legacy(self, request: web.Request) -> web.Response:
        body = await read_json(request, functools.partial(ollama_error, 400))
        _, pulled = self.lookup(body)
        async with self.using(pulled, self._keep_alive(body)):
            with self.stats.track(streaming=False):
                vector = embedding_vector(text_of(body.get("prompt")))
        return web.json_response({"embedding": vector})



@dataclass(frozen=True)
class _Timing:
    """What the final record of a generation reports (durations in ns, like Ollama)."""

    started: float
    load_s: float
    prompt_tokens: int
    eval_tokens: int
    token_delay_ms: float

    def final(self) -> dict[str, Any]:
        return {
            "done": True,
            "done_reason": "stop",
            "total_duration": int((clock.monotonic() - self.started) * 1e9),
            "load_duration": int(self.load_s * 1e9),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 0,
            "eval_count": self.eval_tokens,
            "eval_duration": int(self.eval_tokens * self.token_delay_ms * 1e6),
        }


def _line(payload: object) -> bytes:
    """One NDJSON record."""
    return (json.dumps(payload) + "\n").encode()
