"""The text the commands print about ailayer's state: ``status`` (as text or JSON),
``reconcile --diff``, and ``up``'s banner of what to type next."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from reconciler.domain import status
from reconciler.domain.catalog import Catalog
from reconciler.kit import clock
from reconciler.kit.schemas import InvalidFile
from reconciler.store import desired_file, state_file

if TYPE_CHECKING:
    from reconciler.plan.planner import Plan, Verdict


class Seen(NamedTuple):
    """The observed state as ``status`` shows it, and whether a live reconciler stands behind it."""

    doc: dict[str, object]
    live: str  # "running", or why not: "stopped", "stale", "not running"
    why: str

    @property
    def running(self) -> bool:
        return self.live == "running"


def seen(catalog: Catalog) -> Seen:
    """The observed-state document, or a stand-in saying why there is none to show."""
    try:
        doc = state_file.read_raw(catalog.observed_path)
        live, why = status.liveness(doc, clock.now(), catalog.gate.stale_after_s)
    except FileNotFoundError:
        doc = {"phase": "UNKNOWN", "message": "no observed state yet: is the reconciler running?"}
        live, why = "not running", f"no observed state at {catalog.observed_path}"
    except (OSError, ValueError) as exc:
        doc = {"phase": "UNKNOWN", "message": f"unreadable observed state: {exc}"}
        live, why = "not running", "the observed state cannot be read"
    return Seen(doc, live, why)


def status_json(shown: Seen) -> str:
    return json.dumps({"stale": not shown.running, "reconciler_state": shown.live,
                       "reconciler_why": shown.why, **shown.doc}, indent=2)


def status_text(shown: Seen) -> str:
    return _state(shown.doc) + ("" if shown.running else
                                f"\n{shown.live.upper()}: {shown.why}; the state above is its last report")


def _state(doc: dict[str, object]) -> str:
    lines = [f"phase: {doc.get('phase')}  ({doc.get('message', '')})",
             f"desired: {doc.get('desired_model')}  active: {doc.get('active_model')}  "
             f"generation: {doc.get('observed_generation')}/{doc.get('desired_generation')}"]
    engine = doc.get("engine")
    if isinstance(engine, dict):
        memory = engine.get("memory_bytes")
        held = f", {memory / 2**20:.0f} MiB ({engine.get('memory_source')})" if isinstance(memory, int) else ""
        lines.append(f"engine: pid {engine.get('pid')} pids {engine.get('pids')} at {engine.get('url')}{held}")
    strays = doc.get("strays")
    for stray in strays if isinstance(strays, list) else []:
        if isinstance(stray, dict):
            lines.append(f"stray {stray.get('model')}: pids {stray.get('pids')} uids {stray.get('uids')} "
                         f"not killed: {stray.get('why')}")
    identity = doc.get("identity")
    if isinstance(identity, dict):
        lines.append(f"identity: {identity.get('mode')} ({identity.get('reason')}); "
                     f"port holders by {identity.get('port_holders')}")
    boot = doc.get("boot")
    if isinstance(boot, dict):
        lines.append(f"boot: {boot.get('elapsed_s')} s of {boot.get('budget_s')} s "
                     f"(deadline {boot.get('deadline')}, attempt {boot.get('attempt')})")
    if doc.get("last_log_line"):
        lines.append(f"last log: {doc.get('last_log_line')}")
    error = doc.get("last_error")
    if isinstance(error, dict):
        lines.append(f"last error: {error.get('reason')}: {error.get('message')}")
    beat = doc.get("reconciler")
    if isinstance(beat, dict):
        lines.append(f"reconciler: pid {beat.get('pid')} heartbeat {beat.get('heartbeat')}")
    return "\n".join(lines)


def diff(catalog: Catalog) -> str:
    """``reconcile --diff``: the desired model beside what the last written state observed."""
    try:
        observed = state_file.read_raw(catalog.observed_path)
    except (OSError, ValueError):
        observed = {}
    try:
        wish = desired_file.read(catalog).model
    except InvalidFile as exc:
        wish = f"<invalid: {exc}>"
    return (f"--- desired ({catalog.desired_path})\n+++ observed ({catalog.observed_path})\n"
            f"-model: {wish}\n+active_model: {observed.get('active_model')}  "
            f"phase: {observed.get('phase', 'unknown')}")


def would_change(plan: Plan) -> str:
    """``reconcile --check``: what a pass would change, and the phase it would reach."""
    lines = [f"would change: {action.describe()}" for action in plan.actions] or ["ok: nothing to change"]
    return "\n".join([*lines, f"phase would be {plan.verdict.phase.value}: {plan.verdict.message}"])


def recap(counts: dict[str, int], verdict: Verdict) -> str:
    """``reconcile --once``: what the pass did, and the phase it reached."""
    return (f"RECAP: ok={counts.get('ok', 0)} changed={counts.get('changed', 0)} "
            f"failed={counts.get('failed', 0)}  phase={verdict.phase.value}: {verdict.message}")


def banner(catalog: Catalog, url: str, config: Path | None, demo: bool) -> str:
    """What to type next, with the catalog options ``up`` was given, as given; each command
    works as printed (tests/e2e/test_ops.py runs them)."""
    again = ["--config", str(config)] if config is not None else ["--demo"] if demo else []

    def cmd(*args: str) -> str:
        return shlex.join([*_program(), *args, *again])

    first = catalog.names()[0]
    prompt = json.dumps({"model": first, "messages": [{"role": "user", "content": "hi"}]})
    curl = shlex.join(["curl", "-s", f"{url}/v1/chat/completions", "-H",
                       "Content-Type: application/json", "-d", prompt])
    return (f"ailayer is up: gate {url}  (models: {', '.join(catalog.names())})\n"
            f"  select a model:  {cmd('toggle', first)}   (or: {cmd('toggle', 'none')})\n"
            f"  follow it:       {cmd('status', '--watch')}   |   curl -s {url}/status\n"
            f"  then prompt it:  {curl}\n"
            f"  stop it:         Ctrl-C, or {cmd('down')}")


def _program() -> list[str]:
    """How this ailayer is typed in the user's shell: ``ailayer`` only when that is on PATH."""
    script = Path(sys.executable).parent / "ailayer"
    if not script.is_file():  # run as `python -m reconciler` without an install
        return [sys.executable, "-m", "reconciler"]
    found = shutil.which("ailayer")
    if found is not None and os.path.samefile(found, script):
        return ["ailayer"]
    if script.is_relative_to(Path.cwd()):
        return [str(script.relative_to(Path.cwd()))]  # e.g. .venv/bin/ailayer: it has a slash
    return [str(script)]
