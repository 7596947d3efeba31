"""Machinery shared by the demo engines (vLLM-like and Ollama-like).

The demo engines exist so the reconciler can be exercised on a machine without a GPU:
they are real processes with real ports, a real worker child that holds memory (and
outlives a SIGKILLed parent, like a leaked vLLM EngineCore), and HTTP APIs close enough
to the real ones that the official ``openai`` and ``ollama`` clients work against them.
Every sleep and clock read goes through ``reconciler.kit.clock`` so ``AILAYER_TIME_SCALE``
speeds the whole scenario up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from aiohttp import web

from reconciler.kit import clock

DEMO_VERSION = "0.0-demo"
FAIL_MODES = ("none", "crash-loading", "crash-ready", "hang-ready", "exit-at-once")
ENV_BOOT_S = "AILAYER_DEMO_BOOT_S"
ENV_FAIL = "AILAYER_DEMO_FAIL"
ENV_TOKEN_DELAY_MS = "AILAYER_DEMO_TOKEN_DELAY_MS"  # noqa: S105 (not a secret)
ENV_VRAM_MB = "AILAYER_DEMO_VRAM_MB"
ENV_WORKER_ESCAPES = "AILAYER_DEMO_WORKER_ESCAPES"
DEFAULT_MAX_TOKENS = 16
READY_AFTER_S = 1.0  # scenario seconds between "ready" and an injected *-ready failure
SHUTDOWN_GRACE_S = 2.0  # scenario seconds a SIGTERMed engine waits for in-flight requests
MIB = 1024 * 1024
PAGE = 4096

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


# --------------------------------------------------------------------------- text


def token_text(index: int) -> str:
    """The ``index``-th generated token: a fixed word cycle, so tests can predict output."""
    word = WORDS[index % len(WORDS)]
    return word if index == 0 else " " + word


def demo_text(n_tokens: int) -> str:
    """The full text an engine generates for ``n_tokens`` tokens."""
    return "".join(token_text(i) for i in range(n_tokens))


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: whitespace words, at least one."""
    return max(1, len(text.split()))


def embedding_vector(text: str, dim: int = 16) -> list[float]:
    """A small deterministic vector in [-1, 1] derived from the text's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 127.5 - 1.0, 6) for i in range(dim)]


def embedding_base64(vector: list[float]) -> str:
    """float32 little-endian, base64: what the openai client asks for by default."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- output


def emit(line: str, stream: TextIO | None = None) -> None:
    """Write one whole line and flush; a vanished reader must not kill an orphan."""
    target = stream if stream is not None else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        target.write(line + "\n")
        target.flush()


def emit_progress(text: str, stream: TextIO | None = None) -> None:
    """Redraw a progress bar in place with a carriage return, as tqdm does."""
    target = stream if stream is not None else sys.stderr
    with contextlib.suppress(OSError, ValueError):
        target.write("\r" + text)
        target.flush()


def _mmss(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def progress_text(label: str, done: int, total: int, elapsed: float, per_step: float) -> str:
    """A tqdm-looking bar: ``label:  40% Completed | 2/5 [00:01<00:01,  1.50it/s]``."""
    pct = int(100 * done / total) if total else 100
    remaining = (total - done) * per_step
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"{label}: {pct:3d}% Completed | {done}/{total} [{_mmss(elapsed)}<{_mmss(remaining)}, {rate:5.2f}it/s]"


def traceback_lines(where: str, error: str) -> list[str]:
    """A traceback-looking block ending in the error line that log scrapers look for."""
    return [
        "Traceback (most recent call last):",
        f'  File "{where}", line 1, in load_model',
        error,
    ]


# --------------------------------------------------------------------------- options


def env_str(name: str, default: str) -> str:
    """An env var that backs a flag default (the flag wins when both are given)."""
    return os.environ.get(name) or default


def env_flag(name: str) -> bool:
    """True when an env var is set to a truthy value such as ``1``."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class EngineOptions:
    """What both engines are configured with, after flags and env vars are merged."""

    host: str
    port: int
    boot_seconds: float
    fail: str
    token_delay_ms: float
    vram_mb: int
    worker_escapes: bool


def add_engine_args(parser: argparse.ArgumentParser, *, boot_flag: str) -> None:
    """Flags both engines take; ``boot_flag`` names the load-time flag of each."""
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(boot_flag, dest="boot_seconds", type=float, default=float(env_str(ENV_BOOT_S, "3")))
    parser.add_argument("--fail", default=env_str(ENV_FAIL, "none"))
    parser.add_argument("--token-delay-ms", type=float, default=float(env_str(ENV_TOKEN_DELAY_MS, "20")))
    parser.add_argument("--vram-mb", type=int, default=int(env_str(ENV_VRAM_MB, "64")))
    parser.add_argument("--worker-escapes", action="store_true", default=env_flag(ENV_WORKER_ESCAPES))


def engine_options(parser: argparse.ArgumentParser, ns: argparse.Namespace, host: str, port: int) -> EngineOptions:
    """Validate the shared flags (env-backed defaults bypass argparse's own checks)."""
    if ns.fail not in FAIL_MODES:
        parser.error(f"--fail must be one of {', '.join(FAIL_MODES)}, got {ns.fail!r}")
    if ns.boot_seconds < 0 or ns.token_delay_ms < 0 or ns.vram_mb < 0:
        parser.error("--boot/--load seconds, --token-delay-ms and --vram-mb must be >= 0")
    return EngineOptions(
        host=ns.host if ns.host is not None else host,
        port=ns.port if ns.port is not None else port,
        boot_seconds=ns.boot_seconds,
        fail=ns.fail,
        token_delay_ms=ns.token_delay_ms,
        vram_mb=ns.vram_mb,
        worker_escapes=ns.worker_escapes,
    )




# --------------------------------------------------------------------------- worker side


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Flags the serving process passes down to its worker child."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--vram-mb", type=int, default=0)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--fail", choices=FAIL_MODES, default="none")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--escape", action="store_true")


def worker_flags(model: str, vram_mb: int, load_seconds: float, fail: str) -> list[str]:
    """The flags of ``add_worker_args`` a parent passes to its worker (the ready fd and
    ``--escape`` are each engine's to add)."""
    return ["--model", model, "--vram-mb", str(vram_mb), "--load-seconds", str(load_seconds), "--fail", fail]


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker loads: how long, how much memory, what to look like, how to fail."""

    vram_mb: int
    load_seconds: float
    fail: str
    ready_fd: int
    escape: bool
    progress_label: str
    steps: int
    crash_errors: Mapping[str, str]  # fail mode -> the exception line it dies with
    log: Callable[[str], None]
    # "tqdm": a bar redrawn with \r (vLLM); "dots": ``progress_label`` as a line, then one "."
    # per percent and a newline at 100 % (llama.cpp's default load callback).
    progress_style: str = "tqdm"
    # The line the real engine prints once its weights are in, given the seconds it took.
    loaded_line: Callable[[float], str] | None = None


def escape_session() -> None:
    """Leave the parent's session and shrug off SIGTERM/SIGHUP, like a badly behaved worker."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _cuda_torch() -> Any:
    """torch, when it imports and sees a GPU, so held memory shows up in NVML per process."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not stop the demo
        return None


class MemoryHold:
    """Memory a worker keeps for its whole life: CUDA tensors if possible, else touched RAM."""

    def __init__(self) -> None:
        self._torch = _cuda_torch()
        self._blocks: list[object] = []

    @property
    def device(self) -> str:
        return "cuda" if self._torch is not None else "cpu"

    def grab(self, mb: int) -> None:
        """Hold ``mb`` more MiB; RAM pages are written so RSS really grows."""
        if mb <= 0:
            return
        size = mb * MIB
        if self._torch is not None:
            self._blocks.append(self._torch.ones(size, dtype=self._torch.uint8, device="cuda"))
            return
        buf = bytearray(size)
        buf[::PAGE] = b"\x01" * len(range(0, size, PAGE))
        self._blocks.append(buf)


def _split_mb(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _crash(spec: WorkerSpec, where: str) -> int:
    emit("", sys.stderr)
    for line in traceback_lines(where, spec.crash_errors[spec.fail]):
        emit(line, sys.stderr)
    return 1


def _write_err(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def _load(spec: WorkerSpec, memory: MemoryHold) -> bool:
    """Grab memory shard by shard with a progress bar; False if told to crash mid-way."""
    steps = max(1, spec.steps)
    per_step = spec.load_seconds / steps
    start = clock.monotonic()
    dots = spec.progress_style == "dots"
    if dots:
        emit(spec.progress_label, sys.stderr)
    else:
        emit_progress(progress_text(spec.progress_label, 0, steps, 0.0, per_step))
    for done, mb in enumerate(_split_mb(spec.vram_mb, steps), start=1):
        clock.sleep(per_step)
        memory.grab(mb)
        elapsed = clock.monotonic() - start
        if dots:
            _write_err("." * (100 * done // steps - 100 * (done - 1) // steps))
        else:
            emit_progress(progress_text(spec.progress_label, done, steps, elapsed, per_step))
        if spec.fail == "crash-loading" and done >= (steps + 1) // 2:
            return False
    _write_err("\n")
    return True


def _report_ready(fd: int) -> None:
    """Tell the parent we are loaded; if it is already gone, carry on regardless."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, b"R")


def run_worker(spec: WorkerSpec, where: str) -> int:
    """Load, report ready, then hold the memory until killed.

    It deliberately never watches for its parent's death: a real vLLM EngineCore or
    Ollama runner orphaned by a SIGKILLed server keeps its VRAM, and finding and
    killing such orphans is exactly what the reconciler has to get right.
    """
    if spec.escape:
        escape_session()
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    if spec.fail == "exit-at-once":
        return 3
    memory = MemoryHold()
    spec.log(f"holding {spec.vram_mb} MiB on {memory.device} while loading")
    started = clock.monotonic()
    if not _load(spec, memory):
        return _crash(spec, where)
    took = clock.monotonic() - started
    spec.log(spec.loaded_line(took) if spec.loaded_line is not None
             else f"weights loaded: {spec.vram_mb} MiB in {took:.2f} seconds")
    _report_ready(spec.ready_fd)
    if spec.fail == "crash-ready":
        clock.sleep(READY_AFTER_S)
        return _crash(spec, where)
    while True:
        clock.sleep(3600.0)


# --------------------------------------------------------------------------- server side


class WorkerLink:
    """A worker child plus the pipe it reports on.

    The child gets the write end of a pipe: one byte means "loaded", end-of-file means
    it exited (the kernel closes the fd however it died), so one fd gives both readiness
    and death notice without polling, and without the child ever watching the parent.
    """

    def __init__(self, proc: subprocess.Popen[bytes], read_fd: int, escaped: bool) -> None:
        self.proc = proc
        self.escaped = escaped
        self.ready = asyncio.Event()
        self.dead = asyncio.Event()
        self._fd = read_fd
        os.set_blocking(read_fd, False)
        asyncio.get_running_loop().add_reader(read_fd, self._on_readable)

    @classmethod
    def spawn(
        cls,
        argv_for: Callable[[int], list[str]],
        *,
        escape: bool,
        env_for: Callable[[int], Mapping[str, str]] | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> WorkerLink:
        """Start a child (inheriting stdout, stderr, session and, by default, env) with a ready pipe.

        ``argv_for`` and ``env_for`` get the pipe's write fd, so each engine tells its child
        about it in its own way; ``keep_fds`` are further fds the child must hold open.
        ``escape`` says the child will leave the session and ignore SIGTERM (see ``stop``).
        """
        read_fd, write_fd = os.pipe()
        try:
            env = None if env_for is None else dict(env_for(write_fd))
            proc = subprocess.Popen(argv_for(write_fd), pass_fds=(write_fd, *keep_fds), env=env)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, read_fd, escape)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.ready.set()
            return
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.dead.set()

    async def exit_code(self, timeout_s: float = 5.0) -> int | None:
        """Reap the child once it has died; None if it has not exited within the timeout."""
        deadline = clock.monotonic() + timeout_s
        while (code := self.proc.poll()) is None and clock.monotonic() < deadline:
            await asyncio.sleep(clock.real_seconds(0.01))
        return code

    async def kill(self) -> None:
        """SIGKILL and reap: what a server does to a child it gives up on mid-load."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.exit_code()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the worker and wait; an escaped worker ignores it, so don't wait for it."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        if self.escaped:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dead.wait(), clock.real_seconds(grace_s))
        if self.proc.poll() is None and not self.dead.is_set():
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.exit_code()


async def first_set(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set (callers then check which, in priority order)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so shutdown runs our cleanup and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def set_after(event: asyncio.Event, seconds: float) -> None:
    """Set ``event`` after ``seconds`` of scenario time (used for injected *-ready faults)."""
    await asyncio.sleep(clock.real_seconds(seconds))
    event.set()


def hang_middleware(hang: asyncio.Event) -> Any:
    """Once ``hang`` is set, accept connections but never answer (a wedged engine)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if hang.is_set():
            await asyncio.Event().wait()
        return await handler(request)

    return middleware


async def start_site(
    app: web.Application, where: tuple[str, int] | socket.socket, access_log_class: type[Any]
) -> web.AppRunner:
    """Serve ``app`` on ``(host, port)``, or listen on an already bound socket.

    Handler cancellation is on so a client hang-up cancels work (a generation, a load).
    """
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log_class=access_log_class,
        shutdown_timeout=clock.real_seconds(SHUTDOWN_GRACE_S),
    )
    await runner.setup()
    site = web.SockSite(runner, where) if isinstance(where, socket.socket) else web.TCPSite(runner, *where)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


# --------------------------------------------------------------------------- stats


@dataclass
class Stats:
    """Request accounting for cancellation tests: started == finished + cancelled + active."""

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    active_streams: int = 0
    active_requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "requests_started": self.requests_started,
            "requests_finished": self.requests_finished,
            "requests_cancelled": self.requests_cancelled,
            "active_streams": self.active_streams,
        }

    @contextlib.contextmanager
    def track(self, *, streaming: bool) -> Iterator[None]:
        """Count one inference request; a client that hangs up counts as cancelled."""
        self.requests_started += 1
        self.active_requests += 1
        self.active_streams += int(streaming)
        try:
            yield
        except ConnectionResetError:  # the response is gone; swallow so the handler returns
            self.requests_cancelled += 1
        except asyncio.CancelledError:
            self.requests_cancelled += 1
            raise
        except BaseException:
            self.requests_finished += 1
            raise
        else:
            self.requests_finished += 1
        finally:
            self.active_requests -= 1
            self.active_streams -= int(streaming)


def add_stats_route(app: web.Application, stats: Stats) -> None:
    """``GET /demo/stats``: the counters tests read to see cancellations."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(stats.as_json())

    app.router.add_get("/demo/stats", handler)


# --------------------------------------------------------------------------- generation


async def token_pause(delay_ms: float) -> None:
    """The time one token takes to generate."""
    await asyncio.sleep(clock.real_seconds(delay_ms / 1000.0))


async def paced_tokens(n_tokens: int, delay_ms: float) -> AsyncIterator[str]:
    """Tokens one at a time, each after its generation delay."""
    for i in range(n_tokens):
        await token_pause(delay_ms)
        yield token_text(i)


async def generate_all(n_tokens: int, delay_ms: float) -> str:
    """A whole completion, taking as long as streaming it would."""
    await token_pause(delay_ms * n_tokens)
    return demo_text(n_tokens)


async def stream_out(
    request: web.Request, stats: Stats, content_type: str, chunks: AsyncIterable[bytes]
) -> web.StreamResponse:
    """Write each chunk as soon as it exists (its own write, so its own TCP segment)."""
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    with stats.track(streaming=True):
        await resp.prepare(request)
        async for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
    return resp


async def read_json(request: web.Request, bad: Callable[[str], web.HTTPException]) -> dict[str, Any]:
    """The request body as a JSON object, or the engine's own 400 error."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


def json_error(status: int, payload: object) -> web.HTTPException:
    """An aiohttp HTTP exception carrying a JSON body, raisable from anywhere in a handler."""
    exc = web.HTTPException(text=json.dumps(payload), content_type="application/json")
    exc.set_status(status)
    return exc


def text_of(value: object) -> str:
    """Flatten a prompt, message content or input (str, list of parts, ...) to text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return text_of(value.get("text", value.get("content", "")))
    return "" if value is None else str(value)


def int_field(body: Mapping[str, Any], *names: str, default: int) -> int:
    """The first of ``names`` present as a non-negative int, else ``default``."""
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


# --------------------------------------------------------------------------- OpenAI API


def openai_error(status: int, message: str, err_type: str) -> web.HTTPException:
    """The OpenAI error envelope, which the openai client turns into typed exceptions."""
    return json_error(status, {"error": {"message": message, "type": err_type, "param": None, "code": status}})


def openai_bad_request(message: str) -> web.HTTPException:
    return openai_error(400, message, "BadRequestError")


def sse(payload: object) -> bytes:
    """One Server-Sent Event."""
    return f"data: {json.dumps(payload)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"

Resolver = Callable[[object], Awaitable[str]]
"""Maps a request's ``model`` field to the served name, raising the engine's 404 if unknown."""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class _Job:
    """One parsed OpenAI generation request."""

    model: str
    max_tokens: int
    prompt_tokens: int
    stream: bool
    include_usage: bool


class OpenAIApi:
    """The OpenAI-compatible routes, shared by the vLLM-like and Ollama-like engines."""

    def __init__(
        self,
        *,
        resolve: Resolver,
        model_cards: Callable[[], list[dict[str, Any]]],
        stats: Stats,
        token_delay_ms: float,
    ) -> None:
        self._resolve = resolve
        self._model_cards = model_cards
        self._stats = stats
        self._delay_ms = token_delay_ms

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def _job(self, body: dict[str, Any], prompt: str) -> _Job:
        model = await self._resolve(body.get("model"))
        options = body.get("stream_options")
        tokens = count_tokens(prompt)
        self._stats.prompt_tokens += tokens
        return _Job(
            model=model,
            max_tokens=int_field(body, "max_completion_tokens", "max_tokens", default=DEFAULT_MAX_TOKENS),
            prompt_tokens=tokens,
            stream=bool(body.get("stream", False)),
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, openai_bad_request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise openai_bad_request("'messages' must be a list")
        job = await self._job(body, text_of(messages))
        if job.stream:
            return await stream_out(request, self._stats, "text/event-stream", self._chat_chunks(job))
        with self._stats.track(streaming=False):
            text = await generate_all(job.max_tokens, self._delay_ms)
        self._stats.generation_tokens += job.max_tokens
        message = {"role": "assistant", "content": text, "tool_calls": []}
        choice = {"index": 0, "message": message, "finish_reason": "length", "logprobs": None}
        return web.json_response(self._envelope("chat.completion", "chatcmpl", job, [choice]))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, openai_bad_request)
        job = await self._job(body, text_of(body.get("prompt", "")))
        if job.stream:
            return await stream_out(request, self._stats, "text/event-stream", self._completion_chunks(job))
        with self._stats.track(streaming=False):
            text = await generate_all(job.max_tokens, self._delay_ms)
        self._stats.generation_tokens += job.max_tokens
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        return web.json_response(self._envelope("text_completion", "cmpl", job, [choice]))

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request, openai_bad_request)
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        model = await self._resolve(body.get("model"))
        as_b64 = body.get("encoding_format") == "base64"
        with self._stats.track(streaming=False):
            data = [
                {"object": "embedding", "index": i, "embedding": self._vector(text_of(x), as_b64)}
                for i, x in enumerate(inputs)
            ]
        prompt = sum(count_tokens(text_of(x)) for x in inputs)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return web.json_response({"object": "list", "model": model, "data": data, "usage": usage})

    @staticmethod
    def _vector(text: str, as_b64: bool) -> list[float] | str:
        vector = embedding_vector(text)
        return embedding_base64(vector) if as_b64 else vector

    @staticmethod
    def _envelope(obj: str, prefix: str, job: _Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": new_id(prefix),
            "object": obj,
            "created": int(clock.now().timestamp()),
            "model": job.model,
            "choices": choices,
            "usage": _usage(job.prompt_tokens, job.max_tokens),
        }

    def _chunk(self, obj: str, cid: str, job: _Job, choice: dict[str, Any]) -> dict[str, Any]:
        created = int(clock.now().timestamp())
        return {
            "id": cid,
            "object": obj,
            "created": created,
            "model": job.model,
            "choices": [choice],
        }

    async def _chat_chunks(self, job: _Job) -> AsyncIterator[bytes]:
        cid, obj = new_id("chatcmpl"), "chat.completion.chunk"
        i = 0
        async for token in paced_tokens(job.max_tokens, self._delay_ms):
            delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
            choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            self._stats.generation_tokens += 1
            i += 1
            yield sse(self._chunk(obj, cid, job, choice))
        last = {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
        yield sse(self._chunk(obj, cid, job, last))
        async for tail in self._usage_tail(obj, cid, job):
            yield tail

    async def _completion_chunks(self, job: _Job) -> AsyncIterator[bytes]:
        cid, obj = new_id("cmpl"), "text_completion"
        async for token in paced_tokens(job.max_tokens, self._delay_ms):
            choice = {"index": 0, "text": token, "finish_reason": None, "logprobs": None}
            self._stats.generation_tokens += 1
            yield sse(self._chunk(obj, cid, job, choice))
        last = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
        yield sse(self._chunk(obj, cid, job, last))
        async for tail in self._usage_tail(obj, cid, job):
            yield tail

    async def _usage_tail(self, obj: str, cid: str, job: _Job) -> AsyncIterator[bytes]:
        """The optional usage-only chunk (``stream_options.include_usage``), then [DONE]."""
        if job.include_usage:
            chunk = self._chunk(obj, cid, job, {})
            chunk["choices"] = []
            chunk["usage"] = _usage(job.prompt_tokens, job.max_tokens)
            yield sse(chunk)
        yield SSE_DONE
