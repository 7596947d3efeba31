"""The "Zombies": start vLLM, switch to Gemma 2, prove with ps aux that vLLM is entirely dead.

Run twice: once with the EngineCore worker as a plain child, once with a worker that left
the session and ignores SIGTERM (what survives a naive "kill the parent").
"""

from __future__ import annotations

import os
import subprocess

from reconciler import gpu
from reconciler.simulate.harness import Scenario, demo_engines
from reconciler.simulate.report import Report

VLLM, OLLAMA = "reconciler.demo.vllm_like", "reconciler.demo.ollama_like"
# Real seconds: the demo engines boot in one; this only bounds a broken run.
LIMIT_S = 120.0
BOOT_S = 1.0


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
    label = "zombies (worker escapes its session, ignores SIGTERM)" if escape else "zombies"
    report = Report(label)
    with Scenario(demo_engines(BOOT_S, escape=escape)) as sim:
        sim.toggle("gpt-oss")
        before = sim.wait_phase("READY", "gpt-oss", LIMIT_S)
        old = {p.pid for p in sim.tree(VLLM)}
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
        after = sim.wait_phase("READY", "gemma2", LIMIT_S)
        new = {p.pid for p in sim.tree(OLLAMA)}
        survivors = {p.pid for p in sim.tree(VLLM)}
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


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1
