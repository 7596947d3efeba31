"""The cost of one reconciler pass on a crowded machine.

    .venv/bin/python bench/pass_cost.py [--crowd 2000] [--rounds 5]

Starts ``--crowd`` idle processes (``sleep``), then times, in one run: reading the process
table the way the previous version did (psutil's process_iter with the same attributes),
the way ailayer reads it now (``gather.processes``), and a whole IDLE pass of a reconciler
on the demo catalog (``Reconciler.step``). Every sleeper is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import yaml

from reconciler.domain.catalog import Identity, load_file
from reconciler.kit.logs import ActivityLog
from reconciler.loop import Reconciler
from reconciler.observe import gather
from reconciler.simulate.harness import demo_engines

PSUTIL_ATTRS = ["pid", "ppid", "name", "cmdline", "create_time", "status", "uids"]
SETTLE_S = 1.0  # for the sleepers to have exec'd


def timed(work: Callable[[], object], rounds: int) -> dict[str, float]:
    work()  # warm caches (ailayer's per-process identity cache among them)
    ms = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        ms.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
            "max_ms": round(max(ms), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crowd", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.crowd)]
    try:
        time.sleep(SETTLE_S)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "engines.yaml"
            config.write_text(yaml.safe_dump({"state_dir": "run", "log_file": "run/activity.log",
                                              "engines": demo_engines(boot_s=0)}))
            catalog = load_file(config, "--config")
            for mode in ("cgroup", "record"):
                catalog = replace(catalog, identity=Identity(mode=mode))
                reconciler = Reconciler(catalog, ActivityLog(catalog.log_file, catalog.state_dir))
                if reconciler.mode.name != mode:
                    continue
                pass_cost = timed(reconciler.step, args.rounds)
                print(json.dumps({"identity": mode, "idle_pass": pass_cost}))
        print(json.dumps({
            "processes": len(psutil.pids()),
            "psutil process_iter alone (what the previous version built on)": timed(
                lambda: list(psutil.process_iter(PSUTIL_ATTRS)), args.rounds),
            "gather.processes (now)": timed(gather.processes, args.rounds),
        }))
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        for sleeper in sleepers:
            sleeper.wait()


if __name__ == "__main__":
    main()
