"""The Ollama stand-in's log lines, in real Ollama's formats: Go slog for its own events,
gin for HTTP access."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.abc import AbstractAccessLogger

from reconciler.engines.demo.logtext import emit
from reconciler.kit import clock


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
