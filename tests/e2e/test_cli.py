"""The small commands, through the real CLI: toggle, validate, status, logs, bin/reconcile."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, Stack, demo_engine, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, {"gpt-oss": demo_engine("vllm", free_port()),
                         "gemma2": demo_engine("ollama", free_port())})
    yield s
    s.toggle(None)
    assert s.cli("reconcile", "--once").returncode == 0


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
