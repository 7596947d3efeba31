"""A gate started on its own, for the gate's end-to-end tests: the reconciler is played by
``FakeReconciler``, which writes the observed-state file exactly as the real one does
(atomically, with a heartbeat), so a test puts the gate in any phase at once, points it at a
demo engine it started itself, and checks what clients see. The fixtures that hand these out
are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from reconciler.domain import status
from reconciler.kit import clock
from reconciler.kit.freeport import free_port
from reconciler.store import state_file
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
VLLM_SERVED = "openai/gpt-oss-20b"
OLLAMA_SERVED = "gemma2:9b"
# Per-token delay of the demo engines: long enough that chunk arrival times are
# distinguishable, short enough that a whole test stream takes well under a second.
TOKEN_DELAY_MS = 30
# Deadlines for conditions; generous because a loaded CI box is slow, never slept through.
START_DEADLINE_S = 20.0
CONDITION_DEADLINE_S = 10.0
STOP_GRACE_S = 5.0


# --------------------------------------------------------------------------- processes


class Processes:
    """Starts processes and, at the end, kills their whole trees and proves none is left."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[subprocess.Popen[bytes]] = []
        self._ports: dict[str, int] = {}

    def port_for(self, kind: str) -> int:
        """One port per engine kind and test: the catalog names it, and the engine listens there
        (the gate proxies only to an engine URL its catalog names)."""
        return self._ports.setdefault(kind, free_port())

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        """Start ``argv`` with output to ``logdir/name.log``; returns the log path."""
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        self.started.append(proc)
        return log

    def tree(self) -> list[psutil.Process]:
        procs: list[psutil.Process] = []
        for popen in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(popen.pid)
                procs += [parent, *parent.children(recursive=True)]
        return procs

    def stop_all(self) -> None:
        procs = self.tree()  # collected before any kill, so orphans are still known
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=STOP_GRACE_S)
        for popen in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=STOP_GRACE_S)
        left = [p for p in procs if _alive(p)]
        assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class DemoEngine:
    url: str
    log: Path

    def stats(self) -> dict[str, int]:
        data: dict[str, int] = httpx.get(self.url + "/demo/stats", timeout=2.0).json()
        return data


def start_vllm(procs: Processes, served: str = VLLM_SERVED) -> DemoEngine:
    port = procs.port_for("vllm")
    log = procs.start("vllm", [
        sys.executable, "-m", "reconciler.engines.demo.vllm_like", "serve", served,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served,
        "--boot-seconds", "0", "--token-delay-ms", str(TOKEN_DELAY_MS), "--vram-mb", "1",
    ])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until("the vLLM-like engine", lambda: _http_ok(url + "/health"), START_DEADLINE_S)
    return DemoEngine(url, log)


def start_ollama(procs: Processes, model: str = OLLAMA_SERVED) -> DemoEngine:
    port = procs.port_for("ollama")
    log = procs.start("ollama", [
        sys.executable, "-m", "reconciler.engines.demo.ollama_like", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--models", model,
        "--load-seconds", "0", "--token-delay-ms", str(TOKEN_DELAY_MS), "--vram-mb", "1",
    ])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until("the Ollama-like engine", lambda: _http_ok(url + "/api/version"), START_DEADLINE_S)
    # Ollama loads lazily; load now so no test measures a model load.
    httpx.post(url + "/api/generate", json={"model": model, "keep_alive": -1}, timeout=20.0)
    wait_until("model loaded", lambda: model in httpx.get(url + "/api/ps", timeout=2.0).text, CONDITION_DEADLINE_S)
    return DemoEngine(url, log)


# --------------------------------------------------------------------------- state


@dataclass
class FakeReconciler:
    """Writes observed_state.json the way the reconciler does: atomically, heartbeat included."""

    path: Path
    revision: int = 0

    def write(self, phase: status.Phase, **fields: Any) -> int:
        """Write a state in ``phase``; returns its revision (bumped on every write)."""
        self.revision += 1
        now = clock.iso()
        base: dict[str, Any] = {
            "phase": phase, "phase_since": now, "desired_model": None, "active_model": None,
            "message": f"test state {self.revision}", "revision": self.revision,
            "reconciler": {"pid": os.getpid(), "heartbeat": now},
        }  # fmt: skip
        base.update(fields)
        state_file.write(self.path, status.Status(**base))
        return self.revision

    def idle(self) -> int:
        return self.write(status.Phase.IDLE)

    def ready(self, engine: DemoEngine, model: str, served: str) -> int:
        info = status.EngineInfo(
            model=model, served_name=served, instance=f"inst-{self.revision + 1}", pid=None,
            pids=[], port=int(engine.url.rsplit(":", 1)[1]), url=engine.url,
            started_at=clock.iso(), adopted=False,
        )  # fmt: skip
        return self.write(status.Phase.READY, desired_model=model, active_model=model,
                          engine=info)

    def loading(self, model: str, elapsed_s: float = 125.0, budget_s: float = 2700.0,
                progress: dict[str, Any] | None = None) -> int:
        boot = status.BootInfo(started_at=clock.iso(), elapsed_s=elapsed_s, budget_s=budget_s,
                               deadline="2030-01-01T00:45:00.000+00:00", attempt=1, progress=progress)
        return self.write(status.Phase.LOADING, desired_model=model, boot=boot,
                          last_log_line="Loading safetensors checkpoint shards: 40% Completed")

    def failed(self, model: str, reason: str, message: str) -> int:
        err = status.ErrorInfo(reason=reason, message=message, at=clock.iso())
        return self.write(status.Phase.FAILED, desired_model=model, last_error=err,
                          restarts=3)


# --------------------------------------------------------------------------- the gate


@dataclass
class Gate:
    url: str
    dir: Path
    state: FakeReconciler
    log: Path
    catalog: Path

    @property
    def desired_path(self) -> Path:
        return self.dir / "desired_state.yaml"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=CONDITION_DEADLINE_S, **kw)


def write_catalog(directory: Path, gate: dict[str, Any], ports: dict[str, int]) -> Path:
    doc = {
        "state_dir": str(directory / "run"),
        "desired_state": str(directory / "desired_state.yaml"),
        "log_file": str(directory / "activity.log"),
        "gate": {"listen": "127.0.0.1:0", **gate},
        "engines": {
            "gpt-oss": {"kind": "vllm", "command": ["{python}", "-c", "pass"], "port": ports["vllm"],
                        "served_name": VLLM_SERVED},
            "gemma2": {"kind": "ollama", "command": ["{python}", "-c", "pass"], "port": ports["ollama"],
                       "served_name": OLLAMA_SERVED},
        },
    }  # fmt: skip
    path = directory / "engines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_gate(procs: Processes, directory: Path, **gate: Any) -> Gate:
    """Start ``python -m reconciler.gate`` on a kernel-chosen port and read the port back."""
    catalog = write_catalog(directory, gate, {k: procs.port_for(k) for k in ("vllm", "ollama")})
    env = {"AILAYER_TOKEN": "", "AILAYER_TIME_SCALE": "1"}
    log = procs.start("gate", [sys.executable, "-m", "reconciler.gate", "--config", str(catalog)],
                      env)

    def listening() -> str | None:
        for line in log.read_text().splitlines():
            if line.startswith("ailayer gate listening on "):
                return line.rsplit(" ", 1)[1]
        return None

    url = wait_until("the gate to listen", listening, START_DEADLINE_S)
    wait_until("the gate's /healthz", lambda: _http_ok(url + "/healthz"), CONDITION_DEADLINE_S)
    return Gate(url, directory, FakeReconciler(directory / "run" / "observed_state.json"), log,
                catalog)


# --------------------------------------------------------------------------- requests


def chat_body(model: str = "gpt-oss", stream: bool = False, tokens: int = 8) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "stream": stream, "max_tokens": tokens}


def metric(gate: Gate, name: str) -> float | None:
    for line in httpx.get(gate.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def sse_events(lines: list[tuple[float, str]]) -> list[tuple[float, dict[str, Any]]]:
    return [(t, json.loads(line[6:])) for t, line in lines
            if line.startswith("data: ") and line != "data: [DONE]"]
