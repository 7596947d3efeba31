"""The small commands, through the real CLI: toggle, validate, status, logs, bin/reconcile."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, Stack, two_demo_engines

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, two_demo_engines())
    yield s
    s.tear_down()


def test_every_command_says_which_catalog_it_uses(stack: Stack) -> None:
    for args in (("validate",), ("status",), ("toggle", "none"), ("reconcile", "--check")):
        result = stack.cli(*args)
        assert f"using --config {stack.config}" in result.stderr, args


def test_toggle_refuses_an_unknown_model_and_writes_nothing(stack: Stack) -> None:
    result = stack.cli("toggle", "llama-9000")
    assert result.returncode == 1
    assert "unknown model 'llama-9000'" in result.stderr and "gemma2, gpt-oss" in result.stderr
    assert not stack.desired.exists()


def test_validate_reports_the_file_and_field(stack: Stack) -> None:
    assert stack.cli("validate").returncode == 0
    stack.desired.write_text("model: gpt-oss\ncommand: [rm, -rf, /]\n")
    result = stack.cli("validate")
    assert result.returncode == 1
    assert str(stack.desired) in result.stderr and "command" in result.stderr


def test_status_and_logs_after_a_pass(stack: Stack) -> None:
    stack.toggle("gpt-oss")
    assert stack.cli("reconcile", "--once").returncode == 2  # started, still loading
    doc = json.loads(stack.cli("status", "--json").stdout)
    assert doc["desired_model"] == "gpt-oss" and doc["phase"] in ("LOADING", "READY")
    human = stack.cli("status").stdout
    assert "phase:" in human and "desired: gpt-oss" in human
    logs = stack.cli("logs", "-n", "5").stdout.splitlines()
    assert 0 < len(logs) <= 5 and all(line.startswith("[") for line in logs)


def test_bin_reconcile_runs_from_the_checkout(stack: Stack) -> None:
    result = subprocess.run([str(REPO / "bin" / "reconcile"), "--check", "--config", str(stack.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "nothing to change" in result.stdout


def test_version() -> None:
    from reconciler import __version__
    from tests.helpers import PY

    result = subprocess.run([PY, "-m", "reconciler", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"ailayer {__version__}"


def test_status_says_so_when_no_live_reconciler_stands_behind_the_state(stack: Stack) -> None:
    """It showed READY with an engine pid 32 s after Ctrl-C, and exited 0."""
    stack.start()
    stack.toggle("gpt-oss")
    stack.wait_phase("READY", "gpt-oss")
    assert stack.cli("status").returncode == 0
    stack.stop(signal.SIGINT)  # a clean stop; `reconcile` leaves its engines running
    human = stack.cli("status")
    assert human.returncode == 3, human.stdout
    assert "STOPPED: the reconciler" in human.stdout and "engines left running" in human.stdout
    doc = json.loads(stack.cli("status", "--json").stdout)
    assert doc["stale"] is True and doc["reconciler_state"] == "stopped"
    assert doc["reconciler"]["stopped_at"]
    # Killed without a word: only the heartbeat's age tells.
    state = stack.state_dir / "observed_state.json"
    doc = json.loads(state.read_text())
    del doc["reconciler"]["stopped_at"]
    doc["reconciler"]["heartbeat"] = "2020-01-01T00:00:00.000+00:00"
    state.write_text(json.dumps(doc))
    stale = stack.cli("status")
    assert stale.returncode == 3 and "STALE: the reconciler's heartbeat is" in stale.stdout
    state.unlink()
    assert stack.cli("status").returncode == 3


def test_the_demo_never_rewrites_a_checkouts_desired_state_yaml(tmp_path: Path) -> None:
    """`ailayer up` and its banner's toggle, run from a checkout, keep the wish in ./run."""
    from tests.helpers import PY

    tracked = tmp_path / "desired_state.yaml"
    tracked.write_text("model: null\n")
    result = subprocess.run([PY, "-m", "reconciler", "toggle", "--demo", "gpt-oss"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert tracked.read_text() == "model: null\n"
    assert "model: gpt-oss" in (tmp_path / "run" / "desired_state.yaml").read_text()
