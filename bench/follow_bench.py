"""How fast the follower copies an engine's output into the activity log.

    .venv/bin/python bench/follow_bench.py [--mb 200] [--rounds 3] [--kind vllm]

Writes ``--mb`` MB of plain engine lines (vLLM's INFO lines, ~130 bytes each) to an engine's
output file, then times, in one run and on the same bytes: the floor (reading the file and
writing it to another in 1 MiB blocks, no lines at all); the follower copying all of it (no
rate limit) into an activity log whose terminal is /dev/null (every line formatted and
written to both sinks, as under ``ailayer up``); and the follower under the default
``log_limits`` (1 MiB/s, 32 MiB bursts), which copies a burst and counts the rest. Prints
MB/s for each. The target (issue 25): the follower keeps up with at least 50 MB/s of plain
lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from reconciler.domain.catalog import LogLimits
from reconciler.kit.logs import ActivityLog
from reconciler.observe.follow import Follower

LINE = ("INFO 12-08 10:00:{s:02d} [loggers.py:123] Engine 000: Avg prompt throughput: 512.3 tokens/s, "
        "Avg generation throughput: 88.{n} tokens/s\n")


def write_output(path: Path, mb: int) -> int:
    block = "".join(LINE.format(s=i % 60, n=i % 10) for i in range(8000)).encode()
    with path.open("wb") as out:
        for _ in range(mb * 1_000_000 // len(block) + 1):
            out.write(block)
    return path.stat().st_size


def floor_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with src.open("rb") as inp, dst.open("wb") as out:
        while chunk := inp.read(1 << 20):
            out.write(chunk)
    return time.perf_counter() - start


def follow_copy(root: Path, src: Path, kind: str, limits: LogLimits) -> float:
    state = root / "state"
    engines = state / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    target = engines / "bench.1a2b.log"
    src.rename(target)
    with open(os.devnull, "w") as terminal:
        log = ActivityLog(root / "activity.log", state, terminal=terminal)
        follower = Follower(log, state)
        follower.limits = limits
        follower.track(target, "bench", 4242, kind)
        start = time.perf_counter()
        while follower.unread(target) > 0:
            follower.poll()
        elapsed = time.perf_counter() - start
        log.close()
    target.rename(src)
    (root / "activity.log").unlink()
    shutil.rmtree(state)  # the next round starts with no saved offsets
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kind", default="vllm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "output.log"
        size = write_output(src, args.mb)
        floors, copies, limited = [], [], []
        unlimited = LogLimits(engine_bytes_per_s=None, file_max_bytes=None)
        for _ in range(args.rounds):
            floors.append(size / floor_copy(src, root / "copy.log") / 1e6)
            (root / "copy.log").unlink()
            copies.append(size / follow_copy(root, src, args.kind, unlimited) / 1e6)
            limited.append(size / follow_copy(root, src, args.kind, LogLimits()) / 1e6)
        print(json.dumps({"bytes": size, "kind": args.kind, "rounds": args.rounds,
                          "floor_mb_s": round(statistics.median(floors), 1),
                          "follower_copy_all_mb_s": round(statistics.median(copies), 1),
                          "follower_copy_all_rounds": [round(x, 1) for x in copies],
                          "follower_default_limits_mb_s": round(statistics.median(limited), 1)}, indent=2))


if __name__ == "__main__":
    main()
