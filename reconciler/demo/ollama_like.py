"""An Ollama look-alike: ``python -m reconciler.demo.ollama_like serve [options]``.

It behaves the way the reconciler has to cope with in real Ollama: ``serve`` answers at
once but holds no model; the first request naming a pulled model spawns a "runner"
child that loads it (holding (V)RAM, surviving a SIGKILLed ``serve``), and only then
does ``/api/ps`` list the model. Generation streams NDJSON by default, as Ollama does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from reconciler import clock
from reconciler.demo.common import (
    DEFAULT_MAX_TOKENS,
    DEMO_VERSION,
    MIB,
    READY_AFTER_S,
    EngineOptions,
    OpenAIApi,
    Stats,
    WorkerLink,
    WorkerSpec,
    add_engine_args,
    add_stats_route,
    add_worker_args,
    count_tokens,
    embedding_vector,
    emit,
    engine_options,
    first_set,
    free_port,
    generate_all,
    hang_middleware,
    int_field,
    json_error,
    openai_error,
    paced_tokens,
    read_json,
    run_worker,
    set_after,
    start_site,
    stop_on_signals,
    stream_out,
    text_of,
    worker_flags,
)

MODULE = "reconciler.demo.ollama_like"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0
CONTEXT_LENGTH = 4096
# Go's largest time.Duration: what real Ollama adds to "now" for keep_alive -1 (year ~2318).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
CRASH_ERRORS = {
    "crash-loading": "panic: unable to allocate CUDA0 buffer (demo fault injected by --fail crash-loading)",
    "crash-ready": "CUDA error: an illegal memory access was encountered (demo fault injected by --fail crash-ready)",
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def log(msg: str, *, level: str = "INFO", source: str = "routes.go:1") -> None:
    """An Ollama (Go slog) format line: ``time=... level=INFO source=... msg="..."``."""
    emit(f"time={clock.iso()} level={level} source={source} msg={json.dumps(msg)}")


class GinAccessLogger(AbstractAccessLogger):
    """Access lines in the gin format real Ollama prints."""

    def log(self, request: Any, response: Any, time: float) -> None:
        stamp = clock.now().astimezone().strftime("%Y/%m/%d - %H:%M:%S")
        latency = f"{time * 1000:.3f}ms"
        emit(
            f"[GIN] {stamp} | {response.status:3d} | {latency:>13} | {request.remote!s:>15} |"
            f' {request.method:<7} "{request.path}"'
        )


def ollama_error(status: int, message: str) -> web.HTTPException:
    """Ollama's native error body: ``{"error": "..."}``."""
    return json_error(status, {"error": message})


def not_found_message(name: object) -> str:
    return f'model "{name}" not found, try pulling it first'


class LoadError(Exception):
    """A runner died before it finished loading."""


# --------------------------------------------------------------------------- options


def parse_ollama_host(value: str | None) -> tuple[str, int]:
    """``OLLAMA_HOST`` as real Ollama reads it: ``[scheme://]host[:port]``."""
    text = (value or "").strip().split("://", 1)[-1].rstrip("/")
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, ""
    host = host.strip("[]") or DEFAULT_HOST
    return host, int(port) if port else DEFAULT_PORT


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"invalid duration {text!r}")
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_keep_alive(value: object) -> float | None:
    """Seconds to keep a model loaded; None means forever (any negative, like Ollama)."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = _go_duration(value.strip())
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    return None if seconds < 0 else seconds


def normalize(name: str) -> str:
    """``gemma2`` means ``gemma2:latest``, as in Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class PulledModel:
    """A model "on disk": what /api/tags and /api/show describe."""

    name: str
    size: int
    modified_at: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0].rsplit("/", 1)[-1]

    def details(self) -> dict[str, Any]:
        tag = self.name.split(":", 1)[1]
        size = tag.upper() if re.fullmatch(r"\d+(\.\d+)?[bBmM]", tag) else "7B"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": size,
            "quantization_level": "Q4_0",
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def catalogue(names: str, vram_mb: int) -> dict[str, PulledModel]:
    """The pulled models from the ``--models`` comma list."""
    stamp = clock.iso()
    models = [normalize(n.strip()) for n in names.split(",") if n.strip()]
    return {name: PulledModel(name, vram_mb * MIB, stamp) for name in models}


@dataclass
class LoadedModel:
    """A model with a live runner: what /api/ps lists."""

    pulled: PulledModel
    link: WorkerLink
    port: int
    expires_at: datetime = field(default_factory=clock.now)

    def keep(self, seconds: float | None) -> None:
        self.expires_at = clock.now() + (FOREVER if seconds is None else timedelta(seconds=seconds))

    def ps_entry(self) -> dict[str, Any]:
        m = self.pulled
        return {
            "name": m.name,
            "model": m.name,
            "size": m.size,
            "digest": m.digest,
            "details": m.details(),
            "expires_at": clock.iso(self.expires_at),
            "size_vram": m.size,
            "context_length": CONTEXT_LENGTH,
        }


def runner_argv(opts: EngineOptions, name: str, port: int) -> list[str]:
    """The runner child's command line (``reconciler.demo.ollama_like runner --model ...``)."""
    return [sys.executable, "-m", MODULE, "runner", *worker_flags(opts, name), "--port", str(port)]


# --------------------------------------------------------------------------- server


class OllamaServer:
    """``ollama serve``: model catalogue, runner lifecycle and the HTTP API."""

    def __init__(self, opts: EngineOptions, pulled: dict[str, PulledModel]) -> None:
        self.opts = opts
        self.pulled = pulled
        self.stats = Stats()
        self.hang = asyncio.Event()
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._links: list[WorkerLink] = []
        self._tasks: set[asyncio.Task[None]] = set()
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

    # ---------------------------------------------------------------- runners

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ensure_loaded(self, model: PulledModel, keep: float | None) -> float:
        """Load ``model`` unless loaded; concurrent callers share one load. Returns its seconds."""
        started = clock.monotonic()
        current = self.loaded.get(model.name)
        if current is None or current.link.dead.is_set():
            task = self._loading.get(model.name)
            if task is None:
                task = asyncio.create_task(self._load(model))
                self._loading[model.name] = task
                task.add_done_callback(functools.partial(self._load_done, model.name))
            current = await asyncio.shield(task)  # a hung-up client must not cancel the load
        current.keep(keep)
        return clock.monotonic() - started

    def _load_done(self, name: str, task: asyncio.Task[LoadedModel]) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported twice

    async def _load(self, model: PulledModel) -> LoadedModel:
        port = free_port()
        argv = runner_argv(self.opts, model.name, port)
        log(f"starting llama server: {' '.join(argv[1:])}", source="server.go:1")
        link = WorkerLink.spawn(argv, escape=self.opts.worker_escapes)
        self._links.append(link)
        await first_set(link.ready, link.dead)
        if not link.ready.is_set():
            code = await link.exit_code()
            message = f"llama runner process has terminated: exit status {code}"
            log(message, level="ERROR", source="sched.go:1")
            raise LoadError(message)
        log(f"llama runner started, model {model.name} (pid {link.pid})", source="server.go:1")
        loaded = LoadedModel(model, link, port)
        self.loaded[model.name] = loaded
        self._background(self._watch(loaded))
        if self.opts.fail == "hang-ready":
            self._background(set_after(self.hang, READY_AFTER_S))
        return loaded

    async def _watch(self, loaded: LoadedModel) -> None:
        """Forget a model whose runner died on its own (an unload removes it first)."""
        await loaded.link.dead.wait()
        code = await loaded.link.exit_code()
        if self.loaded.get(loaded.pulled.name) is loaded:
            del self.loaded[loaded.pulled.name]
            log(
                f"llama runner for {loaded.pulled.name} terminated: exit status {code}",
                level="ERROR",
                source="sched.go:1",
            )

    async def unload(self, name: str) -> None:
        loaded = self.loaded.pop(name, None)
        if loaded is not None:
            log(f"unloading {name}", source="sched.go:1")
            await loaded.link.stop()

    async def shutdown(self) -> None:
        """Stop loads and runners; escaped runners shrug off the SIGTERM and stay."""
        for task in [*self._loading.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*(link.stop() for link in self._links))

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

    async def _load_for(self, pulled: PulledModel, keep: float | None) -> float:
        try:
            return await self.ensure_loaded(pulled, keep)
        except LoadError as exc:
            raise ollama_error(500, str(exc)) from exc

    @staticmethod
    def _keep_alive(body: dict[str, Any]) -> float | None:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise ollama_error(400, str(exc)) from exc

    @staticmethod
    def _header(name: str) -> dict[str, Any]:
        return {"model": name, "created_at": clock.iso()}

    # ---------------------------------------------------------------- simple routes

    async def root(self, _: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": DEMO_VERSION})

    async def tags(self, _: web.Request) -> web.Response:
        return web.json_response({"models": [m.tag_entry() for m in self.pulled.values()]})

    async def ps(self, _: web.Request) -> web.Response:
        return web.json_response({"models": [m.ps_entry() for m in self.loaded.values()]})

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
            await self.ensure_loaded(pulled, DEFAULT_KEEP_ALIVE_S)
        except LoadError as exc:
            raise openai_error(500, str(exc), "api_error") from exc
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
        load_s = await self._load_for(pulled, keep)
        options = body.get("options")
        n = int_field(options if isinstance(options, dict) else {}, "num_predict", default=DEFAULT_MAX_TOKENS)
        timing = _Timing(started, load_s, count_tokens(prompt), n, self.opts.token_delay_ms)
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
            await self.unload(pulled.name)
            reason = "unload"
        else:
            await self._load_for(pulled, keep)
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
        load_s = await self._load_for(pulled, self._keep_alive(body))
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
        await self._load_for(pulled, self._keep_alive(body))
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


async def serve(opts: EngineOptions, pulled: dict[str, PulledModel]) -> int:
    """Bind at once, serve until SIGTERM, then stop the runners and exit 0."""
    stop = stop_on_signals()
    log(f"server config: OLLAMA_HOST={opts.host}:{opts.port} models={','.join(pulled)}")
    server = OllamaServer(opts, pulled)
    try:
        runner = await start_site(server.build(), opts.host, opts.port, GinAccessLogger)
    except OSError as exc:
        emit(f"Error: listen tcp {opts.host}:{opts.port}: {exc}", sys.stderr)
        return 1
    log(f"Listening on {opts.host}:{opts.port} (version {DEMO_VERSION})")
    await stop.wait()
    log("shutting down", source="routes.go:1")
    await server.shutdown()
    await runner.cleanup()
    return 0


# --------------------------------------------------------------------------- runner


def runner_main(ns: argparse.Namespace) -> int:
    """The runner child: hold its port and its memory, load with progress, report ready."""
    runner_log = functools.partial(log, source="runner.go:1")
    runner_log(f"starting go runner for {ns.model} on port {ns.port}")
    listener: socket.socket | None = None
    with contextlib.suppress(OSError):  # like a real runner, it owns a port; losing a race is ok
        listener = socket.create_server(("127.0.0.1", ns.port))
    spec = WorkerSpec(
        vram_mb=ns.vram_mb,
        load_seconds=ns.load_seconds,
        fail=ns.fail,
        ready_fd=ns.ready_fd,
        escape=ns.escape,
        progress_label="llama_model_load: loading model tensors",
        steps=10,
        crash_errors=CRASH_ERRORS,
        log=runner_log,
    )
    try:
        return run_worker(spec, __file__)
    finally:
        if listener is not None:
            listener.close()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the Ollama API server")
    serve_p.add_argument("--models", default="gemma2:9b", help="comma list of pulled models")
    add_engine_args(serve_p, boot_flag="--load-seconds")
    runner_p = sub.add_parser("runner", help="internal: the model runner child")
    runner_p.add_argument("--port", type=int, required=True)
    add_worker_args(runner_p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "runner":
        return runner_main(ns)
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    opts = engine_options(parser, ns, host, port)
    return asyncio.run(serve(opts, catalogue(ns.models, opts.vram_mb)))


if __name__ == "__main__":
    sys.exit(main())
