"""The Ollama stand-in's per-model runner, once ``llama_server`` has made it look like
``llama-server``: hold its port and memory, load, report ready."""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
from collections.abc import Mapping
from typing import Any

from reconciler.engines.demo.ollama_log import log
from reconciler.engines.demo.worker import WorkerSpec, run_worker

CRASH_ERRORS = {
    "crash-loading": "panic: unable to allocate CUDA0 buffer (demo fault injected by --fail crash-loading)",
    "crash-ready": "CUDA error: an illegal memory access was encountered (demo fault injected by --fail crash-ready)",
}


def main(spec: Mapping[str, Any]) -> int:
    """Run the runner with the flags of the argv it shows; returns its exit code."""
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
