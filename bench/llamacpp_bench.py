"""The real engine's numbers: switch time between two llama.cpp models, first-token latency via the gate.

    .venv/bin/python bench/llamacpp_bench.py [--switches 20] [--requests 20]

Needs the extra: ``pip install -e '.[llamacpp]'``. Two tiny GGUFs (``reconciler.engines.demomodel``)
share one port under a real reconciler and a real gate, with the example catalog's settings
(default probe periods), so the numbers are what a user of ``examples/llamacpp.yaml`` sees.

* Switch time: ``reconciler.store.desired_file.write`` returned (the toggle is in place) → the observed
  state says READY on the other model. It covers killing the old llama.cpp process and
  proving it and its port gone, spawning the launcher (Python + xllamacpp import), llama.cpp's
  load, and readiness probing.
* First-token latency: a streamed chat completion, request sent → first chunk with content,
  each on a new connection, direct to the engine and through the gate, alternating the two
  so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from reconciler.domain.catalog import load_file
from reconciler.engines.demomodel import write_tiny_gguf
from reconciler.kit.freeport import free_port
from reconciler.store import desired_file

PY = sys.executable
POLL_S = 0.002
# Ceilings, not expectations: a tiny model is READY in well under a second.
READY_LIMIT_S = 60.0
GATE_START_LIMIT_S = 30.0
# One streamed request to a 0.4 MB model takes milliseconds; this only bounds a hang.
REQUEST_TIMEOUT_S = 30.0
# Short answers: the first chunk is what is timed, the rest is drained.
MAX_TOKENS = 16
STOP_LIMIT_S = 30.0
# A switch slower than this is reported with the reconciler's last lines, to explain it.
OUTLIER_S = 3.0
OUTLIER_LINES = 25




def write_catalog(root: Path) -> tuple[Path, int, int]:
    port, gate_port = free_port(), free_port()
    engines = {}
    for seed, name in enumerate(("tiny-a", "tiny-b")):
        model = write_tiny_gguf(root / f"{name}.gguf", seed=seed)
        engines[name] = {
            "kind": "llamacpp", "port": port, "served_name": name,
            "command": ["{python}", "-m", "reconciler.engines.llamacpp", "serve", "--model", str(model),
                        "--host", "{host}", "--port", "{port}", "--alias", name],
            "match": [f"reconciler.engines.llamacpp serve --model {model}"],
        }
    path = root / "engines.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "run", "log_file": "run/activity.log",
                                    "gate": {"listen": f"127.0.0.1:{gate_port}"},
                                    "engines": engines}))
    return path, port, gate_port


def observed(root: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((root / "run" / "observed_state.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_phase(root: Path, model: str | None) -> float:
    deadline = time.monotonic() + READY_LIMIT_S
    want = "IDLE" if model is None else "READY"
    while time.monotonic() < deadline:
        doc = observed(root)
        if doc.get("phase") == want and doc.get("active_model") == model:
            return time.monotonic()
        time.sleep(POLL_S)
    raise SystemExit(f"no {want} for {model} within {READY_LIMIT_S} s: {observed(root).get('message')}")


def toggle(config: Path, model: str | None) -> None:
    desired_file.write(load_file(config, "--config"), model, requested_by="llamacpp_bench")


class Retry(Exception):
    """A request that failed in a way worth one more try (see ``first_token_s``)."""


def first_token_s(port: int, model: str, i: int, retried: list[str]) -> float:
    """Send one streamed chat completion on a new connection; seconds until the first content.

    A new connection each time because llama.cpp's server closes the connection after every
    streamed response (while its headers promise keep-alive), so a reused one would fail.
    The gate can meet the same closed connection in its upstream pool and answer 502; such a
    request is retried once, the retry is what is timed, and the failure is counted.
    """
    body = json.dumps({"model": model, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Tell me story number {i}."}]})
    try:
        return _first_token_s(port, body)
    except Retry as exc:
        retried.append(str(exc))
        return _first_token_s(port, body)


def _first_token_s(port: int, body: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        start = time.monotonic()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status == 502:
            raise Retry(f"HTTP 502: {response.read()[:160]!r}")
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
        first: float | None = None
        for raw in response:
            line = raw.strip()
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.monotonic() - start
    finally:
        conn.close()
    if first is None:
        raise SystemExit("the stream carried no content")
    return first


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "median": round(statistics.median(ms), 1), "min": round(ms[0], 1),
            "p90": round(ms[int(0.9 * (len(ms) - 1))], 1), "max": round(ms[-1], 1)}


def wait_gate(port: int) -> None:
    deadline = time.monotonic() + GATE_START_LIMIT_S
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(POLL_S)
    raise SystemExit(f"the gate did not listen on {port} within {GATE_START_LIMIT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20, help="per path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, port, gate_port = write_catalog(root)
        log = (root / "reconciler.out").open("wb")
        reconciler = subprocess.Popen([PY, "-m", "reconciler", "reconcile", "--stop-on-exit",
                                       "--config", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT)
        gate = subprocess.Popen([PY, "-m", "reconciler.gate", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_phase(root, None)
            wait_gate(gate_port)
            toggle(config, "tiny-a")
            wait_phase(root, "tiny-a")
            switches = []
            for i in range(args.switches):
                model = "tiny-b" if i % 2 == 0 else "tiny-a"
                toggle(config, model)
                start = time.monotonic()
                switches.append(wait_phase(root, model) - start)
                print(f"switch {i + 1}: {model} READY after {switches[-1] * 1000:.0f} ms",
                      file=sys.stderr)
                if switches[-1] > OUTLIER_S:  # say why, while the log still exists
                    tail = (root / "reconciler.out").read_text(errors="replace").splitlines()
                    print("\n".join(tail[-OUTLIER_LINES:]), file=sys.stderr)
            model = observed(root)["active_model"]
            paths = {"direct": port, "gate": gate_port}
            retried: dict[str, list[str]] = {name: [] for name in paths}
            for path_port in paths.values():  # warm: prompt cache primed, gate's pool filled
                first_token_s(path_port, model, -1, [])
            ttft: dict[str, list[float]] = {name: [] for name in paths}
            for i in range(args.requests):
                order = ("gate", "direct") if i % 2 == 0 else ("direct", "gate")
                for name in order:
                    ttft[name].append(first_token_s(paths[name], model, i, retried[name]))
            toggle(config, None)
            wait_phase(root, None)
        finally:
            for proc in (gate, reconciler):
                proc.terminate()
                proc.wait(STOP_LIMIT_S)
            log.close()
    import xllamacpp

    direct, via_gate = summary(ttft["direct"]), summary(ttft["gate"])
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "xllamacpp": xllamacpp.__version__},
        "switch_ms": summary(switches),
        "first_token_ms": {"direct": direct, "gate": via_gate,
                           "gate_overhead_median_ms": round(via_gate["median"] - direct["median"], 1)},
        "retried_after_502": {name: len(v) for name, v in retried.items()},
        "retry_example": next((v[0] for v in retried.values() if v), None),
    }, indent=2))


if __name__ == "__main__":
    main()
