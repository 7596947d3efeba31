"""`ailayer up`, the main job: reconciler and gate together, through the CLI and real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from reconciler.kit.freeport import free_port
from tests.helpers import demo_engine, two_demo_engines, wait_until

pytestmark = pytest.mark.e2e

PROMPT = json.dumps({"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 3}).encode()
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=PROMPT, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_up_serves_gates_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    gate_port = free_port()
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "run", "log_file": "activity.log", "gate": {"listen": f"127.0.0.1:{gate_port}"},
        "engines": two_demo_engines()}))
    up = subprocess.Popen([sys.executable, "-m", "reconciler", "up", "--config", str(config)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                          env=os.environ.copy())
    url = f"http://127.0.0.1:{gate_port}/v1/chat/completions"
    try:
        _, body = wait_until("428 from the gate", lambda: (r := post(url))[0] == 428 and r)
        assert "no model" in str(body)
        toggle = subprocess.run([sys.executable, "-m", "reconciler", "toggle", "gpt-oss", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60)
        assert toggle.returncode == 0, toggle.stderr
        _, body = wait_until("a completion through the gate", lambda: (r := post(url))[0] == 200 and r)
        assert body["choices"]
    finally:
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert f"http://127.0.0.1:{gate_port}" in err and "ailayer toggle" in err  # how to use it
    assert "stopping managed engines" in out and "ailayer stopped" in out


def _catalog(tmp_path: Path, gate_port: int) -> Path:
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "run", "log_file": "activity.log", "gate": {"listen": f"127.0.0.1:{gate_port}"},
        "engines": {"gpt-oss": demo_engine("vllm", free_port())}}))
    return config


def test_up_fails_fast_with_one_line_when_the_gate_cannot_bind(tmp_path: Path) -> None:
    """It used to keep the reconciler running without a gate and still say "ailayer is up"."""
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        up = subprocess.run([sys.executable, "-m", "reconciler", "up", "--config", str(_catalog(tmp_path, port))],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert up.returncode == 1
    assert f"the gate could not listen on 127.0.0.1:{port}" in up.stderr
    assert "ailayer is up" not in up.stderr


def test_the_gate_dies_with_a_sigkilled_up(tmp_path: Path) -> None:
    """An orphaned gate kept serving the old configuration."""
    import psutil

    gate_port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "reconciler", "up", "--config", str(_catalog(tmp_path, gate_port))],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    url = f"http://127.0.0.1:{gate_port}/v1/chat/completions"
    try:
        wait_until("428 from the gate", lambda: post(url)[0] == 428)
        gates = [c for c in psutil.Process(up.pid).children() if "reconciler.gate" in " ".join(c.cmdline())]
        assert len(gates) == 1
    finally:
        up.kill()
        up.wait()
    assert psutil.wait_procs(gates, timeout=20)[1] == [], "the gate outlived its parent"
    assert post(url)[0] == 0  # nothing answers any more
