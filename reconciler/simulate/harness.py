"""A throwaway ailayer: reconciler + gate + demo engines on free loopback ports in a temp dir.

Used by ``ailayer simulate`` and its tests. Everything it starts runs in the scenario's temp
dir and carries a marker in its environment, so the scenario can prove at the end that it left
nothing behind. The working directory is what finds vLLM's EngineCore and Worker: their
setproctitle wipes the environment (marker included), and the cwd survives that, a new
session and re-parenting to init.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

from reconciler.domain.catalog import Catalog, load_file
from reconciler.kit import clock
from reconciler.kit.clock import TIME_SCALE_ENV
from reconciler.kit.freeport import free_port
from reconciler.store import desired_file

T = TypeVar("T")
MARKER_ENV = "AILAYER_SIMULATION"
# Real seconds: how long the harness waits for its own processes to come up or go away.
# Not on any engine's boot path (boots are waited for with the scenario's own budget).
STARTUP_LIMIT_S = 60.0
STOP_GRACE_S = 15.0
HEALTH_PROBE_S = 2.0  # one /healthz request while waiting for the gate to come up
POLL_S = 0.02
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))




def http(method: str, url: str, body: Any = None, timeout_s: float = 30.0,
         ) -> tuple[int, dict[str, str], bytes, float]:
    """(status, headers, body, seconds) — errors are answers here, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,  # noqa: S310 (loopback)
                                     headers={"Content-Type": "application/json"})
    start = clock.monotonic()
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            payload = response.read()
            return int(response.status), dict(response.headers), payload, clock.monotonic() - start
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read(), clock.monotonic() - start


ONLY_OWN_COMMAND: dict[str, list[Any]] = {"argv": [], "titles": []}


def demo_engines(boot_s: float, escape: bool = False) -> dict[str, dict[str, Any]]:
    """The two demo engines on free ports; a stray is only a copy of their own command.

    A simulation must never take a demo engine the user is running for a stray of its own:
    the entry's own command recognises copies up to its port (docs/OWNERSHIP.md).
    """
    vllm_port, ollama_port = free_port(), free_port()
    vllm_head = f"reconciler.engines.demo.vllm_like serve openai/gpt-oss-20b --host 127.0.0.1 --port {vllm_port} "
    ollama_head = f"reconciler.engines.demo.ollama_like serve --host 127.0.0.1 --port {ollama_port} "
    vllm_cmd = ["{python}", "-m", *vllm_head.split(), "--boot-seconds", str(boot_s)]
    if escape:
        vllm_cmd.append("--worker-escapes")
    return {
        "gpt-oss": {"kind": "vllm", "command": vllm_cmd, "port": vllm_port,
                    "served_name": "openai/gpt-oss-20b", "strays": ONLY_OWN_COMMAND},
        "gemma2": {"kind": "ollama", "port": ollama_port, "served_name": "gemma2:9b",
                   "strays": ONLY_OWN_COMMAND,
                   "command": ["{python}", "-m", *ollama_head.split(), "--models", "gemma2:9b",
                               "--load-seconds", str(boot_s)]},
    }


@dataclass
class Scenario:
    engines: dict[str, dict[str, Any]]
    time_scale: float = 1.0
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ailayer-sim-")))
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gate_url: str = ""
    catalog: Catalog | None = None
    left: list[str] | None = None  # set once closed

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, TIME_SCALE_ENV: str(self.time_scale), MARKER_ENV: self.marker}

    def __enter__(self) -> Scenario:
        gate_port = free_port()
        self.gate_url = f"http://127.0.0.1:{gate_port}"
        path = self.root / "engines.yaml"
        path.write_text(yaml.safe_dump({
            "state_dir": "run", "log_file": "activity.log", "resync_interval_s": 5,
            "gate": {"listen": f"127.0.0.1:{gate_port}"}, "engines": self.engines}))
        self.catalog = load_file(path, "--config")
        for args, name in ((["reconcile"], "reconciler"), (None, "gate")):
            argv = ([sys.executable, "-m", "reconciler", *args, "--config", str(path)] if args
                    else [sys.executable, "-m", "reconciler.gate", "--config", str(path)])
            with (self.root / f"{name}.out").open("ab") as out:
                self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                   env=self.env, cwd=self.root))
        self.wait("gate /healthz", lambda: self._up(), STARTUP_LIMIT_S)
        self.wait("first observed state", lambda: self.status().get("phase"), STARTUP_LIMIT_S)
        return self

    def _up(self) -> bool:
        try:
            return http("GET", self.gate_url + "/healthz", timeout_s=HEALTH_PROBE_S)[0] == 200
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> list[str]:
        """Converge to nothing through the product, stop our processes, report leftovers."""
        if self.left is not None:
            return self.left
        try:
            self.toggle(None)
            self.wait("IDLE", lambda: self.status().get("phase") == "IDLE", STARTUP_LIMIT_S)
        except (AssertionError, OSError):
            pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        left = self.leftovers()
        self.left = [f"{p.pid} {p.info.get('cmdline') or ''}" for p in left]
        for leftover in left:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        return self.left

    def leftovers(self) -> list[psutil.Process]:
        return self.members()

    def members(self) -> list[psutil.Process]:
        """This scenario's live processes: in its dir (engines inherit it) or marked."""
        where = os.path.realpath(self.root)
        found = []
        for proc in psutil.process_iter(["status", "cmdline", "cwd"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if proc.info["cwd"] == where or proc.environ().get(MARKER_ENV) == self.marker:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def toggle(self, model: str | None) -> None:
        assert self.catalog is not None
        desired_file.write(self.catalog, model, requested_by="ailayer simulate")

    def status(self) -> dict[str, Any]:
        assert self.catalog is not None
        try:
            doc: dict[str, Any] = json.loads(self.catalog.observed_path.read_text())
            return doc
        except (OSError, ValueError):
            return {}

    def wait_phase(self, phase: str, model: str | None, limit_s: float) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            doc = self.status()
            return doc if doc.get("phase") == phase and doc.get("active_model") == model else None
        return self.wait(f"{phase} {model}", ready, limit_s)

    @staticmethod
    def wait(what: str, check: Callable[[], T | None], limit_s: float) -> T:
        deadline = clock.monotonic() + limit_s
        while clock.monotonic() < deadline:
            value = check()
            if value:
                return value
            clock.sleep(POLL_S)
        raise AssertionError(f"{what} not reached within {limit_s:.0f} s")

    def tree(self, *markers: str) -> list[psutil.Process]:
        """This scenario's live processes whose command line (or title) contains a marker."""
        found = []
        for proc in self.members():
            shown = " ".join(arg for arg in proc.info["cmdline"] or [] if arg)  # titles pad with ""
            if any(marker in shown for marker in markers):
                found.append(proc)
        return found
