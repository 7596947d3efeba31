"""The flags and environment variables both demo engines take, merged and checked."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

FAIL_MODES = ("none", "crash-loading", "crash-ready", "hang-ready", "exit-at-once")
READY_AFTER_S = 1.0  # scenario seconds between "ready" and an injected *-ready failure
ENV_BOOT_S = "AILAYER_DEMO_BOOT_S"
ENV_FAIL = "AILAYER_DEMO_FAIL"
ENV_TOKEN_DELAY_MS = "AILAYER_DEMO_TOKEN_DELAY_MS"  # noqa: S105 (not a secret)
ENV_VRAM_MB = "AILAYER_DEMO_VRAM_MB"
ENV_WORKER_ESCAPES = "AILAYER_DEMO_WORKER_ESCAPES"


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
