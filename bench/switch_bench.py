"""Switch latency and the reconciler's idle cost, measured on the demo engines.

    .venv/bin/python bench/switch_bench.py [--switches 20] [--idle-seconds 60]

Switch time = `ailayer toggle` returned → observed state says READY on the other engine, with
instant boots, so what is measured is ailayer's own overhead: kill + verify the old tree, port
check, spawn, readiness probing. Own time (switches to the vLLM-like engine, which listens only
once ready) = toggle → the "started" log line, plus the engine's first accepted connection →
READY seen: the engine's own start (Python imports) is left out. Kill to port free = the
activity log's "kill (SIGKILL)" line → its next "start" line (the start is logged only once the port
is proven free), in the
identity mode given (``--identity cgroup|record``). Idle cost = CPU time and RSS of the
reconciler over a window with nothing to do (IDLE) and with one engine READY.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from reconciler.domain.catalog import load_file
from reconciler.simulate.harness import demo_engines
from reconciler.store import desired_file

PY = sys.executable
POLL_S = 0.002
LISTEN_POLL_S = 0.001
LISTEN_LIMIT_S = 60.0


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT[^\]]+)\] \[ailayer\] \[\d+\] (.*)$")


def catalog(root: Path, identity: str) -> Path:
    path = root / "engines.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "run", "log_file": "run/activity.log",
                                    "identity": {"mode": identity},
                                    "engines": demo_engines(boot_s=0)}))
    return path


def kill_to_port_free(log: Path) -> list[float]:
    """Seconds from each logged kill to the start that follows it (after the port check)."""
    from datetime import datetime

    spans, killed_at = [], None
    for line in log.read_text(errors="replace").splitlines():
        found = STAMP.match(line)
        if not found:
            continue
        when = datetime.fromisoformat(found.group(1)).timestamp()
        if found.group(2).startswith("changed: kill (SIGKILL)"):
            killed_at = when
        elif found.group(2).startswith("changed: start ") and killed_at is not None:
            spans.append(when - killed_at)
            killed_at = None
    return spans


def observed(root: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((root / "run" / "observed_state.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_ready(root: Path, model: str | None, limit_s: float = 120) -> tuple[float, float]:
    """(when the new engine was spawned, when it was READY): the first part is ailayer's own
    work (kill, verify, port, spawn); the rest is the engine's start-up plus probe latency."""
    deadline = time.monotonic() + limit_s
    want = "IDLE" if model is None else "READY"
    spawned = None
    while time.monotonic() < deadline:
        doc = observed(root)
        if spawned is None and (doc.get("engine") or {}).get("model") == model:
            spawned = time.monotonic()
        if doc.get("phase") == want and doc.get("active_model") == model:
            now = time.monotonic()
            return spawned or now, now
        time.sleep(POLL_S)
    raise SystemExit(f"no {want} for {model} within {limit_s} s: {observed(root).get('message')}")


class ListenWatch(threading.Thread):
    """When ``port`` first accepts a connection: the engine's own start ends there (the demo
    vLLM listens only once loaded, so for it listening is being ready)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.at = port, None
        self.start()

    def run(self) -> None:
        deadline = time.time() + LISTEN_LIMIT_S
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    self.at = time.time()
                    return
            except OSError:
                time.sleep(LISTEN_POLL_S)


def started_at(log: Path, after: float) -> float | None:
    """The activity log's first "started <model> pid" line after ``after`` (epoch seconds)."""
    from datetime import datetime

    for line in log.read_text(errors="replace").splitlines():
        found = STAMP.match(line)
        if found and found.group(2).startswith("started "):
            when = datetime.fromisoformat(found.group(1)).timestamp()
            if when >= after:
                return when
    return None


def toggle(config: Path, model: str | None) -> None:
    """The reference writer, in-process: what is timed starts when the file is in place."""
    desired_file.write(load_file(config, "--config"), model, requested_by="switch_bench")


def cost(proc: psutil.Process, seconds: float) -> dict[str, float]:
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return {"cpu_percent": round(100 * used / seconds, 3), "rss_mib": round(proc.memory_info().rss / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--identity", choices=["auto", "cgroup", "record"], default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = catalog(root, args.identity)
        reconciler = subprocess.Popen([PY, "-m", "reconciler", "reconcile", "--stop-on-exit",
                                       "--config", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        try:
            wait_ready(root, None)
            toggle(config, "gpt-oss")
            wait_ready(root, "gpt-oss")
            times: list[float] = []
            spawns: list[float] = []
            own: list[float] = []
            to_spawn: list[float] = []
            to_ready: list[float] = []
            vllm_port = int(load_file(config, "--config").engines["gpt-oss"].port)
            for i in range(args.switches):
                model = "gemma2" if i % 2 == 0 else "gpt-oss"
                listen = ListenWatch(vllm_port) if model == "gpt-oss" else None
                wall = time.time()
                toggle(config, model)
                start = time.monotonic()
                spawned, ready = wait_ready(root, model)
                times.append(ready - start)
                spawns.append(spawned - start)
                if listen is not None:  # ours = toggle -> spawn, plus engine listening -> READY seen
                    listen.join()
                    spawn_at = started_at(root / "run" / "activity.log", wall)
                    if listen.at is not None and spawn_at is not None:
                        to_spawn.append(spawn_at - wall)
                        to_ready.append(wall + (ready - start) - listen.at)
                        own.append(to_spawn[-1] + to_ready[-1])
            proc = psutil.Process(reconciler.pid)
            ready_cost = cost(proc, args.idle_seconds)
            toggle(config, None)
            wait_ready(root, None)
            idle_cost = cost(proc, args.idle_seconds)
        finally:
            reconciler.terminate()
            reconciler.wait(60)
        freed = kill_to_port_free(root / "run" / "activity.log")
        mode = observed(root).get("identity", {}).get("mode")
    def summary(values: list[float]) -> dict[str, float]:
        ms = sorted(v * 1000 for v in values)
        return {"median": round(statistics.median(ms), 1), "min": round(ms[0], 1),
                "p90": round(ms[int(0.9 * (len(ms) - 1))], 1), "max": round(ms[-1], 1)}

    print(json.dumps({
        "identity": mode,
        "switches": len(times),
        "kill_to_port_free_ms": summary(freed),
        "toggle_to_ready_ms": summary(times),
        "toggle_to_new_engine_spawned_ms": summary(spawns),
        "own_time_to_ready_ms (vLLM-like switches)": summary(own),
        "own: toggle_to_started_line_ms": summary(to_spawn),
        "own: engine_listens_to_ready_seen_ms": summary(to_ready),
        "reconciler_ready": ready_cost,
        "reconciler_idle": idle_cost,
    }, indent=2))


if __name__ == "__main__":
    main()
