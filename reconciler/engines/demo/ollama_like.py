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
import os
import sys

from reconciler.engines.demo.logtext import emit
from reconciler.engines.demo.ollama_api import OllamaApi
from reconciler.engines.demo.ollama_log import GinAccessLogger, log
from reconciler.engines.demo.ollama_models import PulledModel, catalogue
from reconciler.engines.demo.ollama_settings import (
    DEFAULT_OLLAMA_VERSION,
    OllamaSettings,
    env_keep_alive,
    models_dir,
    parse_ollama_host,
    parse_version,
)
from reconciler.engines.demo.options import EngineOptions, add_engine_args, engine_options
from reconciler.engines.demo.serving import start_site, stop_on_signals

MODULE = "reconciler.engines.demo.ollama_like"


async def serve(opts: EngineOptions, pulled: dict[str, PulledModel], settings: OllamaSettings) -> int:
    """Bind at once, serve until SIGTERM, then stop the runners and exit 0."""
    stop = stop_on_signals()
    log(
        f"server config: OLLAMA_HOST={opts.host}:{opts.port} OLLAMA_MODELS={settings.models}"
        f" OLLAMA_KEEP_ALIVE={'-1' if settings.keep_alive_s is None else f'{settings.keep_alive_s:g}s'}"
        f" models={','.join(pulled)}"
    )
    server = OllamaApi(opts, pulled, settings)
    try:
        runner = await start_site(server.build(), (opts.host, opts.port), GinAccessLogger)
    except OSError as exc:
        emit(f"Error: listen tcp {opts.host}:{opts.port}: {exc}", sys.stderr)
        return 1
    log(f"Listening on {opts.host}:{opts.port} (version {settings.version})")
    await stop.wait()
    log("shutting down", source="routes.go:1")
    await server.sched.shutdown()
    await runner.cleanup()
    return 0


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
