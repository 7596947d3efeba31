"""Shared test helpers: deadline waits, a reconciler under test, leak checks, HTTP probes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import openai
import psutil

from reconciler.kit.freeport import free_port
from reconciler.simulate import harness
from reconciler.simulate.harness import Sandbox

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
T = TypeVar("T")

# Generous ceilings for conditions on a loaded 2-core CI machine; a passing run takes a
# fraction of them. These are deadlines, not sleeps.
DEADLINE_S = 30.0
# One HTTP request of a sampler to a local engine or gate: short, because a hung request
# would blind the sampler.
PROBE_TIMEOUT_S = 1.0


def port_bound(port: int) -> bool:
    """Whether anyone holds ``port`` bound, listening or not (a bind without SO_REUSEADDR fails)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


NOT_YET = (OSError, ValueError, httpx.HTTPError)
"""What a check may raise while what it polls is not there yet: a server not answering, a file half written."""


def wait_until(what: str, check: Callable[[], T | Literal[False] | None], timeout: float = DEADLINE_S,
               interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; a ``TimeoutError`` naming ``what`` at the deadline.

    The drills' wait (reconciler/simulate/harness.py) on the tests' deadline: ``check`` may be
    ``cond and value`` (its ``False`` counts as not yet, like ``None``), and so does a ``NOT_YET``
    error it raises.
    """
    return harness.wait_until(what, check, timeout, interval, NOT_YET)


def demo_engine(kind: str, port: int, boot_s: float = 0.3, **extra: Any) -> dict[str, Any]:
    """A catalog entry for a demo engine on ``port``."""
    if kind == "vllm":
        command = ["{python}", "-m", "reconciler.engines.demo.vllm_like", "serve", "openai/gpt-oss-20b",
                   "--host", "{host}", "--port", "{port}", "--boot-seconds", str(boot_s),
                   "--token-delay-ms", "5"]
        entry: dict[str, Any] = {"kind": "vllm", "served_name": "openai/gpt-oss-20b"}
    else:
        command = ["{python}", "-m", "reconciler.engines.demo.ollama_like", "serve", "--host", "{host}",
                   "--port", "{port}", "--models", "gemma2:9b", "--load-seconds", str(boot_s),
                   "--token-delay-ms", "5"]
        entry = {"kind": "ollama", "served_name": "gemma2:9b"}
    # Only the entry's own command (port included) recognises a stray: a test must never take
    # a developer's running demo engine (or a concurrent test's) for one of its own.
    entry["strays"] = {"argv": [], "titles": []}
    entry.update({"command": command + list(extra.pop("args", [])), "port": port,
                  "ready": {"period_s": 0.1}, "liveness": {"period_s": 0.5},
                  "restart_backoff": {"initial_s": 0.5, "max_s": 2}})
    entry.update(extra)
    return entry


def two_demo_engines() -> dict[str, dict[str, Any]]:
    """gpt-oss on the vLLM stand-in and gemma2 on the Ollama one, each on a free port."""
    return {"gpt-oss": demo_engine("vllm", free_port()), "gemma2": demo_engine("ollama", free_port())}


@dataclass
class Stack(Sandbox):
    """The drills' sandbox (reconciler/simulate/harness.py) as tests drive it: the toggle through
    the CLI, a pass every second, the tests' deadline for its waits."""

    resync_s: float = 1.0
    limit_s: float = DEADLINE_S

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "reconciler", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout,
                              env=self.process_env(), cwd=self.root)

    def toggle(self, model: str | None) -> None:
        result = self.cli("toggle", model or "none")
        assert result.returncode == 0, result.stderr

    def output(self) -> str:
        """What the reconciler printed (its terminal)."""
        path = self.root / "reconciler.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def tear_down(self) -> None:
        """Through the product: stop the reconciler and the gate, wish for nothing, and let one
        ``reconcile --once`` pass stop what they left running."""
        self.stop()
        self.stop_gate()
        self.toggle(None)
        result = self.cli("reconcile", "--once")
        assert result.returncode == 0, result.stdout + result.stderr


TEST_RUN_ENV = "AILAYER_TEST_RUN"
"""Set once per pytest session and inherited by everything a test starts (engines too, even
after they re-parent to init), so leak checks find exactly our processes and nobody else's.
setproctitle wipes it (vLLM's workers), which is why the session cgroup below exists."""

SESSION_CGROUP_ENV = "AILAYER_TEST_CGROUP"
"""Where a root run with cgroup v2 puts the whole pytest session (tests/conftest.py). Every
process a test starts is in it or below it, whatever it does to its title or environment, and
so are the reconcilers' instance cgroups (they are made beside the reconciler's own)."""


def _session_pids() -> set[int]:
    root = os.environ.get(SESSION_CGROUP_ENV)
    pids: set[int] = set()
    if not root:
        return pids
    for directory, _, files in os.walk(root):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in Path(directory, "cgroup.procs").read_text().split())
    return pids


def session_procs(started: float = 0.0) -> list[psutil.Process]:
    """Live, non-zombie processes of this pytest session (but pytest) created since ``started``.

    The session cgroup where there is one, and the environment marker everywhere.
    """
    marker = os.environ.get(TEST_RUN_ENV)
    in_cgroup = _session_pids()
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["create_time", "status", "pid"]):
        try:
            if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.info["create_time"] < started - 1:
                continue
            if proc.info["pid"] in in_cgroup or (marker and proc.environ().get(TEST_RUN_ENV) == marker):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def ours_since(started: float) -> list[psutil.Process]:
    """Live processes started since ``started`` by this test session."""
    return session_procs(started)


Marker = str | tuple[str, ...]
"""A command-line substring, or several (a process matches any): an engine's workers retitle
themselves (``VLLM::EngineCore``), so one engine may need its module name and its titles."""


def _hits(cmdline: str, marker: Marker) -> bool:
    return any(m in cmdline for m in ((marker,) if isinstance(marker, str) else marker))


def engine_procs(marker: Marker) -> list[psutil.Process]:
    """This test session's live processes whose command line (or title) contains ``marker``."""
    found = []
    for proc in session_procs():
        with contextlib.suppress(psutil.Error):
            if _hits(" ".join(proc.cmdline()), marker):
                found.append(proc)
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def sampler(markers: tuple[Marker, Marker], stop: Callable[[], bool]) -> Iterator[tuple[int, int]]:
    """Yield (count of this session's processes matching markers[0], markers[1]) every ~10 ms."""
    while not stop():
        counts = [0, 0]
        for proc in session_procs():
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            for i, marker in enumerate(markers):
                if _hits(cmd, marker):
                    counts[i] += 1
        yield counts[0], counts[1]
        time.sleep(0.01)


def http_status(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str]] | None:
    """(status, headers) of one request, or None when nothing answers (refused, reset, timeout)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, dict(err.headers)
    except (OSError, ValueError):
        return None


@dataclass
class GatedStack(Stack):
    """The Stack with the gate on its own port in the catalog, and an OpenAI client to it."""

    gate_port: int | None = field(default_factory=free_port)
    request_timeout_s: float = DEADLINE_S  # the openai client's, for a whole completion

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gate_url + "/v1", api_key="unused",
                             timeout=self.request_timeout_s, max_retries=0)
