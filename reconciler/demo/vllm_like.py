"""A vLLM look-alike: ``python -m reconciler.demo.vllm_like serve MODEL [options]``.

It behaves the way the reconciler has to cope with in real vLLM: the port only opens
once the "EngineCore" child has loaded (so a booting engine refuses connections), the
EngineCore is a separate process that holds the (V)RAM and survives a SIGKILLed API
server, and the OpenAI-compatible API streams one token per SSE event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from reconciler import clock
from reconciler.demo.common import (
    DEMO_VERSION,
    READY_AFTER_S,
    EngineOptions,
    OpenAIApi,
    Stats,
    WorkerLink,
    WorkerSpec,
    add_engine_args,
    add_stats_route,
    add_worker_args,
    emit,
    engine_options,
    first_set,
    hang_middleware,
    openai_error,
    run_worker,
    set_after,
    start_site,
    stop_on_signals,
    traceback_lines,
    worker_flags,
)

MODULE = "reconciler.demo.vllm_like"
ENGINE_CORE_TITLE = "VLLM::EngineCore"
MAX_MODEL_LEN = 4096
ENGINE_INIT_FAILED = "RuntimeError: Engine core initialization failed. See root cause above."
ENGINE_DEAD = "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."
CRASH_ERRORS = {
    "crash-loading": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    " (demo fault injected by --fail crash-loading)",
    "crash-ready": "RuntimeError: CUDA error: an illegal memory access was encountered"
    " (demo fault injected by --fail crash-ready)",
}


def log(msg: str, *, level: str = "INFO", source: str = "api_server.py:1") -> None:
    """A vLLM-format log line: ``INFO 11-26 10:00:00 [api_server.py:1] msg``."""
    stamp = clock.now().astimezone().strftime("%m-%d %H:%M:%S")
    emit(f"{level} {stamp} [{source}] {msg}")


def core_log(msg: str) -> None:
    """EngineCore lines carry the process prefix real vLLM adds for its workers."""
    stamp = clock.now().astimezone().strftime("%m-%d %H:%M:%S")
    emit(f"(EngineCore_DP0 pid={os.getpid()}) INFO {stamp} [core.py:1] {msg}")


def uvicorn(msg: str) -> None:
    """The uvicorn-style lines vLLM's HTTP layer prints."""
    emit(f"INFO:     {msg}")


class UvicornAccessLogger(AbstractAccessLogger):
    """Access lines in uvicorn's format, as vLLM prints them."""

    def log(self, request: Any, response: Any, time: float) -> None:
        version = f"{request.version.major}.{request.version.minor}"
        uvicorn(
            f'{request.remote} - "{request.method} {request.path_qs} HTTP/{version}" '
            f"{response.status} {response.reason}"
        )


# --------------------------------------------------------------------------- HTTP app


class VllmApp:
    """The HTTP side: health, models, OpenAI routes, metrics and demo stats."""

    def __init__(self, opts: EngineOptions, model: str, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.stats = Stats()
        self.hang = asyncio.Event()
        self.hang_task: asyncio.Task[None] | None = None  # held so the task is not collected
        self.openai = OpenAIApi(
            resolve=self.resolve,
            model_cards=self.model_cards,
            stats=self.stats,
            token_delay_ms=opts.token_delay_ms,
        )

    def build(self) -> web.Application:
        app = web.Application(middlewares=[hang_middleware(self.hang)])
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        self.openai.add_routes(app)
        add_stats_route(app, self.stats)
        return app

    async def resolve(self, requested: object) -> str:
        """vLLM answers only to its served names; anything else is a 404."""
        if requested is None:
            return self.names[0]
        if requested in self.names:
            return str(requested)
        raise openai_error(404, f"The model `{requested}` does not exist.", "NotFoundError")

    def model_cards(self) -> list[dict[str, Any]]:
        created = int(clock.now().timestamp())
        return [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.model,
                "parent": None,
                "max_model_len": MAX_MODEL_LEN,
                "permission": [],
            }
            for name in self.names
        ]

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": DEMO_VERSION})

    async def metrics(self, _: web.Request) -> web.Response:
        label = f'{{model_name="{self.names[0]}"}}'
        stats = self.stats
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {float(stats.active_requests)}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} 0.0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} 0.0",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{label} {float(stats.prompt_tokens)}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{label} {float(stats.generation_tokens)}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


# --------------------------------------------------------------------------- API server


def engine_core_argv(opts: EngineOptions, model: str) -> list[str]:
    """The EngineCore child's command line; ps shows both the module and the vLLM title."""
    return [
        sys.executable,
        "-m",
        MODULE,
        "engine-core",
        ENGINE_CORE_TITLE,
        *worker_flags(opts, model),
    ]


def _log_startup(opts: EngineOptions) -> None:
    url = f"http://{opts.host}:{opts.port}"
    log(f"Starting vLLM API server 0 on {url}", source="launcher.py:1")
    for route in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions"):
        log(f"Route: {route}", source="launcher.py:1")
    uvicorn(f"Started server process [{os.getpid()}]")
    uvicorn("Waiting for application startup.")
    uvicorn("Application startup complete.")
    uvicorn(f"Uvicorn running on {url} (Press CTRL+C to quit)")


def _log_shutdown() -> None:
    uvicorn("Shutting down")
    uvicorn("Waiting for application shutdown.")
    uvicorn("Application shutdown complete.")
    uvicorn(f"Finished server process [{os.getpid()}]")


async def _boot(opts: EngineOptions, model: str, stop: asyncio.Event) -> WorkerLink | int:
    """Start the EngineCore and wait for it to load; an int is the exit code instead."""
    link = WorkerLink.spawn(engine_core_argv(opts, model), escape=opts.worker_escapes)
    log(f"Waiting for EngineCore (pid {link.pid}) to load {model}", source="core_client.py:1")
    await first_set(stop, link.ready, link.dead)
    if stop.is_set():
        log("shutdown requested while the EngineCore was loading")
        await link.stop()
        return 0
    if not link.ready.is_set():
        log(f"EngineCore exited with code {await link.exit_code()} during startup", level="ERROR")
        for line in traceback_lines(__file__, ENGINE_INIT_FAILED):
            emit(line, sys.stderr)
        return 1
    return link


async def _serve_loaded(opts: EngineOptions, link: WorkerLink, http: VllmApp, stop: asyncio.Event) -> int:
    """Bind (only now, like vLLM) and serve until SIGTERM (0) or the EngineCore dies (1)."""
    try:
        runner = await start_site(http.build(), opts.host, opts.port, UvicornAccessLogger)
    except OSError as exc:
        log(f"could not bind {opts.host}:{opts.port}: {exc}", level="ERROR")
        await link.stop()
        return 1
    _log_startup(opts)
    if opts.fail == "hang-ready":
        http.hang_task = asyncio.create_task(set_after(http.hang, READY_AFTER_S))
    await first_set(stop, link.dead)
    _log_shutdown()
    await runner.cleanup()
    if stop.is_set():
        await link.stop()
        return 0
    code = await link.exit_code()
    log(f"EngineCore (pid {link.pid}) died, exit code {code}", level="ERROR", source="core.py:1")
    emit(ENGINE_DEAD, sys.stderr)
    return 1


async def serve(opts: EngineOptions, model: str, names: list[str]) -> int:
    """The ``serve`` command: boot the EngineCore, then serve; returns the exit code."""
    stop = stop_on_signals()
    log(f"vLLM API server version {DEMO_VERSION}")
    log(
        f"args: model={model!r} served_model_name={names} host={opts.host!r} port={opts.port}"
        f" fail={opts.fail!r} vram_mb={opts.vram_mb}"
    )
    if opts.fail == "exit-at-once":
        log("exiting at once (demo fault injected by --fail exit-at-once)", level="ERROR")
        return 3
    booted = await _boot(opts, model, stop)
    if isinstance(booted, int):
        return booted
    return await _serve_loaded(opts, booted, VllmApp(opts, model, names), stop)


# --------------------------------------------------------------------------- EngineCore


def engine_core(ns: argparse.Namespace) -> int:
    """The worker: load weights with a progress bar, report ready, hold memory forever."""
    core_log(f"Initializing a V1 LLM engine (v{DEMO_VERSION}) with config: model={ns.model!r}")
    spec = WorkerSpec(
        vram_mb=ns.vram_mb,
        load_seconds=ns.load_seconds,
        fail=ns.fail,
        ready_fd=ns.ready_fd,
        escape=ns.escape,
        progress_label="Loading safetensors checkpoint shards",
        steps=5,
        crash_errors=CRASH_ERRORS,
        log=core_log,
    )
    return run_worker(spec, __file__)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the OpenAI-compatible API server")
    serve_p.add_argument("model")
    serve_p.add_argument("--served-model-name", nargs="+", default=None)
    add_engine_args(serve_p, boot_flag="--boot-seconds")
    core_p = sub.add_parser("engine-core", help="internal: the worker child")
    core_p.add_argument("title", help="process title shown in ps, e.g. VLLM::EngineCore")
    add_worker_args(core_p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if ns.command == "engine-core":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return engine_core(ns)
    if unknown:  # real vLLM takes hundreds of flags; accept them so launch templates work
        log(f"ignoring flags the demo does not model: {' '.join(unknown)}", level="WARNING")
    opts = engine_options(parser, ns, "127.0.0.1", 8000)
    names = list(ns.served_model_name or [ns.model])
    return asyncio.run(serve(opts, ns.model, names))


if __name__ == "__main__":
    sys.exit(main())
