"""`up`'s gate supervisor on stand-in processes and the fake clock, and the state it feeds."""

from __future__ import annotations

import itertools
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import cast

import jsonschema
import pytest

from reconciler.console import gate_child, gate_supervisor
from reconciler.console.gate_supervisor import GateSupervisor, how_it_ended, restart_delay
from reconciler.domain.catalog import Identity, demo
from reconciler.kit import schemas
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.loop import Reconciler
from reconciler.plan.report import GateFacts
from tests.helpers import wait_until

FIRST, MAX, STABLE = (gate_supervisor.GATE_RESTART_FIRST_S, gate_supervisor.GATE_RESTART_MAX_S,
                      gate_supervisor.GATE_STABLE_S)
# A stand-in gate's wait: a supervisor that never returns from it is a failed test, not a hang.
FAKE_WAIT_S = 30.0
_PIDS = itertools.count(1000)


class FakeGate:
    """Just enough of a Popen: it dies when told, and its wait returns then."""

    def __init__(self) -> None:
        self.pid = next(_PIDS)
        self.returncode: int | None = None
        self._dead = threading.Event()

    def die(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._dead.set()

    def wait(self, timeout: float | None = None) -> int:
        assert self._dead.wait(FAKE_WAIT_S if timeout is None else timeout), "a stand-in gate never died"
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.die(-15)

    def kill(self) -> None:
        self.die(-9)


def popen(gate: FakeGate) -> subprocess.Popen[bytes]:
    return cast("subprocess.Popen[bytes]", gate)


@pytest.mark.parametrize(("previous", "ran_s", "expected"), [
    (None, 0.0, FIRST),  # the first death: back at once
    (FIRST, 1.0, 2 * FIRST),  # died young again: doubled
    (MAX, 1.0, MAX),  # capped
    (MAX, STABLE, FIRST),  # ran long enough: a new fault, a quick restart again
])
def test_the_restart_delay_doubles_while_gates_die_young(previous: float | None, ran_s: float,
                                                         expected: float) -> None:
    assert restart_delay(previous, ran_s) == expected


@pytest.mark.parametrize(("code", "said"), [(-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
                                            (1, "exit 1"), (0, "exit 0"), (-200, "killed by signal 200")])
def test_how_a_gate_ended_is_said_in_words(code: int, said: str) -> None:
    assert how_it_ended(code) == said


class Harness:
    """A supervisor whose gates are FakeGates; every fact it hands over is kept."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, starts_fail: int = 0,
                 listens: threading.Event | None = None) -> None:
        self.gates = [FakeGate()]
        self.facts: list[GateFacts] = []
        self.log = ActivityLog(tmp_path / "a.log", tmp_path, terminal=None)
        fails = iter(range(starts_fail))

        def start(_where: list[str]) -> subprocess.Popen[bytes]:
            if next(fails, None) is not None:
                raise OSError(11, "Resource temporarily unavailable")
            self.gates.append(FakeGate())
            return popen(self.gates[-1])

        def listening(proc: subprocess.Popen[bytes], _port: int) -> bool:
            if listens is not None:  # hold the new gate "starting" until told, or until it dies
                while not listens.wait(0.01):
                    if proc.poll() is not None:
                        return False
            return proc.poll() is None

        def stop(proc: subprocess.Popen[bytes]) -> None:  # the real one waits on the real clock
            proc.terminate()
            proc.wait()

        monkeypatch.setattr(gate_child, "start", start)
        monkeypatch.setattr(gate_child, "stop", stop)
        monkeypatch.setattr(gate_child, "listening", listening)
        self.stopping = threading.Event()
        self.sup = GateSupervisor(popen(self.gates[0]), ["--demo"], 8080, self.log, self.facts.append,
                                  self.stopping)

    def text(self) -> str:
        return (self.log.path).read_text()


def test_a_dead_gate_is_started_again_and_its_facts_handed_over(
        fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h = Harness(monkeypatch, tmp_path)
    h.sup.start()
    first = h.gates[0]
    assert h.facts == [GateFacts(pid=first.pid)]
    first.kill()
    wait_until("the new gate's facts", lambda: len(h.facts) >= 4 and h.facts[-1].pid is not None)
    second = h.gates[1]
    assert [f.pid for f in h.facts] == [first.pid, None, None, second.pid]
    assert h.facts[-1].restarts == 1 and h.facts[-1].last_exit == f"pid {first.pid} killed by SIGKILL"
    assert h.facts[-1].last_restart_at is not None
    assert fake_clock.slept[:1] == [FIRST]
    h.sup.stop()
    h.sup.join()
    assert second.returncode == -15 and len(h.gates) == 2  # stopped, not restarted
    text = h.text()
    assert f"gate (pid {first.pid}) died: killed by SIGKILL; restarting it in {FIRST:g} s" in text
    assert f"gate restarted (pid {second.pid}) listening on port 8080" in text


def test_a_gate_that_cannot_be_started_is_tried_again_with_backoff(
        fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h = Harness(monkeypatch, tmp_path, starts_fail=2)
    h.sup.start()
    h.gates[0].die(1)
    wait_until("a gate after two failed starts", lambda: len(h.gates) == 2 and h.facts[-1].pid == h.gates[1].pid)
    assert fake_clock.slept[:3] == [FIRST, 2 * FIRST, 4 * FIRST]
    assert h.text().count("gate: cannot start a new one") == 2
    assert h.facts[-1].restarts == 1 and h.facts[-1].last_exit == f"pid {h.gates[0].pid} exit 1"
    h.sup.stop()
    h.sup.join()


def test_stopping_while_a_new_gate_starts_stops_it_and_starts_none(
        fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``up`` stopping in the middle of a restart: the gate starting is the one stopped."""
    h = Harness(monkeypatch, tmp_path, listens=threading.Event())
    h.sup.start()
    h.gates[0].kill()
    wait_until("a new gate starting", lambda: len(h.gates) == 2)
    h.sup.stop()
    h.sup.join()
    assert h.gates[1].returncode == -15 and len(h.gates) == 2
    assert h.text().count("restarting it in") == 1  # the stopped one is not said to have died


def test_a_gate_stopped_by_up_is_not_restarted(fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    h = Harness(monkeypatch, tmp_path)
    h.sup.start()
    h.sup.stop()
    h.sup.join()
    assert h.gates[0].returncode == -15 and len(h.gates) == 1
    assert "restarting" not in h.text()


def test_a_gate_that_exits_once_up_is_stopping_is_not_restarted(
        fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ctrl-C reaches the gate too: it may exit before `up` leaves its loop to stop it."""
    h = Harness(monkeypatch, tmp_path)
    h.sup.start()
    h.stopping.set()  # as `up`'s signal handler does
    h.gates[0].die(0)
    h.sup.stop()
    h.sup.join()
    assert len(h.gates) == 1 and "died" not in h.text()


def _validate(document: dict[str, object]) -> None:
    errors = list(jsonschema.Draft202012Validator(schemas.load("observed_state")).iter_errors(document))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_every_state_write_carries_the_gate_facts(fake_clock: FakeClock, tmp_path: Path) -> None:
    """A pass and a beat between passes (a long kill) both show the gate as last handed over."""
    catalog = replace(demo(tmp_path), identity=Identity(mode="record"), log_file=tmp_path / "a.log")
    rec = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir, terminal=None))
    first = rec.step().status
    assert first is not None and "gate" not in first.reconciler  # `reconcile` runs no gate
    rec.publisher.gate = GateFacts(pid=41)
    shown = rec.step().status
    assert shown is not None and shown.reconciler["gate"] == {"pid": 41, "restarts": 0, "last_exit": None,
                                                               "last_restart_at": None}
    _validate(shown.to_dict())
    died = GateFacts(pid=None, restarts=1, last_exit="pid 41 killed by SIGKILL", last_restart_at=first.phase_since)
    rec.publisher.gate = died
    rec.publisher.kill_progress((7,), 1.0)
    beat = rec.publisher.previous
    assert beat is not None and beat.reconciler["gate"] == died.to_dict()
    _validate(beat.to_dict())
