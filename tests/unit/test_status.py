"""The observed-state document: revision semantics, schema conformance, JSON round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler.domain import catalog, status
from reconciler.domain.facts import Cookie, Failure, Gpu, Observation, Probe, Proc, Reason, Record
from reconciler.domain.status import (
    BootInfo,
    Condition,
    EngineInfo,
    ErrorInfo,
    Holder,
    Phase,
    Status,
    with_revision,
)
from reconciler.kit import schemas
from reconciler.kit.isotime import iso
from reconciler.observe.progress import BootProgress
from reconciler.plan import planner, report
from reconciler.plan.planner import Memory
from reconciler.store import state_file

T0 = "2026-01-01T10:00:00.000+00:00"
T1 = "2026-01-01T10:00:05.123+00:00"
T2 = "2026-01-01T10:45:00.000+01:00"

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """The strict part of RFC 3339 we promise: ISO-8601 with a zone."""
    if not isinstance(value, str):
        return True
    if datetime.fromisoformat(value).tzinfo is None:
        raise ValueError(f"no zone in {value!r}")
    return True


def validate(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schemas.load("observed_state"), format_checker=FORMATS)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def idle() -> Status:
    return Status(phase=Phase.IDLE, phase_since=T0, desired_model=None, active_model=None,
                  message="no model selected", reconciler={"pid": 1, "heartbeat": T0})


def loading() -> Status:
    return Status(
        phase=Phase.LOADING,
        phase_since=T0,
        desired_model="gpt-oss",
        active_model="gpt-oss",
        message="engine started, waiting for /health",
        engine=EngineInfo(model="gpt-oss", served_name="openai/gpt-oss-20b", instance="a1b2",
                          pid=4242, pids=[4242, 4243], port=18000, url="http://127.0.0.1:18000",
                          started_at=T0, adopted=False),
        boot=BootInfo(started_at=T0, elapsed_s=5.1, budget_s=2700.0, deadline=T2, attempt=2),
        last_log_line="INFO loading weights 40%",
        conditions=[
            Condition("DesiredValid", "True", "Valid", "ok", T0),
            Condition("CatalogValid", "True", "Valid", "using demo", T0),
            Condition("PortAvailable", "True", "Free", "free", T0),
            Condition("Ready", "False", "Loading", "waiting", T1),
            Condition("Converged", "False", "Progressing", "waiting", T1),
        ],
        last_error=ErrorInfo("BootTimeout", "gpt-oss did not answer within 2700 s", T0),
        desired_generation=3,
        observed_generation=3,
        revision=7,
        port_holders=[Holder(99, "nginx", "nginx: master process", ours=False)],
        restarts=1,
        next_retry_at=T1,
        gpu={"observable": True, "message": "1 GPU",
             "processes": [{"pid": 4243, "used_mib": 20480.5}]},
        recap={"spawned": 1, "killed": 0},
        reconciler={"pid": 10, "heartbeat": T1, "version": "0.1.0", "resync_interval_s": 5.0},
        config="--config /etc/ailayer/engines.yaml",
    )


# --- with_revision -------------------------------------------------------------------------


def test_first_status_gets_revision_one() -> None:
    assert with_revision(replace(idle(), revision=99), None).revision == 1


def test_an_identical_status_keeps_its_revision() -> None:
    previous = with_revision(loading(), None)
    assert with_revision(loading(), previous).revision == previous.revision


@pytest.mark.parametrize(
    "change",
    [
        {"reconciler": {"pid": 10, "heartbeat": T2, "version": "0.1.0"}},
        {"recap": {"spawned": 5, "killed": 3}},
        {"revision": 1234},
    ],
    ids=["heartbeat", "recap", "revision"],
)
def test_clock_driven_changes_do_not_bump(change: dict[str, Any]) -> None:
    previous = replace(loading(), revision=7)
    assert with_revision(replace(loading(), **change), previous).revision == 7


def test_boot_elapsed_does_not_bump() -> None:
    previous = replace(loading(), revision=7)
    assert previous.boot is not None
    later = replace(loading(), boot=replace(previous.boot, elapsed_s=1234.5))
    assert with_revision(later, previous).revision == 7


@pytest.mark.parametrize(
    "change",
    [
        {"phase": Phase.READY},
        {"phase_since": T1},
        {"message": "something else"},
        {"active_model": None},
        {"last_log_line": "INFO loading weights 41%"},
        {"desired_generation": 4},
        {"observed_generation": 2},
        {"restarts": 2},
        {"next_retry_at": None},
        {"last_error": None},
        {"engine": None},
        {"port_holders": []},
        {"conditions": []},
        {"gpu": {"observable": False, "message": "no NVML", "processes": []}},
        {"config": "built-in demo catalog"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_significant_changes_bump_by_one(change: dict[str, Any]) -> None:
    previous = replace(loading(), revision=7)
    assert with_revision(replace(loading(), **change), previous).revision == 8


def test_boot_fields_other_than_elapsed_bump() -> None:
    previous = replace(loading(), revision=7)
    assert previous.boot is not None
    retried = replace(loading(), boot=replace(previous.boot, attempt=3))
    assert with_revision(retried, previous).revision == 8
    gone = replace(loading(), boot=None)
    assert with_revision(gone, previous).revision == 8


@pytest.mark.parametrize("phase", [Phase.READY, Phase.IDLE])
def test_the_last_log_line_of_a_converged_state_does_not_bump(phase: Phase) -> None:
    """A serving engine's access and metrics lines would bump the revision every pass."""
    previous = replace(loading(), phase=phase, boot=None, revision=7)
    later = replace(previous, last_log_line="INFO:     127.0.0.1:40000 - \"POST /v1/completions\" 200 OK")
    assert with_revision(later, previous).revision == 7
    assert with_revision(replace(later, message="other"), previous).revision == 8


def test_gpu_memory_figures_do_not_bump_but_its_processes_do() -> None:
    previous = replace(loading(), revision=7)
    more = {**previous.gpu, "processes": [{"pid": 4243, "used_mib": 20500.0}]}
    assert with_revision(replace(loading(), gpu=more), previous).revision == 7
    other = {**previous.gpu, "processes": [{"pid": 5000, "used_mib": 20480.5}]}
    assert with_revision(replace(loading(), gpu=other), previous).revision == 8


def test_significant_leaves_out_only_volatile_fields() -> None:
    data = loading().significant()
    assert {"revision", "reconciler", "recap"}.isdisjoint(data)
    assert "elapsed_s" not in data["boot"]
    assert data["boot"]["attempt"] == 2
    assert data["phase"] == "LOADING"


# --- schema and round trip -----------------------------------------------------------------


@pytest.mark.parametrize("make", [idle, loading], ids=["idle", "loading"])
def test_to_dict_validates_against_the_schema(make: Any) -> None:
    built: Status = make()
    validate(built.to_dict())
    validate(json.loads(built.to_json()))


def test_the_schema_catches_a_broken_document() -> None:
    document = json.loads(idle().to_json())
    document["phase"] = "SLEEPING"
    with pytest.raises(AssertionError, match="phase"):
        validate(document)
    document = json.loads(idle().to_json())
    document["phase_since"] = "yesterday"
    with pytest.raises(AssertionError, match="phase_since"):
        validate(document)


@pytest.mark.parametrize("make", [idle, loading], ids=["idle", "loading"])
def test_round_trip_through_json_and_from_dict(make: Any) -> None:
    built: Status = make()
    again = status.from_dict(json.loads(built.to_json()))
    assert again == built
    assert again.phase is built.phase
    assert again.to_json() == built.to_json()


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "observed_state.json"
    state_file.write(path, loading())
    raw = state_file.read_raw(path)
    validate(raw)
    assert status.from_dict(raw) == loading()
    assert sorted(p.name for p in path.parent.iterdir()) == ["observed_state.json"]


def test_read_raw_refuses_what_is_not_an_observed_state(tmp_path: Path) -> None:
    path = tmp_path / "observed_state.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an observed-state document"):
        state_file.read_raw(path)
    path.write_text("{broken")
    with pytest.raises(ValueError):
        state_file.read_raw(path)


def test_from_dict_fills_defaults_for_a_minimal_document() -> None:
    minimal = {"phase": "IDLE", "phase_since": T0, "desired_model": None, "active_model": None}
    rebuilt = status.from_dict(minimal)
    assert rebuilt.phase is Phase.IDLE
    assert rebuilt.engine is None and rebuilt.boot is None and rebuilt.last_error is None
    assert (rebuilt.revision, rebuilt.desired_generation, rebuilt.observed_generation) == (0, 0, 0)
    assert rebuilt.conditions == [] and rebuilt.port_holders == []


def test_only_ready_is_serving() -> None:
    assert [p for p in Phase if p.serving] == [Phase.READY]


# --- report.compose: what the loop actually writes ------------------------------------------

NS = "testns"
NOW = 1_800_000_000.0


def vllm_proc(pid: int, started: float) -> Proc:
    return Proc(pid=pid, ppid=1, create_time=started, pgid=pid, sid=pid,
                cookie=Cookie(NS, "gpt-oss", "a1", started),
                cmdline="python -m reconciler.engines.demo.vllm_like serve openai/gpt-oss-20b --port 18000")


def record_of(pid: int, started: float) -> Record:
    return Record("gpt-oss", "a1", started, leader_pid=pid, leader_create_time=started)


COMPOSED_AT = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def compose(desired: str | None, obs: Observation, memory: Memory, previous: Status | None = None,
            errors: tuple[Failure, ...] = (), booting: BootProgress | None = None,
            at: datetime = COMPOSED_AT) -> Status:
    cat = catalog.demo(Path("/srv"))
    result = planner.plan(desired, cat.engines, obs, memory, NS)
    p = report.PassInput(catalog=cat, desired_model=desired, desired_generation=2, observed_generation=2,
                         plan=result, obs=obs, errors=errors, last_log_line="INFO hello",
                         recap={"spawned": 0}, leader_pid=None,
                         identity={"mode": "record", "reason": "test", "port_holders": "sock_diag"},
                         progress=booting)
    return report.compose(p, previous, Gpu(False, "no GPU in tests"), report.Stamp(at, 4242, "boot-1"))


def observation(*procs: Proc, probe: Probe | None = None, free: bool = True) -> Observation:
    records = tuple(record_of(p.pid, p.create_time) for p in procs)
    return Observation(now=NOW, procs=procs, port_free={18000: free, 18434: free}, probe=probe,
                       records=records)


def test_composed_idle_status_validates() -> None:
    composed = compose(None, observation(), Memory())
    assert composed.phase is Phase.IDLE
    assert composed.revision == 1
    validate(json.loads(composed.to_json()))
    assert {c.type for c in composed.conditions} == {"DesiredValid", "CatalogValid", "PortAvailable",
                                                      "Ready", "Converged"}


def test_composed_loading_status_has_engine_and_boot_and_validates() -> None:
    started = NOW - 60
    composed = compose("gpt-oss", observation(vllm_proc(10, started), probe=Probe(False, "refused")),
                       Memory(model="gpt-oss", tracked="a1"))
    assert composed.phase is Phase.LOADING
    assert composed.engine is not None and composed.engine.pids == [10]
    assert composed.boot is not None
    assert composed.boot.elapsed_s == 60.0
    assert composed.boot.budget_s == 2700.0
    assert composed.boot.progress is None  # the engine has said nothing about its load yet
    validate(json.loads(composed.to_json()))


def test_boot_progress_is_in_the_loading_state_and_a_new_percent_bumps_the_revision() -> None:
    started = NOW - 60
    obs = observation(vllm_proc(10, started), probe=Probe(False, "refused"))
    memory = Memory(model="gpt-oss", tracked="a1")
    first = compose("gpt-oss", obs, memory, booting=BootProgress(40.0, "loading checkpoint shards (2/5)"))
    assert first.boot is not None
    assert first.boot.progress == {"percent": 40.0, "stage": "loading checkpoint shards (2/5)"}
    validate(json.loads(first.to_json()))
    same = compose("gpt-oss", obs, memory, first, booting=BootProgress(40.0, "loading checkpoint shards (2/5)"))
    assert same.revision == first.revision
    moved = compose("gpt-oss", obs, memory, same, booting=BootProgress(60.0, "loading checkpoint shards (3/5)"))
    assert moved.revision == first.revision + 1
    assert status.from_dict(json.loads(moved.to_json())).boot == moved.boot


def test_boot_progress_is_gone_once_ready() -> None:
    started = NOW - 60
    ready = compose("gpt-oss", observation(vllm_proc(10, started), probe=Probe(True, "200")),
                    Memory(model="gpt-oss", tracked="a1", ready_since=NOW - 1),
                    booting=BootProgress(None, "starting the API server"))
    assert ready.phase is Phase.READY and ready.boot is None


def test_the_report_writes_the_stamp_it_is_given() -> None:
    """The report reads no clock, pid nor boot id: the caller's stamp is what the document says."""
    composed = compose(None, observation(), Memory(), at=COMPOSED_AT)
    assert (composed.reconciler["pid"], composed.reconciler["boot_id"]) == (4242, "boot-1")
    assert composed.reconciler["heartbeat"] == composed.phase_since == iso(COMPOSED_AT)
    assert {c.last_transition_time for c in composed.conditions} == {iso(COMPOSED_AT)}


def test_composed_status_with_an_error_validates_and_keeps_times_across_passes() -> None:
    errors = (Failure(Reason.INVALID_DESIRED_STATE, "desired_state.yaml: field 'model': bad"),)
    first = compose(None, observation(), Memory(), errors=errors)
    assert first.last_error is not None and first.last_error.reason == "InvalidDesiredState"
    desired_valid = next(c for c in first.conditions if c.type == "DesiredValid")
    assert desired_valid.status == "False"
    validate(json.loads(first.to_json()))
    again = compose(None, observation(), Memory(), previous=first, errors=errors,
                    at=COMPOSED_AT + timedelta(seconds=5))
    assert again.revision == first.revision
    assert again.last_error == first.last_error
    assert again.phase_since == first.phase_since
    assert [c.last_transition_time for c in again.conditions] == \
        [c.last_transition_time for c in first.conditions]


def test_liveness_running_stale_and_stopped() -> None:
    now = datetime.fromisoformat(T1)
    doc = loading().to_dict()
    assert status.liveness(doc, now, 30.0)[0] == "running"
    later = now + timedelta(seconds=31)
    state, why = status.liveness(doc, later, 30.0)
    assert state == "stale" and "heartbeat is" in why and "limit 30 s" in why
    assert status.liveness({"phase": "READY"}, now, 30.0)[0] == "stale"  # no heartbeat at all
    assert status.liveness({**doc, "reconciler": {"heartbeat": "garbage"}}, now, 30.0)[0] == "stale"


@pytest.mark.parametrize("engines_stopped", [True, False])
def test_a_clean_stop_leaves_a_state_that_says_so(engines_stopped: bool) -> None:
    last = replace(loading(), phase=Phase.READY, boot=None, revision=7)
    final = status.stopped(last, T2, engines_stopped)
    assert final.reconciler["stopped_at"] == T2 and final.revision == 8
    assert status.liveness(final.to_dict(), datetime.fromisoformat(T2), 30.0)[0] == "stopped"
    assert (final.engine is None) is engines_stopped
    assert ("left running (pid 4242)" in final.message) is not engines_stopped
    validate(json.loads(final.to_json()))
