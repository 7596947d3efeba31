"""`ailayer up` supervises its gate: a gate that dies is started again, and says so (issue 25).

Before, a SIGKILLed gate stayed dead: `up` ran on, the phase stayed READY and /healthz was
refused until someone restarted `up` by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from reconciler.act.stopper import STOP_DEADLINE_S
from reconciler.kit.freeport import free_port
from tests.helpers import demo_engine, wait_until

pytestmark = pytest.mark.e2e

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# One /healthz request while the gate comes back: short, so the figure is measured to ~50 ms.
HEALTH_PROBE_S = 0.5
# The bound on the first restart: the new gate is started within this of the kill.
FIRST_RESTART_S = 2.0
# ... and answers /healthz within this: its start (importing aiohttp, binding) takes about a
# second here, more on a loaded 2-core machine.
BACK_DEADLINE_S = 10.0


def healthz(port: int) -> dict[str, Any] | None:
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{port}/healthz", timeout=HEALTH_PROBE_S) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError):
        return None


def completion(port: int) -> int:
    body = json.dumps({"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 3}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def gates_of(up: subprocess.Popen[bytes]) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(up.pid).children():
        try:
            if "reconciler.gate" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def gate_section(state: Path) -> dict[str, Any]:
    try:
        doc = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return dict(doc.get("reconciler", {}).get("gate") or {})


def write_catalog(root: Path) -> tuple[Path, int]:
    """A one-engine demo catalog in ``root`` with the gate on a free port: (its path, the port)."""
    gate_port = free_port()
    config = root / "engines.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "run", "log_file": "activity.log", "gate": {"listen": f"127.0.0.1:{gate_port}"},
        "engines": {"gpt-oss": demo_engine("vllm", free_port())}}))
    return config, gate_port


def test_a_sigkilled_gate_is_restarted_and_the_state_and_log_say_so(tmp_path: Path) -> None:
    config, gate_port = write_catalog(tmp_path)
    state, activity = tmp_path / "run" / "observed_state.json", tmp_path / "activity.log"
    cli = [sys.executable, "-m", "reconciler"]
    with (tmp_path / "up.out").open("wb") as out:
        up = subprocess.Popen([*cli, "up", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                              cwd=tmp_path)
    try:
        wait_until("the gate", lambda: healthz(gate_port))
        subprocess.run([*cli, "toggle", "gpt-oss", "--config", str(config)], check=True,
                       capture_output=True, timeout=60)
        wait_until("a completion through the gate", lambda: completion(gate_port) == 200)
        [first] = gates_of(up)
        first_pid = first.pid
        assert gate_section(state).get("pid") == first_pid
        assert gate_section(state).get("restarts") == 0

        killed_at = time.time()
        first.kill()
        back = wait_until("/healthz from a restarted gate", lambda: healthz(gate_port), timeout=BACK_DEADLINE_S)
        down_s = time.time() - killed_at
        [second] = gates_of(up)
        assert second.pid != first_pid
        assert back["phase"] == "READY"
        assert completion(gate_port) == 200  # and it proxies again
        facts = wait_until("the state to show the new gate",
                           lambda: (g := gate_section(state)).get("pid") == second.pid and g)
        assert facts["restarts"] == 1
        assert facts["last_exit"] == f"pid {first_pid} killed by SIGKILL"
        restarted_s = datetime.fromisoformat(facts["last_restart_at"]).timestamp() - killed_at
        print(f"\nafter the gate's SIGKILL: a new gate started {restarted_s:.2f} s later, "
              f"/healthz answered {down_s:.2f} s later")
        assert restarted_s < FIRST_RESTART_S, "the first restart came late"
        log = wait_until("the log to tell of the restart", lambda: (t := activity.read_text())
                         and f"pid {second.pid}" in t and t)
        assert f"gate (pid {first_pid}) died: killed by SIGKILL; restarting it in" in log
        assert f"gate restarted (pid {second.pid}) listening" in log
    finally:
        down = subprocess.run([*cli, "down", "--config", str(config)], capture_output=True, text=True,
                              timeout=STOP_DEADLINE_S + 30)
        up.wait(timeout=60)
    assert down.returncode == 0, down.stderr
    assert up.returncode == 0, (tmp_path / "up.out").read_text()
    assert psutil.wait_procs([second], timeout=5)[1] == [], "the gate outlived up"
    assert healthz(gate_port) is None  # nobody restarted the gate `down` stopped
    log = activity.read_text()
    assert log.count("restarting it in") == 1, "a gate that was being stopped was restarted"
    assert "ailayer stopped" in log


def test_a_restarted_gate_still_dies_with_a_sigkilled_up(tmp_path: Path) -> None:
    """The kernel's parent-death signal follows the thread that started the gate: a gate the
    supervisor started must still die with `up`, never serve on as an orphan."""
    config, gate_port = write_catalog(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "reconciler", "up", "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_until("the gate", lambda: healthz(gate_port))
        [first] = gates_of(up)
        # `up` is past its start (a gate that dies before `up` saw it listen ends `up`).
        wait_until("the supervisor", lambda: gate_section(tmp_path / "run" / "observed_state.json").get("pid")
                   == first.pid)
        first.kill()
        wait_until("a restarted gate", lambda: healthz(gate_port) and gates_of(up))
        [second] = gates_of(up)
        assert second.pid != first.pid
    finally:
        up.kill()
        up.wait()
    assert psutil.wait_procs([second], timeout=20)[1] == [], "the restarted gate outlived its parent"
    assert healthz(gate_port) is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_sent_to_the_whole_group_restarts_no_gate(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C in a terminal (SIGINT) and `systemctl stop` (SIGTERM to the whole cgroup) reach
    the gate too, which then exits on its own: that is `up` stopping, not a gate dying."""
    config, gate_port = write_catalog(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "reconciler", "up", "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                          start_new_session=True)
    try:
        wait_until("the gate", lambda: healthz(gate_port))
        [gate] = gates_of(up)
        wait_until("the supervisor", lambda: gate_section(tmp_path / "run" / "observed_state.json").get("pid")
                   == gate.pid)
        os.killpg(up.pid, sig)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert psutil.wait_procs([gate], timeout=5)[1] == []
    log = (tmp_path / "activity.log").read_text()
    assert "died" not in log and "gate restarted" not in log
    assert healthz(gate_port) is None
