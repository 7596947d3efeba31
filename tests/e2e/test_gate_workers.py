"""Several gate workers on one port (gate.workers, reconciler/gate/workers.py), end to end.

Real processes: ``python -m reconciler.gate`` as the supervisor of two workers, and ``ailayer
up`` with them. Which worker answered is the ``gate.pid`` of ``/status``; each request goes on a
fresh connection, so the kernel's SO_REUSEPORT spreading decides who gets it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from reconciler.kit.freeport import free_port
from tests.e2e.standalone_gate import CONDITION_DEADLINE_S, Gate, Processes, start_gate
from tests.helpers import demo_engine, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKERS = 2


def _supervisor(started: Processes) -> psutil.Process:
    return psutil.Process(started.started[-1].pid)


def _workers(sup: psutil.Process) -> set[int]:
    return {c.pid for c in sup.children() if c.status() != psutil.STATUS_ZOMBIE}


def _all_workers(sup: psutil.Process, without: int | None = None) -> set[int]:
    """Wait until the supervisor has WORKERS live children (none of them ``without``)."""
    def check() -> set[int] | None:
        pids = _workers(sup)
        return pids if len(pids) == WORKERS and without not in pids else None

    return wait_until(f"{WORKERS} workers", check, CONDITION_DEADLINE_S)


def _answering_pids(url: str, want: int) -> set[int]:
    """pids of the workers that answered fresh connections, until ``want`` distinct ones did."""
    seen: set[int] = set()

    def more() -> bool:
        seen.add(int(httpx.get(url + "/status", timeout=CONDITION_DEADLINE_S).json()["gate"]["pid"]))
        return len(seen) >= want

    wait_until(f"{want} workers answering", more, CONDITION_DEADLINE_S)
    return seen


def _metrics(gate: Gate) -> str:
    return httpx.get(gate.url + "/metrics", timeout=CONDITION_DEADLINE_S).text


def _requests_total(text: str, route: str) -> float:
    return sum(float(v) for v in re.findall(
        rf'^ailayer_gate_requests_total\{{outcome="[^"]+",route="{re.escape(route)}"\}} (\S+)$', text, re.M))


@pytest.fixture
def gate2(procs: Processes, tmp_path: Path) -> Gate:
    gate = start_gate(procs, tmp_path, workers=WORKERS)
    gate.state.idle()
    return gate


def test_two_workers_both_answer(procs: Processes, gate2: Gate) -> None:
    sup = _supervisor(procs)
    workers = _all_workers(sup)
    assert _answering_pids(gate2.url, WORKERS) == workers
    for pid in workers:  # every worker is a whole gate: the 428 path and the state, from each
        assert psutil.Process(pid).ppid() == sup.pid


def test_metrics_are_summed_across_workers(procs: Processes, gate2: Gate) -> None:
    _answering_pids(gate2.url, WORKERS)  # both are up and have answered
    sent = 40
    for _ in range(sent):
        assert httpx.get(gate2.url + "/v1/models", timeout=CONDITION_DEADLINE_S).status_code == 428
    # A worker publishes its front door's counts before it answers a scrape itself, and for the
    # other worker's scrapes within frontdoor.COUNTS_PUBLISH_S of its answer.
    wait_until(f"{sent} requests counted", lambda: _requests_total(_metrics(gate2), "/v1/models") == sent,
               CONDITION_DEADLINE_S)
    for _ in range(6):  # whichever worker answers /metrics, it counts every worker's requests
        text = httpx.get(gate2.url + "/metrics", timeout=CONDITION_DEADLINE_S).text
        assert _requests_total(text, "/v1/models") == sent
        assert 'ailayer_phase{ailayer_phase="IDLE"} 1.0' in text  # the state's, not summed
        assert "ailayer_gate_streams_active 0.0" in text


def test_a_killed_worker_is_replaced_and_its_counts_kept(procs: Processes, gate2: Gate) -> None:
    sup = _supervisor(procs)
    before = _all_workers(sup)
    _answering_pids(gate2.url, WORKERS)
    for _ in range(10):
        httpx.get(gate2.url + "/v1/models", timeout=CONDITION_DEADLINE_S)
    wait_until("10 requests counted", lambda: _requests_total(_metrics(gate2), "/v1/models") == 10,
               CONDITION_DEADLINE_S)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = _all_workers(sup, without=victim)
    new = (after - before).pop()
    assert new in _answering_pids(gate2.url, WORKERS)  # the new one listens on the same port
    text = httpx.get(gate2.url + "/metrics", timeout=CONDITION_DEADLINE_S).text
    assert _requests_total(text, "/v1/models") == 10  # the dead worker's requests still count
    assert "restarting it" in gate2.log.read_text()


def test_stopping_the_supervisor_stops_every_worker(procs: Processes, gate2: Gate) -> None:
    sup = _supervisor(procs)
    workers = [psutil.Process(p) for p in _all_workers(sup)]
    metrics_dir = gate2.dir / "run" / "gate-metrics" / str(sup.pid)
    assert metrics_dir.is_dir()
    sup.send_signal(signal.SIGTERM)
    assert procs.started[-1].wait(CONDITION_DEADLINE_S) == 0
    _, alive = psutil.wait_procs(workers, timeout=CONDITION_DEADLINE_S)
    assert not alive
    assert not metrics_dir.exists()


def test_workers_die_with_a_sigkilled_supervisor(procs: Processes, gate2: Gate) -> None:
    sup = _supervisor(procs)
    workers = [psutil.Process(p) for p in _all_workers(sup)]
    sup.kill()
    procs.started[-1].wait(CONDITION_DEADLINE_S)
    _, alive = psutil.wait_procs(workers, timeout=CONDITION_DEADLINE_S)
    assert not alive, "a worker outlived its supervisor"


def test_up_runs_and_supervises_the_workers(tmp_path: Path) -> None:
    gate_port = free_port()
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "run", "log_file": "activity.log",
        "gate": {"listen": f"127.0.0.1:{gate_port}", "workers": WORKERS},
        "engines": {"gpt-oss": demo_engine("vllm", free_port())}}))
    up = subprocess.Popen([sys.executable, "-m", "reconciler", "up", "--config", str(config)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{gate_port}"
    try:
        wait_until("428 from the gate",
                   lambda: httpx.post(url + "/v1/chat/completions", json={}).status_code == 428, 30.0)
        pids = _answering_pids(url, WORKERS)
        workers = [psutil.Process(p) for p in pids]
        assert {w.ppid() for w in workers} == {psutil.Process(workers[0].ppid()).pid}
        assert psutil.Process(workers[0].ppid()).ppid() == up.pid  # up -> gate supervisor -> workers
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _, alive = psutil.wait_procs(workers, timeout=CONDITION_DEADLINE_S)
    assert not alive
