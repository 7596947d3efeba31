"""The sandbox under the drills and the tests' Stack judges a phase by the gate's own /status.

The gate follows the state file milliseconds behind each write, so a request sent as soon as
the file says READY can still be answered 503 (a rehearsal of CI failed so on
``simulate empty-request``). Here the gate is a static file server whose /status the test
holds one revision behind the file: ``wait_phase`` must not return until it catches up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from reconciler.kit.freeport import free_port
from reconciler.simulate.harness import Sandbox
from tests.helpers import DEADLINE_S, wait_until

pytestmark = pytest.mark.integration

# Real seconds the wait is given to return early, were it to judge by the file alone.
EARLY_S = 0.5


def _serve(folder: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                             str(folder), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_wait_phase_returns_only_once_the_gate_has_read_the_state(tmp_path: Path) -> None:
    box = Sandbox(tmp_path, {}, gate_port=free_port())
    served = tmp_path / "gate"
    served.mkdir()
    (served / "healthz").write_text("{}")
    (served / "status").write_text(json.dumps({"phase": "LOADING", "revision": 6}))
    box.state_dir.mkdir()
    box.observed.write_text(json.dumps({"phase": "READY", "active_model": "m", "revision": 7}))
    assert box.gate_port is not None
    box.gate = _serve(served, box.gate_port)
    try:
        wait_until("the stand-in gate", box.gate_up)
        seen: list[dict[str, Any]] = []
        waiter = threading.Thread(target=lambda: seen.append(box.wait_phase("READY", "m", DEADLINE_S)))
        waiter.start()
        waiter.join(EARLY_S)
        assert waiter.is_alive() and not seen, "READY in the file alone must not do"
        (served / "status").write_text(json.dumps({"phase": "READY", "revision": 7}))
        waiter.join(DEADLINE_S)
        assert seen and seen[0]["revision"] == 7
    finally:
        box.gate.terminate()
        box.gate.wait(DEADLINE_S)
