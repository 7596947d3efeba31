"""Run llama.cpp's HTTP server (``llama-server``) in-process, as a catalog engine command.

    python -m reconciler.engines.llamacpp serve --model PATH --host H --port P [--alias NAME]
                                        [--ctx-size N] [--threads N]

Why a launcher: the ``xllamacpp`` package ships llama.cpp with its server prebuilt for CPU
but as a library, not a ``llama-server`` binary. This module is that binary's stand-in: it
starts the server on the configured host and port, prints what it does, and exits 0 on
SIGTERM or SIGINT. Its command line contains ``reconciler.engines.llamacpp serve``, one of the
``llamacpp`` kind's stray patterns, so a leftover instance is recognised and cleared.

The server is llama.cpp's own: it binds the port first and answers ``GET /health`` with
503 ``{"error": {"message": "Loading model", ...}}`` while it loads, then 200. The load
runs inside the constructor of ``xllamacpp.Server`` and holds the GIL, so no Python code
(signal handlers included) runs until it returns; SIGTERM and SIGINT therefore keep their
default action during the load (the process ends at once, as a killed load should) and
only ask for a clean exit (code 0, at once, in-flight requests cut) once the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from reconciler.kit import clock

PREFIX = "ailayer-llamacpp:"


def log(message: str) -> None:
    """One line on stdout, flushed: the reconciler reads it from the engine's log file."""
    print(f"{PREFIX} {message}", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.engines.llamacpp",
        description="llama.cpp's HTTP server (via xllamacpp), in the foreground.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load a GGUF model and serve the OpenAI API")
    serve.add_argument("--model", required=True, type=Path, help="the GGUF file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--alias", default=None,
                       help="the model name the API reports and accepts (default: the file name)")
    serve.add_argument("--ctx-size", type=int, default=0,
                       help="context length; 0 = the model's own (llama-server's default)")
    serve.add_argument("--threads", type=int, default=-1, help="CPU threads; -1 = llama.cpp picks")
    return parser.parse_args(argv)


def server_params(args: argparse.Namespace) -> Any:
    """llama-server's parameters from our flags; everything else keeps llama.cpp's defaults."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(args.model)
    if hasattr(params, "hostnames"):  # a list since xllamacpp 2026.9 (several listen addresses)
        params.hostnames = [args.host]
    else:
        params.hostname = args.host
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    if args.alias:
        params.model_alias = {args.alias}
    return params


def wait_for_stop() -> int:
    """Block until SIGTERM or SIGINT; return the signal number."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    stop.wait()
    return received[0]


def leave(code: int) -> NoReturn:
    """Exit now, without llama.cpp's destructor.

    The destructor joins every in-flight generation (a long stream runs for minutes) and holds
    the GIL while it does, so no Python timeout could bound it. The server keeps nothing on
    disk, and the kernel closes its socket and frees its memory either way, so nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(args: argparse.Namespace) -> int:
    model: Path = args.model
    if not model.is_file():
        log(f"error: model file not found: {model}")
        return 1
    try:
        import xllamacpp
    except ImportError:
        log("error: xllamacpp is not installed (pip install 'ailayer[llamacpp]')")
        return 1
    # Default actions while loading: the load holds the GIL, a Python handler would only run
    # after it, and a load that is being cancelled should end now, not in 30 minutes.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    log(f"xllamacpp {xllamacpp.__version__}: loading {model} "
        f"({model.stat().st_size} bytes) for http://{args.host}:{args.port}")
    started = clock.monotonic()
    try:
        server = xllamacpp.Server(server_params(args))
    except RuntimeError as exc:
        log(f"error: llama.cpp server failed to start: {exc} (see its log lines above)")
        return 1
    log(f"ready in {clock.monotonic() - started:.2f} s: serving "
        f"{args.alias or model.name} on {server.listening_address}")
    signum = wait_for_stop()
    log(f"{signal.Signals(signum).name} received: stopped (in-flight requests are cut)")
    leave(0)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
