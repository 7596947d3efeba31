"""A throwaway ailayer: reconciler + gate + demo engines on free loopback ports in a folder.

``Sandbox`` is an ailayer in a folder of its own: the catalog it writes there, the reconciler
and gate it starts there, and the files they write. ``ailayer simulate`` runs its drills on a
``Scenario``; the tests' ``Stack`` (tests/helpers.py) builds on the same ``Sandbox``, so a drill
and a test wait for a phase the same way.

Everything a scenario starts runs in its folder and carries a marker in its environment, so
the scenario can prove at the end that it left nothing behind. The working directory is what
finds vLLM's EngineCore and Worker: their setproctitle wipes the environment (marker
included), and the cwd survives that, a new session and re-parenting to init.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil
import yaml

from reconciler.domain.catalog import load_file
from reconciler.domain.desired import Desired
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
HEALTH_PROBE_S = 2.0  # one /healthz or /status request to the gate
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


def wait_until(what: str, check: Callable[[], T | Literal[False] | None], limit_s: float,
               interval_s: float = POLL_S, not_yet: tuple[type[Exception], ...] = ()) -> T:
    """Poll ``check`` until it returns something truthy; a ``TimeoutError`` naming ``what`` at the deadline.

    ``check`` may be ``cond and value``: its ``False`` counts as not yet, like ``None``, and so
    does an exception in ``not_yet`` (a server that does not answer yet). Real seconds: what is
    waited for is real processes, whatever clock the caller runs on.
    """
    deadline = time.monotonic() + limit_s
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except not_yet as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s:g} s waiting for {what} (last: {str(last)[:300]!r})")
        time.sleep(interval_s)


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


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ailayer-sim-"))


@dataclass
class Sandbox:
    """An ailayer in ``root``: its catalog (written at once), its reconciler and gate when started."""

    root: Path
    engines: dict[str, dict[str, Any]]
    resync_s: float = 5.0
    gate_port: int | None = None  # the gate's, in the catalog, when set
    top: dict[str, Any] = field(default_factory=dict)  # more top-level catalog keys (identity, gate)
    env: dict[str, str] = field(default_factory=dict)  # over os.environ, for every process started here
    limit_s: float = STARTUP_LIMIT_S  # how long its waits last unless told
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # the reconciler
    gate: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.write_catalog()

    @property
    def config(self) -> Path:
        return self.root / "engines.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "run"

    @property
    def observed(self) -> Path:
        return self.state_dir / "observed_state.json"

    @property
    def log_file(self) -> Path:
        return self.root / "activity.log"

    @property
    def desired(self) -> Path:
        return self.root / "desired_state.yaml"

    @property
    def gate_url(self) -> str:
        return f"http://127.0.0.1:{self.gate_port}"

    def catalog_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state_dir": "run", "log_file": str(self.log_file),
                               "resync_interval_s": self.resync_s, "engines": self.engines}
        if self.gate_port is not None:
            doc["gate"] = {"listen": f"127.0.0.1:{self.gate_port}"}
        return {**doc, **self.top}

    def write_catalog(self) -> None:
        self.config.write_text(yaml.safe_dump(self.catalog_doc()))

    def process_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        """``ailayer reconcile`` (with ``extra``); its stdout in reconciler.out, its stderr in .err."""
        with (self.root / "reconciler.out").open("ab") as out, (self.root / "reconciler.err").open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "reconcile", "--config", str(self.config), *extra],
                stdout=out, stderr=err, env=self.process_env(), cwd=self.root)
        return self.proc

    def start_gate(self) -> subprocess.Popen[bytes]:
        """The gate, once its /healthz answers; its output in gate.out."""
        with (self.root / "gate.out").open("ab") as out:
            self.gate = subprocess.Popen([sys.executable, "-m", "reconciler.gate", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, env=self.process_env(),
                                         cwd=self.root)
        wait_until("the gate's /healthz", self.gate_up, self.limit_s)
        return self.gate

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=self.limit_s)

    def stop_gate(self) -> None:
        if self.gate is not None and self.gate.poll() is None:
            self.gate.send_signal(signal.SIGTERM)
            self.gate.wait(timeout=self.limit_s)

    def wish(self, model: str | None, requested_by: str) -> Desired:
        """Write the desired file in process, as the toggle does (no CLI start to wait for)."""
        return desired_file.write(load_file(self.config, "--config"), model, requested_by)

    def status(self) -> dict[str, Any]:
        """The observed state as the reconciler last wrote it ({} while there is none)."""
        try:
            return dict(json.loads(self.observed.read_text()))
        except (OSError, ValueError):
            return {}

    def gate_up(self) -> bool:
        try:
            return http("GET", self.gate_url + "/healthz", timeout_s=HEALTH_PROBE_S)[0] == 200
        except OSError:
            return False

    def gate_revision(self) -> int:
        """The revision of the observed state the gate has read (-1 when it does not answer)."""
        try:
            code, _, body, _ = http("GET", self.gate_url + "/status", timeout_s=HEALTH_PROBE_S)
            return int(json.loads(body).get("revision") or 0) if code == 200 else -1
        except (OSError, ValueError):
            return -1

    def wait_phase(self, phase: str, model: str | None = None, limit_s: float | None = None,
                   ) -> dict[str, Any]:
        """The state file in ``phase`` (with ``model`` active, when named), and, with the gate
        running, the gate too: it follows the file a few milliseconds behind the write, and a
        request sent at once could still meet the state before."""
        limit = self.limit_s if limit_s is None else limit_s

        def reached() -> dict[str, Any] | None:
            doc = self.status()
            if doc.get("phase") == phase and (model is None or doc.get("active_model") == model):
                return doc
            return None

        doc = wait_until(f"phase {phase} {model or ''}", reached, limit)
        if self.gate is not None and self.gate.poll() is None:
            wait_until(f"the gate to read revision {doc['revision']}",
                       lambda: self.gate_revision() >= doc["revision"], limit)
        return doc


@dataclass
class Scenario(Sandbox):
    """A drill's sandbox: reconciler and gate up on enter; on close, converged to nothing through
    the product, stopped, and searched for leftovers."""

    gate_port: int | None = field(default_factory=free_port)
    time_scale: float = 1.0
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    left: list[str] | None = None  # set once closed

    def __post_init__(self) -> None:
        self.env.update({TIME_SCALE_ENV: str(self.time_scale), MARKER_ENV: self.marker})
        super().__post_init__()

    def __enter__(self) -> Scenario:
        self.start()
        self.start_gate()
        wait_until("the first observed state", lambda: self.status().get("phase"), self.limit_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> list[str]:
        """Converge to nothing through the product, stop our processes, report leftovers."""
        if self.left is not None:
            return self.left
        try:
            self.toggle(None)
            wait_until("IDLE", lambda: self.status().get("phase") == "IDLE", self.limit_s)
        except OSError:  # TimeoutError included: the leftovers below tell what stayed
            pass
        ours = [p for p in (self.proc, self.gate) if p is not None]
        for proc in ours:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in ours:
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        left = self.members()
        self.left = [f"{p.pid} {p.info.get('cmdline') or ''}" for p in left]
        for leftover in left:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        return self.left

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
        self.wish(model, requested_by="ailayer simulate")

    def tree(self, *markers: str) -> list[psutil.Process]:
        """This scenario's live processes whose command line (or title) contains a marker."""
        found = []
        for proc in self.members():
            shown = " ".join(arg for arg in proc.info["cmdline"] or [] if arg)  # titles pad with ""
            if any(marker in shown for marker in markers):
                found.append(proc)
        return found
