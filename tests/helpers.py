"""Shared test helpers: free ports, deadline waits, a reconciler under test, leak checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
T = TypeVar("T")

# Generous ceilings for conditions on a loaded 2-core CI machine; a passing run takes a
# fraction of them. These are deadlines, not sleeps.
DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], T | None], timeout: float = DEADLINE_S,
               interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {str(last)[:300]})")


def demo_engine(kind: str, port: int, boot_s: float = 0.3, **extra: Any) -> dict[str, Any]:
    """A catalog entry for a demo engine on ``port``."""
    if kind == "vllm":
        command = ["{python}", "-m", "reconciler.demo.vllm_like", "serve", "openai/gpt-oss-20b",
                   "--host", "{host}", "--port", "{port}", "--boot-seconds", str(boot_s),
                   "--token-delay-ms", "5"]
        entry = {"kind": "vllm", "served_name": "openai/gpt-oss-20b"}
    else:
        command = ["{python}", "-m", "reconciler.demo.ollama_like", "serve", "--host", "{host}",
                   "--port", "{port}", "--models", "gemma2:9b", "--load-seconds", str(boot_s),
                   "--token-delay-ms", "5"]
        entry = {"kind": "ollama", "served_name": "gemma2:9b"}
    # Per-port patterns: a test must never take a developer's running demo engine (or a
    # concurrent test's) for a stray of its own. Children are still found by cookie and tree.
    head = command[1:command.index("{port}") + 1]
    entry["match"] = [" ".join(head).replace("{host}", "127.0.0.1").replace("{port}", f"{port} ")]
    entry.update({"command": command + list(extra.pop("args", [])), "port": port,
                  "ready": {"period_s": 0.1}, "liveness": {"period_s": 0.5},
                  "restart_backoff": {"initial_s": 0.5, "max_s": 2}})
    entry.update(extra)
    return entry


@dataclass
class Stack:
    """A catalog in a temp dir, plus a reconciler process when started."""

    root: Path
    engines: dict[str, dict[str, Any]]
    resync_s: float = 1.0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.write_catalog()

    @property
    def config(self) -> Path:
        return self.root / "engines.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "activity.log"

    @property
    def desired(self) -> Path:
        return self.root / "desired_state.yaml"

    @property
    def stdout_path(self) -> Path:
        return self.root / "reconciler.out"

    def write_catalog(self) -> None:
        doc = {"state_dir": "run", "log_file": str(self.log_file),
               "resync_interval_s": self.resync_s, "engines": self.engines}
        self.config.write_text(yaml.safe_dump(doc))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "reconciler", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, cwd=self.root)

    def toggle(self, model: str | None) -> None:
        result = self.cli("toggle", model or "none")
        assert result.returncode == 0, result.stderr

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        out = self.stdout_path.open("ab")
        err = (self.root / "reconciler.err").open("ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "reconciler", "reconcile", "--config", str(self.config), *extra],
            stdout=out, stderr=err, env={**os.environ, **self.env}, cwd=self.root)
        out.close()
        err.close()
        return self.proc

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=DEADLINE_S)

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir / "observed_state.json").read_text()))
        except (OSError, ValueError):
            return {}

    def wait_phase(self, phase: str, model: str | None = None, timeout: float = DEADLINE_S,
                   ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = self.status()
            if doc.get("phase") == phase and (model is None or doc.get("active_model") == model):
                return doc
            return None
        return wait_until(f"phase {phase} {model or ''}", check, timeout)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""


def engine_procs(marker: str) -> list[psutil.Process]:
    """This test session's live processes whose command line contains ``marker``."""
    found = []
    run = os.environ.get(TEST_RUN_ENV)
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(proc.info["cmdline"] or []) and proc.environ().get(TEST_RUN_ENV) == run:
                found.append(proc)
        except psutil.Error:
            continue
    return found


TEST_RUN_ENV = "AILAYER_TEST_RUN"
"""Set once per pytest session and inherited by everything a test starts (engines too, even
after they re-parent to init), so leak checks find exactly our processes and nobody else's."""


def ours_since(started: float) -> list[psutil.Process]:
    """Live processes started since ``started`` that carry this test session's marker."""
    marker = os.environ.get(TEST_RUN_ENV)
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["create_time", "status", "pid"]):
        try:
            if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.info["create_time"] < started - 1:
                continue
            if marker and proc.environ().get(TEST_RUN_ENV) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def sampler(markers: tuple[str, str], stop: Callable[[], bool]) -> Iterator[tuple[int, int]]:
    """Yield (count of this session's processes matching markers[0], markers[1]) every ~10 ms."""
    run = os.environ.get(TEST_RUN_ENV)
    while not stop():
        counts = [0, 0]
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.info["cmdline"] or [])
                if not any(m in cmd for m in markers) or proc.environ().get(TEST_RUN_ENV) != run:
                    continue
            except psutil.Error:
                continue
            for i, marker in enumerate(markers):
                if marker in cmd:
                    counts[i] += 1
        yield counts[0], counts[1]
        time.sleep(0.01)
