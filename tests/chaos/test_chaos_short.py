"""The fault suite at CI size (scenarios.py; bench/chaos.py runs them at the issue's size).

Each scenario is real processes, real ports and the real process table; each returns its
figures and a list of problems, and a problem is a defect. Run alone with
``pytest tests/chaos -q``; the full sizes: ``python bench/chaos.py --full``.
"""

from __future__ import annotations

import pytest

from tests.chaos import scenarios as chaos

pytestmark = pytest.mark.integration

SHORT = chaos.SIZES["short"]


def _ok(result: chaos.Result) -> None:
    assert result.problems == [], f"{result.scenario}: {result.problems[:5]} (figures: {result.figures})"


@pytest.mark.parametrize("identity", ["cgroup", "record"])
def test_flapping_toggles_never_overlap_and_converge_to_the_last(identity: str) -> None:
    result = chaos.flapping(SHORT["toggles"], seed=11, identity=identity)
    _ok(result)
    assert result.figures["two_engines_alive_moments"] == 0
    assert result.figures["leaked_processes"] == 0
    assert result.figures["samples"] > SHORT["toggles"]


@pytest.mark.parametrize("identity", ["cgroup", "record"])
def test_sigkilled_reconciler_restarts_without_duplicates_or_torn_state(identity: str) -> None:
    result = chaos.sigkill(SHORT["kills"], seed=12, identity=identity)
    _ok(result)
    assert result.figures["kills"] == SHORT["kills"]
    assert result.figures["state_parse_failures"] == 0 and result.figures["state_reads"] > 0


def test_bad_input_is_reported_and_the_last_good_state_kept() -> None:
    result = chaos.badinput(SHORT["bad_files"], seed=13)
    _ok(result)
    assert result.figures["cases"] >= SHORT["bad_files"]
    assert result.figures["reconciler_crashes"] == 0 and result.figures["engine_pid_unchanged"]


@pytest.mark.parametrize("mode", ["crash-loading", "crash-ready", "hang-ready", "exit-at-once"])
def test_engine_faults_are_detected_and_backed_off(mode: str) -> None:
    _ok(chaos.engine_fault(mode, SHORT["restarts"]))


def test_hang_after_ready_leaves_ready_at_once_and_is_declared_within_10_s_by_default() -> None:
    result = chaos.hang_with_defaults()
    _ok(result)
    assert result.figures["phases_after_ready"][:3] == ["READY", "DEGRADED", "FAILED"]


def test_a_flapping_burst_costs_a_handful_of_starts_and_bounded_cpu() -> None:
    result = chaos.burst(SHORT["burst_s"])
    _ok(result)
    assert result.figures["writes"] > 100 * SHORT["burst_s"]


@pytest.mark.parametrize("mode", ["ansi", "bigline", "close-stdout", "flood"])
def test_hostile_output_neither_blocks_nor_forges(mode: str) -> None:
    _ok(chaos.output_fault(mode, SHORT["flood_s"]))


def test_security_checks() -> None:
    _ok(chaos.security())


def test_files_removed_unwritable_or_rotated_mid_run() -> None:
    result = chaos.files()
    _ok(result)
    assert result.figures["engine_pid_unchanged"]
    assert result.figures["second_reconciler_refused_after_state_dir_removed"]
    assert "falling back" in result.figures["terminal_says"]


def test_log_disk_full_mid_run_keeps_converging_and_counts_lost_lines() -> None:
    result = chaos.diskfull()
    if "skipped" in result.figures:
        pytest.skip(result.figures["skipped"])
    _ok(result)
    assert result.figures["lines_lost_reported"] > 0


def test_gate_under_load_refuses_while_idle_and_long_polls_see_every_change() -> None:
    result = chaos.gate(SHORT["gate_requests"], SHORT["longpoll_clients"], SHORT["state_changes"])
    _ok(result)
    assert result.figures["idle_codes"] == {"428": SHORT["gate_requests"]}
    assert result.figures["missed_final"] == 0 and result.figures["went_backwards"] == 0


def test_foreign_port_holder_is_waited_for_and_the_engine_starts_after_it() -> None:
    result = chaos.ports(SHORT["port_rounds"])
    _ok(result)
    assert len(result.figures["start_after_release_s"]) == SHORT["port_rounds"]


def test_requests_in_flight_across_a_switch_end_with_an_answer_or_a_clear_error() -> None:
    result = chaos.inflight(SHORT["inflight_requests"])
    _ok(result)
    assert result.figures["hangs"] == 0
    assert result.figures["in_flight_at_toggle"] == SHORT["inflight_requests"]
    assert sum(result.figures["outcomes"].values()) == SHORT["inflight_requests"]
    assert result.figures["toggle_to_end_max_s"] < chaos.INFLIGHT_CLIENT_TIMEOUT_S


def test_two_entries_sharing_a_port_never_overlap_and_bind_late() -> None:
    result = chaos.sharedport(SHORT["shared_switches"])
    _ok(result)
    assert result.figures["overlaps"] == 0 and result.figures["duplicates"] == 0
    assert len(result.figures["spawn_to_port_answering_s"]) == SHORT["shared_switches"]
