"""What the Ollama stand-in reads as real Ollama does, from its environment and version
rather than from flags: ``OLLAMA_HOST``, ``OLLAMA_KEEP_ALIVE`` (and a request's
``keep_alive``), ``OLLAMA_MODELS``, and the release it behaves like."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from reconciler.engines.demo.ollama_log import log

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default when neither the request nor OLLAMA_KEEP_ALIVE says
# The first release whose /api/ps waits for loads in progress; the stand-in's default, since
# later releases behave the same in everything it models.
DEFAULT_OLLAMA_VERSION = "0.32.4"
PS_WAITS_FOR_LOADS = (0, 32, 4)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


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
