"""An Ollama look-alike: ``python -m reconciler.engines.demo.ollama_like serve [options]``.

It reproduces what the reconciler has to cope with in real Ollama (docs/ENGINES.md has
each behaviour with its source):

* ``serve`` listens at once but holds no model; the first request naming a pulled model
  starts a ``<prefix>/lib/ollama/llama-server --model <blob> --port N --host 127.0.0.1``
  child (reconciler/engines/demo/llama_server.py) in serve's group and session, with serve's
  environment; it holds the (V)RAM and survives a SIGKILLed ``serve``;
* ``/api/ps`` follows ``--ollama-version``: before 0.32.4 it lists a model as soon as its
  runner starts (listed is not loaded); from 0.32.4 on it waits until loads finish;
* a load is aborted (the runner SIGKILLed) when the client whose request started it
  hangs up;
* a request's ``keep_alive`` overrides ``OLLAMA_KEEP_ALIVE``: ``0`` unloads the model as
  soon as the request ends;
* generation streams NDJSON by default.
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
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from reconciler.engines.demo import llama_server
from reconciler.engines.demo.common import (
    DEFAULT_MAX_TOKENS,
    MIB,
    READY_AFTER_S,
    EngineOptions,
    OpenAIApi,
    Stats,
    WorkerLink,
    WorkerSpec,
    add_engine_args,
    add_stats_route,
    count_tokens,
    embedding_vector,
    emit,
    engine_options,
    first_set,
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
)
from reconciler.kit import clock
from reconciler.kit.freeport import free_port

MODULE = "reconciler.engines.demo.ollama_like"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default when neither the request nor OLLAMA_KEEP_ALIVE says
# The first release whose /api/ps waits for loads in progress; the stand-in's default, since
# later releases behave the same in everything it models.
DEFAULT_OLLAMA_VERSION = "0.32.4"
PS_WAITS_FOR_LOADS = (0, 32, 4)
RUNNER_HOST = "127.0.0.1"  # serve always talks to its runners over loopback
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


def parse_keep_alive(value: object, default: float | None = DEFAULT_KEEP_ALIVE_S) -> float | None:
    """Seconds to keep a model loaded; None means forever (any negative, like Ollama).

    ``value`` None (not given) means ``default``: OLLAMA_KEEP_ALIVE's, for a request.
    """
    if value is None:
        return default
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


def parse_version(text: str) -> tuple[int, ...]:
    """``0.32.4`` -> (0, 32, 4); raises ValueError for anything else."""
    parts = text.strip().lstrip("v").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected a version like 0.32.4, got {text!r}")
    return tuple(int(p) for p in parts)


def env_keep_alive() -> float | None:
    """OLLAMA_KEEP_ALIVE as Ollama reads it (a duration or seconds); invalid means the default."""
    raw = os.environ.get("OLLAMA_KEEP_ALIVE", "").strip()
    if not raw:
        return DEFAULT_KEEP_ALIVE_S
    try:
        return parse_keep_alive(raw)
    except ValueError:
        log(f"invalid OLLAMA_KEEP_ALIVE {raw!r}, using the default {DEFAULT_KEEP_ALIVE_S:.0f}s", level="WARN")
        return DEFAULT_KEEP_ALIVE_S


def models_dir() -> Path:
    """OLLAMA_MODELS, else ~/.ollama/models: where Ollama keeps manifests and blobs."""
    raw = os.environ.get("OLLAMA_MODELS")
    return Path(raw) if raw else Path.home() / ".ollama" / "models"


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

    def blob(self, models: Path) -> str:
        """The GGUF blob Ollama hands its runner (the stand-in never reads it)."""
        return str(models / "blobs" / f"sha256-{self.digest}")

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
    users: int = 0  # requests using it now; it never expires while one does
    expiry: asyncio.TimerHandle | None = None

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


@dataclass(frozen=True)
class OllamaSettings:
    """What real Ollama takes from its version and environment rather than from flags."""

    version: str = DEFAULT_OLLAMA_VERSION
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S  # OLLAMA_KEEP_ALIVE; None: forever
    models: Path = Path("models")  # OLLAMA_MODELS
    prefix: str = sys.prefix  # where lib/ollama/llama-server is said to live

    @property
    def ps_waits_for_loads(self) -> bool:
        return parse_version(self.version) >= PS_WAITS_FOR_LOADS


# --------------------------------------------------------------------------- server


class OllamaServer:
    """``ollama serve``: model catalogue, runner lifecycle and the HTTP API."""

    def __init__(self, opts: EngineOptions, pulled: dict[str, PulledModel], settings: OllamaSettings) -> None:
        self.opts = opts
        self.pulled = pulled
        self.settings = settings
        self.stats = Stats()
        self.hang = asyncio.Event()
        self.loaded: dict[str, LoadedModel] = {}
        self.starting: dict[str, LoadedModel] = {}  # runner started, model not loaded yet
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

    async def ensure_loaded(self, model: PulledModel) -> LoadedModel:
        """Load ``model`` unless loaded; concurrent callers share one load.

        The load belongs to the request that started it: when that client hangs up, its
        handler is cancelled and so is the load (the runner is killed), as in Ollama. The
        other requests waiting on it then start a load of their own.
        """
        while True:
            current = self.loaded.get(model.name)
            if current is not None and not current.link.dead.is_set():
                return current
            task = self._loading.get(model.name)
            if task is None:
                task = asyncio.create_task(self._load(model))
                self._loading[model.name] = task
                task.add_done_callback(functools.partial(self._load_done, model.name))
                return await task  # cancelling this request cancels the load
            try:
                return await asyncio.shield(task)  # a waiter that leaves does not abort it
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # this request's own client left
                # else the load's own client left and it was aborted: load again for ours

    def _load_done(self, name: str, task: asyncio.Task[LoadedModel]) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported twice

    def _runner_settings(self, ready_fd: int) -> dict[str, Any]:
        opts = self.opts
        return {
            "ready_fd": ready_fd,
            "vram_mb": opts.vram_mb,
            "load_seconds": opts.boot_seconds,
            "fail": opts.fail,
            "escape": opts.worker_escapes,
        }

    async def _load(self, model: PulledModel) -> LoadedModel:
        port = free_port()
        shown = llama_server.shown_argv(self.settings.prefix, model.blob(self.settings.models), port, RUNNER_HOST)
        log(f"starting llama server: cmd={' '.join(shown)}", source="server.go:1")
        began = clock.monotonic()
        argv = llama_server.boot_argv(shown)
        link = WorkerLink.spawn(
            lambda _: argv,
            env_for=lambda ready_fd: llama_server.environment(shown, self._runner_settings(ready_fd)),
            escape=self.opts.worker_escapes,
        )
        self._links.append(link)
        self.starting[model.name] = LoadedModel(model, link, port)
        try:
            await first_set(link.ready, link.dead)
        except asyncio.CancelledError:
            log(
                f"load of {model.name} aborted: context canceled (the client went away)",
                level="WARN",
                source="sched.go:1",
            )
            await link.kill()
            raise
        finally:
            loaded = self.starting.pop(model.name)
        if not link.ready.is_set():
            code = await link.exit_code()
            message = f"llama runner process has terminated: exit status {code}"
            log(message, level="ERROR", source="sched.go:1")
            raise LoadError(message)
        log(f"llama runner started in {clock.monotonic() - began:.2f} seconds", source="server.go:1")
        self.loaded[model.name] = loaded
        self._background(self._watch(loaded))
        if self.opts.fail == "hang-ready":
            self._background(set_after(self.hang, READY_AFTER_S))
        return loaded

    @contextlib.asynccontextmanager
    async def using(self, model: PulledModel, keep: float | None) -> AsyncIterator[LoadedModel]:
        """Hold ``model`` loaded for one request; then keep it ``keep`` seconds (None: forever)."""
        try:
            loaded = await self.ensure_loaded(model)
        except LoadError as exc:
            raise ollama_error(500, str(exc)) from exc
        loaded.users += 1
        try:
            yield loaded
        finally:
            loaded.users -= 1
            self._keep(loaded, keep)

    def _keep(self, loaded: LoadedModel, keep: float | None) -> None:
        """Set the expiry as the last request asked; once nobody uses it, unload at expiry."""
        loaded.keep(keep)
        if loaded.expiry is not None:
            loaded.expiry.cancel()
            loaded.expiry = None
        if keep is None or loaded.users:
            return
        loaded.expiry = asyncio.get_running_loop().call_later(
            clock.real_seconds(keep), lambda: self._background(self._expire(loaded))
        )

    async def _expire(self, loaded: LoadedModel) -> None:
        if loaded.users == 0 and self.loaded.get(loaded.pulled.name) is loaded:
            await self.unload(loaded.pulled.name)

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

    def _keep_alive(self, body: dict[str, Any]) -> float | None:
        """The request's keep_alive, which overrides OLLAMA_KEEP_ALIVE."""
        try:
            return parse_keep_alive(body.get("keep_alive"), self.settings.keep_alive_s)
        except ValueError as exc:
            raise ollama_error(400, str(exc)) from exc

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
        if self.settings.ps_waits_for_loads:
            loads = list(self._loading.values())
            if loads:
                await asyncio.wait(loads)  # waits for them without cancelling them
            listed = list(self.loaded.values())
        else:
            listed = [*self.loaded.values(), *self.starting.values()]
        return web.json_response({"models": [m.ps_entry() for m in listed]})

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
            loaded = await self.ensure_loaded(pulled)
        except LoadError as exc:
            raise openai_error(500, str(exc), "api_error") from exc
        self._keep(loaded, self.settings.keep_alive_s)  # /v1 requests carry no keep_alive
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
            await self.unload(pulled.name)
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


async def serve(opts: EngineOptions, pulled: dict[str, PulledModel], settings: OllamaSettings) -> int:
    """Bind at once, serve until SIGTERM, then stop the runners and exit 0."""
    stop = stop_on_signals()
    log(
        f"server config: OLLAMA_HOST={opts.host}:{opts.port} OLLAMA_MODELS={settings.models}"
        f" OLLAMA_KEEP_ALIVE={'-1' if settings.keep_alive_s is None else f'{settings.keep_alive_s:g}s'}"
        f" models={','.join(pulled)}"
    )
    server = OllamaServer(opts, pulled, settings)
    try:
        runner = await start_site(server.build(), (opts.host, opts.port), GinAccessLogger)
    except OSError as exc:
        emit(f"Error: listen tcp {opts.host}:{opts.port}: {exc}", sys.stderr)
        return 1
    log(f"Listening on {opts.host}:{opts.port} (version {settings.version})")
    await stop.wait()
    log("shutting down", source="routes.go:1")
    await server.shutdown()
    await runner.cleanup()
    return 0


# --------------------------------------------------------------------------- runner


def llama_server_main(spec: Mapping[str, Any]) -> int:
    """The runner child, once it shows as llama-server: hold its port and memory, load, report ready."""
    parser = argparse.ArgumentParser(prog="llama-server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", required=True)
    ns = parser.parse_args(spec["argv"][1:])
    runner_log = functools.partial(log, source="runner.go:1")
    runner_log(f"starting llama-server for {ns.model} on {ns.host}:{ns.port}")
    listener: socket.socket | None = None
    with contextlib.suppress(OSError):  # like a real runner, it owns a port; losing a race is ok
        listener = socket.create_server((ns.host, ns.port))
    worker = WorkerSpec(
        vram_mb=int(spec["vram_mb"]),
        load_seconds=float(spec["load_seconds"]),
        fail=str(spec["fail"]),
        ready_fd=int(spec["ready_fd"]),
        escape=bool(spec["escape"]),
        progress_label="load_tensors: loading model tensors, this can take a while... (mmap = true)",
        progress_style="dots",
        steps=10,
        crash_errors=CRASH_ERRORS,
        log=runner_log,
    )
    try:
        return run_worker(worker, __file__)
    finally:
        if listener is not None:
            listener.close()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the Ollama API server")
    serve_p.add_argument("--models", default="gemma2:9b", help="comma list of pulled models")
    serve_p.add_argument(
        "--ollama-version",
        default=DEFAULT_OLLAMA_VERSION,
        help="the Ollama release to behave like (/api/ps: before 0.32.4 lists loading models, from it waits)",
    )
    add_engine_args(serve_p, boot_flag="--load-seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        parse_version(ns.ollama_version)
    except ValueError as exc:
        parser.error(f"--ollama-version: {exc}")
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    opts = engine_options(parser, ns, host, port)
    settings = OllamaSettings(version=ns.ollama_version, keep_alive_s=env_keep_alive(), models=models_dir())
    return asyncio.run(serve(opts, catalogue(ns.models, opts.vram_mb), settings))


if __name__ == "__main__":
    sys.exit(main())
