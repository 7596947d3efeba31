"""The fault suite (issue 6): attack the reconciler and the gate the way real servers do, and measure.

    .venv/bin/python bench/chaos.py [scenario ...] [--full] [--seed N] [--json PATH]

Scenarios: flapping, sigkill, badinput, faults, output, security, files (with diskfull), gate,
ports, inflight (requests across a switch), sharedport (two entries on one port, late binding).
Without ``--full`` each runs at its CI size (``tests/chaos/test_chaos_short.py`` runs
exactly these); with ``--full`` at the issue's size (1,000 toggles, 100 SIGKILLs, >= 200 bad
files, 10,000 idle requests, 1,000 long-poll clients across 50 toggles).

Everything is real: reconciler subprocesses, demo engines, loopback ports, the process
table. Every catalog recognises strays only by the entry's own command (its port is in it),
so no other engineer's demo engines on this machine can ever be mistaken for ours, and every
process this suite starts carries the run marker (``AILAYER_TEST_RUN``), or belongs to the
session of one that does (setproctitle wipes a worker's environment), so leaks are found
exactly. ``--identity cgroup|record`` runs the flapping and SIGKILL scenarios in that mode.
Teardown goes through the product: toggle none, wait IDLE, stop the reconciler,
then ``reconcile --once``.

Each scenario returns a ``Result``: figures (what the docs table reports) and problems
(each one a defect; the CI test asserts there are none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import yaml  # noqa: E402

from reconciler.domain import desired as desired_mod  # noqa: E402
from reconciler.domain.catalog import DEFAULT_RESYNC_INTERVAL_S, from_document, load_file  # noqa: E402
from reconciler.domain.facts import COOKIE_ENV  # noqa: E402
from reconciler.kit import yamlfile  # noqa: E402
from reconciler.kit.atomicfile import write_atomic  # noqa: E402
from reconciler.kit.freeport import free_port  # noqa: E402
from reconciler.kit.schemas import InvalidFile  # noqa: E402
from reconciler.loop import namespace_of  # noqa: E402
from reconciler.store import desired_file  # noqa: E402
from tests.helpers import PY, TEST_RUN_ENV, Stack, demo_engine  # noqa: E402
from tests.helpers import wait_until as wait_for  # noqa: E402

# The issue's sampling interval for the process table.
SAMPLE_S = 0.01
# The observed-state reader in the SIGKILL scenario: as fast as it can, with a yield.
READ_SPIN_S = 0.001
# How long a scenario waits for convergence after its last disturbance: the slowest boot
# here is 2 s, the longest backoff 2 s, a kill verifies in milliseconds; 60 s means "hung"
# even on a loaded 2-core machine.
CONVERGE_LIMIT_S = 60.0
# How long one bad file may take to be reported: one resync (0.2 s here) or a file event.
REPORT_LIMIT_S = 15.0
# Teardown: toggle none must reach IDLE within this; a stuck teardown is itself a defect.
TEARDOWN_LIMIT_S = 30.0
# A reconciler process stop (SIGTERM) and a CLI call.
PROCESS_LIMIT_S = 30.0
# One HTTP request on loopback (health, toggle): an answer is milliseconds.
HTTP_TIMEOUT_S = 5.0
# The flapping scenario's interval between toggles and boot times, as the issue asks.
TOGGLE_GAP_MAX_S = 0.5
BOOT_MAX_S = 2.0
# The SIGKILL scenario's window after a disturbance in which the kill lands: it covers
# the kill, the spawn, the whole 0.8 s boot and the passes that write the state.
KILL_WINDOW_S = 1.2
SIGKILL_BOOT_S = 0.8
POLL_S = 0.02
# The loop writes the observed state every liveness period (0.5 s here); a gap over this
# means the engine's output stalled the loop (toggles and liveness checks wait behind it).
STALL_LIMIT_S = 2.0
# Property-based cases in every run, however many hand-written ones there are.
MIN_GENERATED = 20

SIZES: dict[str, dict[str, int]] = {
    "short": {"toggles": 60, "kills": 10, "bad_files": 60, "restarts": 2, "flood_s": 2,
              "gate_requests": 1000, "longpoll_clients": 100, "state_changes": 10, "port_rounds": 3,
              "inflight_requests": 20, "shared_switches": 4, "burst_s": 5},
    "full": {"toggles": 1000, "kills": 100, "bad_files": 240, "restarts": 4, "flood_s": 3,
             "gate_requests": 10_000, "longpoll_clients": 1000, "state_changes": 50, "port_rounds": 5,
             "inflight_requests": 200, "shared_switches": 10, "burst_s": 10},
}
VLLM, OLLAMA = "gpt-oss", "gemma2"
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d\] \[([^\]]+)\] \[(\d+|-)\] (.*)$")
NASTY = REPO / "tests" / "chaos" / "nasty_engine.py"


@dataclass
class Result:
    scenario: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


# ----------------------------------------------------------------------------- setup


def run_marker() -> str:
    """Every process started from here inherits it (pytest's conftest sets it for the tests)."""
    return os.environ.setdefault(TEST_RUN_ENV, f"chaos-{uuid.uuid4().hex}")


ONLY_OWN_COMMAND: dict[str, list[Any]] = {"argv": [], "titles": []}
IDENTITY_MODES = ("auto", "cgroup", "record")


def vllm_entry(port: int, boot_s: float, *args: str, **extra: Any) -> dict[str, Any]:
    return demo_engine("vllm", port, boot_s, args=list(args), **extra)


def ollama_entry(port: int, boot_s: float, *args: str, **extra: Any) -> dict[str, Any]:
    return demo_engine("ollama", port, boot_s, args=list(args), **extra)


def nasty_entry(port: int, mode: str, *args: str) -> dict[str, Any]:
    return {"kind": "generic", "port": port,
            "command": ["{python}", str(NASTY), "--port", "{port}", "--mode", mode, *args],
            "strays": ONLY_OWN_COMMAND,
            "ready": {"period_s": 0.1, "timeout_s": 1}, "liveness": {"period_s": 0.5},
            "restart_backoff": {"initial_s": 0.5, "max_s": 2}}


def set_boot(stack: Stack, model: str, seconds: float) -> None:
    command = stack.engines[model]["command"]
    flag = "--boot-seconds" if "--boot-seconds" in command else "--load-seconds"
    command[command.index(flag) + 1] = f"{seconds:.3f}"


def catalog_text(stack: Stack) -> str:
    return yaml.safe_dump(stack.catalog_doc())


def write_catalog_atomic(stack: Stack) -> None:
    write_atomic(stack.config, catalog_text(stack))


def toggle(stack: Stack, model: str | None) -> int:
    """The reference writer, in process: a CLI start costs ~0.3 s, longer than many gaps here."""
    wish = stack.wish(model, "chaos")
    assert wish.generation is not None
    return wish.generation


RETRY = "retry"


class Census:
    """This stack's live engine processes by (model, instance), from the cookie in their environment.

    Environments are read once per process (a process cannot change what /proc shows);
    processes carrying the run marker but no cookie yet (forked, not exec'd) are re-read.
    A worker whose environment setproctitle wiped (vLLM's EngineCore) is counted through its
    session: engines are spawned as session leaders, and the census remembers each leader's
    (model, instance) by session id, so an orphaned worker is still seen after its leader died.
    """

    def __init__(self, namespace: str) -> None:
        self._run = run_marker()
        self._ns = namespace
        self._known: dict[int, tuple[str, str] | None] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._sessions: dict[int, tuple[str, str]] = {}

    def _identify(self, pid: int) -> tuple[str, str] | str | None:
        """(model, instance) of ours; None for a process that never will be; RETRY to look again."""
        try:
            proc = psutil.Process(pid)
            env = proc.environ()
            sid = os.getsid(pid)
        except psutil.AccessDenied:
            return None
        except (psutil.Error, OSError):
            return RETRY  # gone or a zombie
        if env.get(TEST_RUN_ENV) != self._run:
            if sid in self._sessions:
                self._procs[pid] = proc
                return self._sessions[sid]
            return None if env else RETRY  # an empty environment may be a wiped one: look again
        parts = env.get(COOKIE_ENV, "").split("/")
        if parts[0] != self._ns and len(parts) == 4:
            return None  # another stack's engine
        if len(parts) != 4:
            return RETRY  # ours but no cookie (yet: forked, not exec'd)
        self._procs[pid] = proc
        if sid == pid:
            self._sessions[pid] = (parts[1], parts[2])
        return parts[1], parts[2]

    def sample(self) -> dict[str, dict[str, list[int]]]:
        """model -> instance -> live (non-zombie) pids."""
        pids = psutil.pids()
        live = set(pids)
        for pid in [p for p in self._known if p not in live]:
            self._known.pop(pid, None)
            self._procs.pop(pid, None)
        out: dict[str, dict[str, list[int]]] = {}
        for pid in pids:
            if pid not in self._known:
                who = self._identify(pid)
                if isinstance(who, str):
                    continue
                self._known[pid] = who
            key = self._known[pid]
            if key is None or not self._alive(pid):
                continue
            out.setdefault(key[0], {}).setdefault(key[1], []).append(pid)
        return out

    def _alive(self, pid: int) -> bool:
        proc = self._procs.get(pid)
        try:
            return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def recheck(self, snap: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
        """The same processes, looked at again: which of them are still alive *now*."""
        out: dict[str, dict[str, list[int]]] = {}
        for model, instances in snap.items():
            for instance, pids in instances.items():
                alive = [p for p in pids if self._alive(p)]
                if alive:
                    out.setdefault(model, {})[instance] = alive
        return out

    def pids(self) -> list[int]:
        return sorted(p for m in self.sample().values() for ps in m.values() for p in ps)


class Watcher(threading.Thread):
    """A sampling thread used as a context manager: started on entry, stopped and joined on exit."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=PROCESS_LIMIT_S)


class Sampler(Watcher):
    """Every 10 ms: were processes of two engines (or two instances of one) alive at once?

    A sample reads processes one after another; a suspicious one is confirmed by looking at
    the same processes again, so an old process that died between two reads is not counted.
    """

    def __init__(self, census: Census) -> None:
        super().__init__("chaos-sampler")
        self.census = census
        self.samples = 0
        self.overlaps: list[str] = []
        self.duplicates: list[str] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            began = time.monotonic()
            snap = self.census.sample()
            self.samples += 1
            if len(snap) >= 2 or any(len(i) >= 2 for i in snap.values()):
                now = self.census.recheck(snap)
                if len(now) >= 2:
                    self.overlaps.append(f"{time.time():.3f} {now}")
                if any(len(i) >= 2 for i in now.values()):
                    self.duplicates.append(f"{time.time():.3f} {now}")
            self._stop_event.wait(max(0.0, SAMPLE_S - (time.monotonic() - began)))


def converged(stack: Stack, census: Census, model: str | None, generation: int,
              reconciler_pid: int | None = None) -> dict[str, Any] | None:
    doc = stack.status()
    if doc.get("desired_generation", -1) < generation or doc.get("desired_model") != model:
        return None
    if doc.get("phase") != ("READY" if model else "IDLE") or doc.get("active_model") != model:
        return None
    if reconciler_pid is not None and (doc.get("reconciler") or {}).get("pid") != reconciler_pid:
        return None
    alive = census.sample()
    if model is None and alive:
        return None
    if model is not None and (set(alive) != {model} or len(alive[model]) != 1):
        return None
    return doc


@contextlib.contextmanager
def rig(res: Result, engines: dict[str, dict[str, Any]], resync_s: float = 1.0,
        identity: str = "auto") -> Iterator[Stack]:
    """A stack in a temp dir, torn down through the product whatever happens inside."""
    run_marker()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        stack = Stack(Path(tmp), engines, resync_s, top={"identity": {"mode": identity}})
        try:
            yield stack
        finally:
            res.problems += teardown(stack)


def teardown(stack: Stack) -> list[str]:
    """Toggle none, wait IDLE, stop the reconciler, then one ``reconcile --once``; report leaks."""
    census = Census(namespace_of(stack.state_dir))
    problems: list[str] = []
    if stack.proc is not None and stack.proc.poll() is None:
        gen = toggle(stack, None)
        try:
            wait_for("IDLE at teardown", lambda: converged(stack, census, None, gen), TEARDOWN_LIMIT_S)
        except TimeoutError as exc:
            problems.append(str(exc))
        stack.stop()
    else:
        toggle(stack, None)
    once = stack.cli("reconcile", "--once", timeout=PROCESS_LIMIT_S)
    if once.returncode != 0:
        problems.append(f"reconcile --once at teardown exited {once.returncode}: {once.stderr[-300:]}")
    left = census.pids()
    if left:
        problems.append(f"processes left after teardown: {left}")
        for pid in left:  # ours by cookie and run marker, never anyone else's
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    return problems


# ----------------------------------------------------------------------------- 1. flapping


def flapping(toggles: int, seed: int = 1, identity: str = "auto") -> Result:
    """Random toggles among two demo engines and none, random boots; nothing may overlap."""
    res = Result(f"flapping ({identity})" if identity != "auto" else "flapping")
    rng = random.Random(seed)
    engines = {VLLM: vllm_entry(free_port(), 0.3), OLLAMA: ollama_entry(free_port(), 0.3)}
    with rig(res, engines, identity=identity) as stack:
        stack.start()
        census = Census(namespace_of(stack.state_dir))
        choices: list[str | None] = [VLLM, OLLAMA, None]
        last: str | None = None
        generation = 0
        t0 = time.monotonic()
        with Sampler(census) as sampler:
            for i in range(toggles):
                if i:
                    time.sleep(rng.uniform(0, TOGGLE_GAP_MAX_S))  # the scenario's random interval
                last = rng.choice(choices)
                if last is not None:
                    set_boot(stack, last, rng.uniform(0, BOOT_MAX_S))
                    write_catalog_atomic(stack)
                generation = toggle(stack, last)
            t_last = time.monotonic()
            try:
                doc = wait_for("convergence after the last toggle",
                               lambda: converged(stack, census, last, generation), CONVERGE_LIMIT_S)
                res.figures["converge_after_last_toggle_s"] = round(time.monotonic() - t_last, 3)
                res.check(doc["active_model"] == last, f"observed {doc['active_model']}, last toggle {last}")
            except TimeoutError as exc:
                res.problems.append(str(exc))
        alive = census.sample()
        leaked = [p for m, inst in alive.items() if m != last for ps in inst.values() for p in ps]
        res.figures.update({
            "toggles": toggles, "seconds": round(t_last - t0, 1), "last_toggle": last or "none",
            "samples": sampler.samples, "two_engines_alive_moments": len(sampler.overlaps),
            "duplicate_instance_moments": len(sampler.duplicates), "leaked_processes": len(leaked),
            "sample_interval_ms": round((t_last - t0) / max(sampler.samples, 1) * 1000, 1),
        })
        res.check(not sampler.overlaps, f"two engines alive at once: {sampler.overlaps[:3]}")
        res.check(not sampler.duplicates, f"two instances of one engine: {sampler.duplicates[:3]}")
        res.check(not leaked, f"leaked processes: {leaked}")
    return res


# A flapping burst: after it, the last model must be served within this (the flap window
# is at most reconciler.loop.FLAP_WINDOW_MAX_S, then a 0 s boot).
BURST_SETTLE_S = 10.0
# Share of one core the reconciler may spend during the burst: its passes are spaced
# (reconciler.loop.WAKE_SPACING_S); what scales with the writes is the file watcher's
# per-event cost.
BURST_CPU_SHARE = 0.4


def burst(seconds: int) -> Result:
    """The desired file flipped between two instant-boot engines as fast as one writer can.

    Figures: writes, the reconciler's CPU seconds over the burst, and how many engines it
    started and killed for it (before coalescing: 2,861 writes in 10 s cost 7.9 CPU-s;
    1,662 flips in 5 s caused 20 starts and 22 kills).
    """
    res = Result("flap burst")
    engines = {VLLM: vllm_entry(free_port(), 0.0), OLLAMA: ollama_entry(free_port(), 0.0)}
    with rig(res, engines) as stack:
        proc = psutil.Process(stack.start().pid)
        stack.wait_phase("IDLE")
        census = Census(namespace_of(stack.state_dir))
        config = load_file(stack.config, "--config")
        cpu0, t0, writes, last = sum(proc.cpu_times()[:2]), time.monotonic(), 0, VLLM
        while time.monotonic() - t0 < seconds:
            last = VLLM if writes % 2 else OLLAMA
            generation = desired_file.write(config, last, "chaos").generation or 0
            writes += 1
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        try:
            wait_for("the last model served", lambda: converged(stack, census, last, generation), BURST_SETTLE_S)
        except TimeoutError as exc:
            res.problems.append(str(exc))
        log = stack.log_file.read_text(errors="replace")
        starts, kills = log.count("] started "), log.count("changed: kill (SIGKILL)")
        res.figures.update({"seconds": seconds, "writes": writes, "reconciler_cpu_s": round(cpu, 2),
                            "engine_starts": starts, "kills": kills})
        res.check(cpu < seconds * BURST_CPU_SHARE, f"the burst cost {cpu:.2f} CPU-s in {seconds} s")
        res.check(starts <= seconds + 2, f"{starts} engine starts for a {seconds} s burst")
    return res


# ----------------------------------------------------------------------------- 2. SIGKILL


class StateReader(Watcher):
    """Parses observed_state.json continuously; any torn or missing file after the first is counted."""

    def __init__(self, path: Path) -> None:
        super().__init__("chaos-state-reader")
        self.path = path
        self.reads = 0
        self.failures: list[str] = []

    def run(self) -> None:
        seen = False
        while not self._stop_event.is_set():
            try:
                data = json.loads(self.path.read_bytes())
                if not isinstance(data, dict) or "phase" not in data:
                    raise ValueError("not an observed-state document")
                seen = True
                self.reads += 1
            except FileNotFoundError:
                if seen:
                    self.failures.append("observed_state.json missing")
            except (OSError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop_event.wait(READ_SPIN_S)


def sigkill(points: int, seed: int = 2, identity: str = "auto") -> Result:
    """SIGKILL the reconciler at random points (mid-kill, mid-spawn, mid-boot, mid-write)."""
    res = Result(f"sigkill ({identity})" if identity != "auto" else "sigkill")
    rng = random.Random(seed)
    engines = {VLLM: vllm_entry(free_port(), SIGKILL_BOOT_S),
               OLLAMA: ollama_entry(free_port(), SIGKILL_BOOT_S)}
    converge: list[float] = []
    healthy_restarts: list[str] = []
    kinds: dict[str, int] = {}
    with rig(res, engines, identity=identity) as stack:
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        current: str | None = None
        generation = toggle(stack, None)
        with StateReader(stack.state_dir / "observed_state.json") as reader, Sampler(census) as sampler:
            for _ in range(points):
                kind = rng.choices(["switch", "steady", "stop"], weights=[2, 2, 1])[0]
                healthy: tuple[int, str] | None = None
                if kind == "steady" and current is None:
                    kind = "switch"
                if kind == "steady":
                    try:
                        doc = wait_for("READY before a steady kill",
                                       partial(converged, stack, census, current, generation),
                                       CONVERGE_LIMIT_S)
                    except TimeoutError as exc:
                        res.problems.append(str(exc))
                        break
                    healthy = (doc["engine"]["pid"], doc["engine"]["instance"])
                else:
                    target = None if kind == "stop" else rng.choice([m for m in (VLLM, OLLAMA) if m != current])
                    current, generation = target, toggle(stack, target)
                kinds[kind] = kinds.get(kind, 0) + 1
                time.sleep(rng.uniform(0, KILL_WINDOW_S))  # the random point where the kill lands
                assert stack.proc is not None
                stack.proc.kill()
                stack.proc.wait(timeout=PROCESS_LIMIT_S)
                t0 = time.monotonic()
                new = stack.start()
                try:
                    doc = wait_for("convergence after a SIGKILL restart",
                                   partial(converged, stack, census, current, generation, new.pid),
                                   CONVERGE_LIMIT_S)
                except TimeoutError as exc:
                    res.problems.append(str(exc))
                    break
                converge.append(time.monotonic() - t0)
                if healthy is not None and (doc["engine"]["pid"], doc["engine"]["instance"]) != healthy:
                    healthy_restarts.append(f"{healthy} -> {doc['engine']['pid']}")
        res.figures.update({
            "kills": len(converge), "kinds": kinds,
            "duplicate_moments": len(sampler.duplicates), "two_engines_alive_moments": len(sampler.overlaps),
            "healthy_engine_restarts": len(healthy_restarts),
            "state_reads": reader.reads, "state_parse_failures": len(reader.failures),
            "converge_median_s": round(sorted(converge)[len(converge) // 2], 3) if converge else None,
            "converge_max_s": round(max(converge), 3) if converge else None,
        })
        res.check(not sampler.duplicates, f"duplicates: {sampler.duplicates[:3]}")
        res.check(not sampler.overlaps, f"two engines at once: {sampler.overlaps[:3]}")
        res.check(not healthy_restarts, f"healthy wanted engine restarted: {healthy_restarts[:3]}")
        res.check(not reader.failures, f"observed state failed to parse: {reader.failures[:3]}")
    return res


# ----------------------------------------------------------------------------- 5. bad input


@dataclass
class BadCase:
    name: str
    target: str  # "desired" | "catalog"
    apply: Callable[[Path], None]


def _writer(data: bytes) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        write_atomic(path, data)
    return apply


def hand_written_cases(root: Path, good_catalog: str) -> list[BadCase]:
    """The named ones from the issue; each is bad for the file it targets."""
    secret = root / "secret.txt"
    secret.write_text("root:$6$secrethash:19000:0:99999:7:::\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    deep = "model: " + "[" * 200 + "]" * 200 + "\n"
    deep_map = "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v: 1\n"
    huge = b"model: gpt-oss\nrequested_by: '" + b"x" * (3 << 20) + b"'\n"
    big_string = b"'" + b"y" * (600 << 10) + b"'\n"  # under the 1 MiB cap, still absurd

    def directory(path: Path) -> None:
        path.unlink()
        path.mkdir()

    def symlink_to(target: Path) -> Callable[[Path], None]:
        def apply(path: Path) -> None:
            tmp = path.with_name(f".{path.name}.lnk")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, path)
        return apply

    def vanish(path: Path) -> None:
        path.unlink()

    def fifo(path: Path) -> None:
        tmp = path.with_name(f".{path.name}.fifo")
        tmp.unlink(missing_ok=True)
        os.mkfifo(tmp)
        os.replace(tmp, path)

    common: list[tuple[str, Callable[[Path], None]]] = [
        ("binary", _writer(bytes(range(256)) * 4)),
        ("nul bytes", _writer(b"model: gpt\x00oss\n")),
        ("latin-1", _writer("model: caf\xe9\n".encode("latin-1"))),
        ("huge 3 MiB", _writer(huge)),
        ("big string 600 KiB", _writer(big_string)),
        ("deep nesting (flow)", _writer(deep.encode())),
        ("deep nesting (block)", _writer(deep_map.encode())),
        ("anchor bomb", _writer(bomb.encode())),
        ("yaml syntax", _writer(b"model: [unclosed\n")),
        ("tabs", _writer(b"model:\t\tgpt-oss\n\t- x\n")),
        ("python tag", _writer(b"model: !!python/object/apply:os.system ['true']\n")),
        ("bad timestamp", _writer(b"model: gpt-oss\nrequested_at: !!timestamp 2001-02-30\n")),
        ("two documents", _writer(b"model: gpt-oss\n---\nmodel: gemma2\n")),
        ("list", _writer(b"- gpt-oss\n")),
        ("scalar", _writer(b"gpt-oss\n")),
        ("symlink to secret", symlink_to(secret)),
        ("symlink loop", _loop_link()),
        ("dangling symlink", symlink_to(root / "nowhere.yaml")),
        ("symlink to /dev/zero", symlink_to(Path("/dev/zero"))),
        ("fifo", fifo),
        ("directory", directory),
    ]
    # A missing desired file means IDLE by contract, so for it "dangling" is no error, and a
    # directory is swapped in atomically (through a symlink): unlink-then-mkdir would pass
    # through "missing" and rightly stop the engine.
    cases = [BadCase(f"desired: {n}", "desired", a) for n, a in common
             if n not in ("dangling symlink", "directory")]
    (root / "a-directory").mkdir()
    cases.append(BadCase("desired: symlink to a directory", "desired", symlink_to(root / "a-directory")))
    cases += [BadCase(f"catalog: {n}", "catalog", a) for n, a in common]
    desired_only = [
        ("wrong type model", b"model: 42\n"), ("model list", b"model: [gpt-oss]\n"),
        ("unknown model", b"model: llama-9000\n"), ("command instead of model", b"model: rm -rf /\n"),
        ("path as model", b"model: /usr/bin/python3\n"), ("command key", b"model: gpt-oss\ncommand: [sh]\n"),
        ("negative generation", b"model: gpt-oss\ngeneration: -1\n"),
        ("string generation", b"model: gpt-oss\ngeneration: seven\n"),
        ("float generation", b"model: gpt-oss\ngeneration: 1.5\n"),
        ("bool model", b"model: true\n"), ("model map", b"model: {name: gpt-oss}\n"),
        ("unicode model", "model: gpt\u2011oss\n".encode()), ("model with newline", b"model: \"gpt\\noss\"\n"),
        ("long requested_by", b"model: gpt-oss\nrequested_by: '" + b"z" * 5000 + b"'\n"),
    ]
    cases += [BadCase(f"desired: {n}", "desired", _writer(d)) for n, d in desired_only]
    good = yaml.safe_load(good_catalog)
    name = next(iter(good["engines"]))

    def variant(mutate: Callable[[dict[str, Any]], None]) -> bytes:
        doc = json.loads(json.dumps(good))
        mutate(doc)
        return yaml.safe_dump(doc).encode()

    catalog_only: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("port string", lambda d: d["engines"][name].__setitem__("port", "abc")),
        ("port 0", lambda d: d["engines"][name].__setitem__("port", 0)),
        ("port 70000", lambda d: d["engines"][name].__setitem__("port", 70000)),
        ("shell string command", lambda d: d["engines"][name].__setitem__("command", "rm -rf /")),
        ("empty command", lambda d: d["engines"][name].__setitem__("command", [])),
        ("no engines", lambda d: d.__setitem__("engines", {})),
        ("engines list", lambda d: d.__setitem__("engines", [1, 2])),
        ("unknown key", lambda d: d.__setitem__("enignes", {})),
        ("bad kind", lambda d: d["engines"][name].__setitem__("kind", "tgi")),
        ("negative resync", lambda d: d.__setitem__("resync_interval_s", -1)),
        ("substring match", lambda d: d["engines"][name].__setitem__("match", ["py"])),
        ("short stray title", lambda d: d["engines"][name].__setitem__("strays", {"titles": ["py"]})),
        ("bad engine name", lambda d: d["engines"].__setitem__("../etc", d["engines"][name])),
        ("state_dir of unknown user", lambda d: d.__setitem__("state_dir", "~nosuchuser_chaos/run")),
        ("log_file of unknown user", lambda d: d.__setitem__("log_file", "~nosuchuser_chaos/a.log")),
        ("bad listen", lambda d: d.__setitem__("gate", {"listen": "0.0.0.0"})),
        ("short token", lambda d: d.__setitem__("gate", {"token": "x"})),
        ("ready url no slash", lambda d: d["engines"][name].__setitem__("ready", {"url": "health"})),
        ("zero backoff", lambda d: d["engines"][name].__setitem__("restart_backoff", {"initial_s": 0})),
    ]
    cases += [BadCase(f"catalog: {n}", "catalog", _writer(variant(m))) for n, m in catalog_only]
    cases.append(BadCase("catalog: vanished", "catalog", vanish))
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        def unreadable(path: Path) -> None:
            tmp = path.with_name(f".{path.name}.ro")
            tmp.write_bytes(path.read_bytes())
            tmp.chmod(0)
            os.replace(tmp, path)
        cases += [BadCase(f"{t}: unreadable", t, unreadable) for t in ("desired", "catalog")]
    return cases


def _loop_link() -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        a, b = path.with_name(".loop-a"), path.with_name(".loop-b")
        for link, to in ((a, b), (b, a)):
            link.unlink(missing_ok=True)
            link.symlink_to(to.name)
        tmp = path.with_name(f".{path.name}.lnk")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(a.name)
        os.replace(tmp, path)
    return apply


def generated_cases(count: int, good_catalog: str, seed: int) -> tuple[list[BadCase], list[str]]:
    """Property-based: random YAML values and mutated catalogs, kept only when they are invalid.

    Each candidate is first run through the product's own parsers in this process: one
    raising anything but InvalidFile is a crash (a defect, returned as a problem).
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    good = yaml.safe_load(good_catalog)
    catalog = from_document(good, "chaos", Path("/tmp"))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=40), st.sampled_from(["gpt-oss", "gemma2", "", "~", "null"]))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                          | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=12)
    keys = st.sampled_from(["model", "generation", "requested_by", "requested_at", "command", "x"])
    desired_docs = st.one_of(
        st.dictionaries(keys, values, min_size=1, max_size=4).map(lambda d: yaml.safe_dump(d).encode()),
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
    )
    paths = st.sampled_from([
        ("engines", "*", "port"), ("engines", "*", "command"), ("engines", "*", "kind"),
        ("engines", "*", "ready"), ("engines", "*", "env"), ("engines", "*", "strays"),
        ("engines", "*", "liveness"), ("engines", "*", "restart_backoff"), ("gate",),
        ("resync_interval_s",), ("state_dir",), ("engines",), ("engines", "*", "host"),
        ("engines", "*", "boot_timeout_s"), ("engines", "*", "served_name")])

    def mutate(path: tuple[str, ...], value: object) -> bytes:
        doc = json.loads(json.dumps(good))
        node = doc
        for key in path[:-1]:
            node = node[next(iter(node))] if key == "*" else node[key]
        node[path[-1] if path[-1] != "*" else next(iter(node))] = value
        return yaml.safe_dump(doc).encode()

    catalog_docs = st.builds(mutate, paths, values)
    found: list[BadCase] = []
    problems: list[str] = []
    seen: set[bytes] = set()
    limit = [count]

    def consider(target: str, data: bytes) -> None:
        if data in seen or len(found) >= limit[0]:
            return
        seen.add(data)
        try:
            doc = yamlfile.parse(data, target)
            if target == "desired":
                desired_mod.parse(doc, target, catalog)
            else:
                from_document(doc, target, Path("/tmp"))
        except InvalidFile:
            found.append(BadCase(f"{target}: generated #{len(found)}", target, _writer(data)))
        except Exception as exc:  # the product let a non-InvalidFile escape: a crash
            problems.append(f"{target} parser crashed on {data[:120]!r}: {type(exc).__name__}: {exc}")
            found.append(BadCase(f"{target}: generated crash #{len(found)}", target, _writer(data)))

    common = settings(max_examples=count * 3, database=None, deadline=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))

    @hseed(seed)
    @common
    @given(desired_docs)
    def gen_desired(data: bytes) -> None:
        consider("desired", data)

    @hseed(seed + 1)
    @common
    @given(catalog_docs)
    def gen_catalog(data: bytes) -> None:
        consider("catalog", data)

    limit[0] = count // 2
    gen_desired()
    limit[0] = count
    gen_catalog()
    return found, problems


def badinput(total: int, seed: int = 5) -> Result:
    """Malformed desired and catalog files under a running reconciler with a READY engine."""
    res = Result("badinput")
    engines = {VLLM: vllm_entry(free_port(), 0.1), OLLAMA: ollama_entry(free_port(), 0.1)}
    with rig(res, engines, resync_s=0.2) as stack:
        good_catalog = catalog_text(stack)
        write_catalog_atomic(stack)
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        generation = toggle(stack, VLLM)
        ready = wait_for("READY", lambda: converged(stack, census, VLLM, generation), CONVERGE_LIMIT_S)
        pid = ready["engine"]["pid"]
        good_desired = stack.desired.read_bytes()
        hand = hand_written_cases(stack.root, good_catalog)
        generated, crashes = generated_cases(max(MIN_GENERATED, total - len(hand)), good_catalog, seed)
        res.problems += crashes
        cases = hand + generated
        reported_in_log = 0
        restarted = 0
        report_times: list[float] = []
        for case in cases:
            path = stack.desired if case.target == "desired" else stack.config
            condition = "DesiredValid" if case.target == "desired" else "CatalogValid"
            log_size = stack.log_file.stat().st_size
            t0 = time.monotonic()
            case.apply(path)

            def bad(cond: str = condition) -> dict[str, Any] | None:
                doc = stack.status()
                c = {x["type"]: x for x in doc.get("conditions", [])}.get(cond)
                return doc if c and c["status"] == "False" and doc.get("last_error") else None
            try:
                doc = wait_for(f"{case.name} reported", bad, REPORT_LIMIT_S)
                report_times.append(time.monotonic() - t0)
            except TimeoutError as exc:
                res.problems.append(f"{case.name}: {exc}")
                doc = stack.status()
            message = (doc.get("last_error") or {}).get("message", "")
            res.check(str(path.name) in message, f"{case.name}: error does not name the file: {message[:200]}")
            res.check(len(message) <= 2000, f"{case.name}: error message is {len(message)} chars long")
            res.check("secrethash" not in json.dumps(doc), f"{case.name}: a secret file's content "
                      "was copied into the observed state")
            kept = doc.get("phase") == "READY" and (doc.get("engine") or {}).get("pid") == pid
            res.check(kept, f"{case.name}: last good state not kept: {doc.get('phase')} {doc.get('engine')}")
            res.check(stack.proc is not None and stack.proc.poll() is None, f"{case.name}: reconciler died")
            with stack.log_file.open("rb") as fh:
                fh.seek(log_size)
                new_log = fh.read().decode(errors="replace")
            if "] error " in new_log and path.name in new_log:
                reported_in_log += 1
            else:
                res.problems.append(f"{case.name}: no error line naming the file in the activity log")
            if "pass failed" in new_log:
                res.problems.append(f"{case.name}: a pass crashed: "
                                    f"{new_log[new_log.index('pass failed'):][:200]}")
            # restore and wait for the condition to clear
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            write_atomic(path, good_desired if case.target == "desired" else good_catalog.encode())

            def good(cond: str = condition) -> bool:
                c = {x["type"]: x for x in stack.status().get("conditions", [])}.get(cond)
                return bool(c and c["status"] == "True")
            try:
                wait_for(f"{case.name} cleared", good, REPORT_LIMIT_S)
            except TimeoutError as exc:
                res.problems.append(str(exc))
            if stack.proc is None or stack.proc.poll() is not None:
                break
            if not kept:  # judge the next case on its own, not on this one's damage
                again = wait_for("READY again", lambda: converged(stack, census, VLLM, generation), CONVERGE_LIMIT_S)
                pid = again["engine"]["pid"]
                restarted += 1
        final = stack.status()
        res.figures.update({
            "cases": len(cases), "hand_written": len(hand), "generated": len(generated),
            "desired_cases": sum(c.target == "desired" for c in cases),
            "catalog_cases": sum(c.target == "catalog" for c in cases),
            "reconciler_crashes": int(stack.proc is None or stack.proc.poll() is not None),
            "reported_in_log": reported_in_log,
            "engine_pid_unchanged": (final.get("engine") or {}).get("pid") == pid and not restarted,
            "report_median_s": round(sorted(report_times)[len(report_times) // 2], 3) if report_times else None,
            "report_max_s": round(max(report_times), 3) if report_times else None,
        })
    return res


# ----------------------------------------------------------------------------- 3. engine faults


class Timeline(Watcher):
    """Every 10 ms: which instances are alive (by cookie) and what the observed state says."""

    def __init__(self, stack: Stack) -> None:
        super().__init__("chaos-timeline")
        self.stack = stack
        self.census = Census(namespace_of(stack.state_dir))
        self.starts: dict[str, float] = {}  # instance -> first seen (monotonic)
        self.deaths: dict[str, float] = {}  # instance -> first seen without a live process
        self.phases: list[tuple[float, str]] = []  # (monotonic, phase) at each change

    def run(self) -> None:
        alive: set[str] = set()
        last = None
        while not self._stop_event.is_set():
            snap = self.census.sample()
            now = time.monotonic()
            seen = {i for inst in snap.values() for i in inst}
            for instance in seen - alive:
                self.starts.setdefault(instance, now)
            for instance in alive - seen:
                self.deaths.setdefault(instance, now)
            alive = seen
            phase = self.stack.status().get("phase")
            if phase and phase != last:
                self.phases.append((now, phase))
                last = phase
            self._stop_event.wait(SAMPLE_S)

    def first(self, phase: str, after: float) -> float | None:
        return next((t for t, p in self.phases if p == phase and t >= after), None)


# The demo's --fail *-ready modes fail this long after READY (reconciler.engines.demo.options.READY_AFTER_S).
DEMO_READY_AFTER_S = 1.0


def engine_fault(mode: str, restarts: int) -> Result:
    """A demo engine that fails (--fail MODE): detection time and the backoff sequence."""
    res = Result(f"fault:{mode}")
    entry = vllm_entry(free_port(), 0.6, "--fail", mode)
    entry["ready"] = {"period_s": 0.1, "timeout_s": 0.3}
    entry["liveness"] = {"period_s": 0.3, "timeout_s": 0.3, "failure_threshold": 3}
    with rig(res, {VLLM: entry}, resync_s=1.0) as stack:
        stack.start()
        with Timeline(stack) as timeline:
            toggle(stack, VLLM)
            try:
                wait_for(f"{restarts} restarts", lambda: len(timeline.deaths) >= restarts
                         and len(timeline.starts) > restarts, CONVERGE_LIMIT_S)
            except TimeoutError as exc:
                res.problems.append(str(exc))
        order = sorted(timeline.starts, key=timeline.starts.__getitem__)
        detection: list[float] = []
        gaps: list[float] = []
        for k, instance in enumerate(order):
            died = timeline.deaths.get(instance)
            if died is None:
                continue
            if mode == "hang-ready":
                ready = timeline.first("READY", timeline.starts[instance])
                failed = timeline.first("FAILED", ready) if ready is not None else None
                if ready is not None and failed is not None:
                    detection.append(failed - ready - DEMO_READY_AFTER_S)  # from the hang's onset
            else:
                failed = timeline.first("FAILED", died - SAMPLE_S)
                if failed is not None:
                    detection.append(max(0.0, failed - died))
            if k + 1 < len(order):
                gaps.append(round(timeline.starts[order[k + 1]] - died, 2))
        doubling = mode in ("crash-loading", "exit-at-once")  # READY resets the count
        expected = [0.5, 1, 2, 2, 2, 2][: len(gaps)] if doubling else [0.5] * len(gaps)
        res.figures.update({
            "starts": len(order), "deaths": len(timeline.deaths),
            "detection_s": [round(x, 3) for x in detection],
            "death_to_next_start_s": gaps, "expected_backoff_s": expected,
        })
        res.check(bool(detection), f"{mode}: failure never detected")
        limit = 3.0 if mode == "hang-ready" else 1.0  # 3 probes x (0.3 s period + 0.3 s timeout)
        res.check(all(x < limit for x in detection), f"{mode}: slow detection {detection}")
        for got, want in zip(gaps, expected, strict=False):
            res.check(want * 0.9 <= got <= want + 1.5, f"{mode}: backoff {gaps}, expected {expected}")
    return res


# With the default health-check settings (docs/TIMEOUTS.md): the phase leaves READY by the
# first failed check (period 2 s + timeout 2 s), the hang is declared by the third (10 s).
HANG_LEAVES_READY_LIMIT_S = 4.0 + 0.5
HANG_DECLARED_LIMIT_S = 10.0 + 0.5  # plus the passes' own time on a busy 2-core machine


def hang_with_defaults() -> Result:
    """An engine that hangs after READY, with the catalog's default liveness settings."""
    res = Result("fault:hang-ready (default liveness)")
    entry = vllm_entry(free_port(), 0.6, "--fail", "hang-ready")
    del entry["ready"], entry["liveness"]
    with rig(res, {VLLM: entry}, resync_s=DEFAULT_RESYNC_INTERVAL_S) as stack:
        stack.start()
        with Timeline(stack) as timeline:
            toggle(stack, VLLM)
            try:
                wait_for("FAILED after READY", lambda: (r := timeline.first("READY", 0)) is not None
                         and timeline.first("FAILED", r) is not None, CONVERGE_LIMIT_S)
            except TimeoutError as exc:
                res.problems.append(str(exc))
        ready = timeline.first("READY", 0)
        if ready is None:
            return res
        hang = ready + DEMO_READY_AFTER_S
        left, failed = timeline.first("DEGRADED", ready), timeline.first("FAILED", ready)
        phases = [p for t, p in timeline.phases if t >= ready]
        res.figures.update({
            "phases_after_ready": phases,
            "left_ready_s": None if left is None else round(left - hang, 2),
            "declared_s": None if failed is None else round(failed - hang, 2),
        })
        res.check(left is not None and left - hang <= HANG_LEAVES_READY_LIMIT_S,
                  f"phase left READY late or never: {res.figures}")
        res.check(failed is not None and failed - hang <= HANG_DECLARED_LIMIT_S,
                  f"hang declared late or never: {res.figures}")
        res.check(phases[:3] == ["READY", "DEGRADED", "FAILED"], f"phases {phases}")
    return res


def faults(restarts: int) -> list[Result]:
    return [*(engine_fault(m, restarts) for m in ("crash-loading", "crash-ready", "hang-ready", "exit-at-once")),
            hang_with_defaults()]


def _get(url: str) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:  # loopback only
            return resp.status, resp.read(), time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - t0


class Heartbeats(Watcher):
    """When the observed state's heartbeat changed: a long gap is a stalled loop."""

    def __init__(self, stack: Stack) -> None:
        super().__init__("chaos-heartbeats")
        self.stack = stack
        self.changes: list[float] = []

    def run(self) -> None:
        last = None
        while not self._stop_event.is_set():
            beat = (self.stack.status().get("reconciler") or {}).get("heartbeat")
            if beat != last:
                self.changes.append(time.monotonic())
                last = beat
            self._stop_event.wait(SAMPLE_S)
        self.changes.append(time.monotonic())

    def max_gap(self) -> float:
        return max((b - a for a, b in itertools.pairwise(self.changes)), default=0.0)


def output_fault(mode: str, flood_s: int) -> Result:
    """An engine with hostile output: never blocked by it, never able to forge another's line."""
    res = Result(f"output:{mode}")
    port = free_port()
    args = ("--seconds", str(flood_s)) if mode == "flood" else ()
    with rig(res, {"nasty": nasty_entry(port, mode, *args)}, resync_s=1.0) as stack:
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        generation = toggle(stack, "nasty")
        ready = wait_for("nasty READY", lambda: converged(stack, census, "nasty", generation), CONVERGE_LIMIT_S)
        pid = ready["engine"]["pid"]
        worst = 0.0
        deadline = time.monotonic() + CONVERGE_LIMIT_S
        health: dict[str, Any] = {}
        requests = 0
        with Heartbeats(stack) as beats:
            while time.monotonic() < deadline and requests < 10_000:
                code, body, spent = _get(f"http://127.0.0.1:{port}/health")
                requests += 1
                worst = max(worst, spent)
                health = json.loads(body) if code == 200 else {}
                if health.get("done"):
                    break
                time.sleep(POLL_S)  # the probe's own pace, not a wait on a condition
            t_done = time.monotonic()

            def logged() -> bool:
                text = stack.log_file.read_text(errors="replace")
                marker = {"flood": f"flood line {int(health.get('lines', 2)) - 2}",
                          "bigline": "after-bigline", "ansi": "ansi-done", "close-stdout": "nasty engine up"}[mode]
                return marker in text
            try:
                wait_for("the engine's last line in the activity log", logged, CONVERGE_LIMIT_S)
                caught_up = True
            except TimeoutError:
                caught_up = False
        lag = round(time.monotonic() - t_done, 2)
        doc = stack.status()
        text = stack.log_file.read_bytes()
        lines = text.decode("utf-8", errors="strict").splitlines()
        bad_format = [x for x in lines if not LOG_LINE.match(x)]
        forged = [x for x in lines if "FORGED-LINE" in x and not (
            (m := LOG_LINE.match(x)) and m.group(1) == "nasty" and m.group(2) == str(pid))]
        longest = max((len(x) for x in lines), default=0)
        res.figures.update({
            "engine_lines_written": health.get("lines"), "engine_bytes_written": health.get("bytes"),
            "engine_longest_write_ms": health.get("max_write_ms"),
            "health_worst_ms": round(worst * 1000, 1), "log_caught_up": caught_up,
            "log_lag_after_output_s": lag,
            "state_heartbeat_max_gap_s": round(beats.max_gap(), 2),
            "activity_log_lines": len(lines), "longest_log_line": longest,
            "misformatted_lines": len(bad_format), "forged_lines": len(forged),
            "phase_after": doc.get("phase"), "engine_pid_unchanged": (doc.get("engine") or {}).get("pid") == pid,
        })
        if mode == "flood" and health.get("lines"):
            res.figures["engine_lines_per_s"] = round(int(health["lines"]) / flood_s)
        res.check(caught_up, f"{mode}: the activity log never got the engine's last line")
        res.check(not bad_format, f"{mode}: misformatted log lines: {[x[:120] for x in bad_format[:3]]}")
        res.check(not forged, f"{mode}: forged lines: {forged[:3]}")
        res.check(b"\x1b" not in text, f"{mode}: raw ESC in the activity log")
        res.check(doc.get("phase") == "READY" and res.figures["engine_pid_unchanged"],
                  f"{mode}: engine not kept READY: {doc.get('phase')}")
        res.check(float(health.get("max_write_ms") or 0) < 1000, f"{mode}: engine blocked on its output")
        res.check(res.figures["state_heartbeat_max_gap_s"] < STALL_LIMIT_S,
                  f"{mode}: the loop stalled for {res.figures['state_heartbeat_max_gap_s']} s")
    return res


def output(flood_s: int) -> list[Result]:
    return [output_fault(m, flood_s) for m in ("ansi", "bigline", "close-stdout", "flood")]


# ----------------------------------------------------------------------------- 8. security


def _post(url: str, body: dict[str, Any], token: str | None) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:  # loopback only
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _start_gate(stack: Stack, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    gate = subprocess.Popen([PY, "-m", "reconciler.gate", "--config", str(stack.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env}, cwd=stack.root)
    assert gate.stdout is not None
    line = gate.stdout.readline()  # "ailayer gate listening on URL", printed once bound
    if "listening on" not in line:
        gate.kill()
        gate.wait(PROCESS_LIMIT_S)
        raise RuntimeError(f"gate did not start: {line!r}")
    return gate, line.rsplit(" ", 1)[1].strip()


def security() -> Result:
    res = Result("security")
    token = uuid.uuid4().hex
    engines = {VLLM: vllm_entry(free_port(), 0.1)}
    with rig(res, engines, resync_s=0.5) as stack:
        # A symlink planted where the log file goes, pointing at a file of "another user".
        victim = stack.root / "victim.txt"
        victim.write_text("precious\n")
        stack.log_file.symlink_to(victim)
        stack.top["gate"] = {"listen": f"127.0.0.1:{free_port()}", "token_env": "CHAOS_GATE_TOKEN"}
        stack.write_catalog()
        stack.toggle(None)
        before = stack.desired.read_bytes()
        old_umask = os.umask(0)  # the harshest umask a service manager could hand us
        try:
            stack.start()
        finally:
            os.umask(old_umask)
        wait_for("reconciler running", lambda: stack.status().get("phase") == "IDLE", CONVERGE_LIMIT_S)
        gate, url = _start_gate(stack, {"CHAOS_GATE_TOKEN": token})
        try:
            codes = {
                "no token": _post(f"{url}/toggle", {"model": VLLM}, None),
                "wrong token": _post(f"{url}/toggle", {"model": VLLM}, "nope" + token),
                "command as model": _post(f"{url}/toggle", {"model": "rm -rf /"}, token),
                "path as model": _post(f"{url}/toggle", {"model": "/usr/bin/python3"}, token),
            }
            listening = [c.laddr for c in psutil.Process(gate.pid).net_connections("inet")
                         if c.status == psutil.CONN_LISTEN]
        finally:
            gate.terminate()
            gate.wait(PROCESS_LIMIT_S)
        res.figures["toggle_codes"] = codes
        res.check(codes["no token"] == 401 and codes["wrong token"] == 401, f"auth: {codes}")
        res.check(codes["command as model"] in (400, 422) and codes["path as model"] in (400, 422),
                  f"command/path as model: {codes}")
        res.check(stack.desired.read_bytes() == before, "a refused toggle changed desired_state.yaml")
        res.figures["gate_listens_on"] = sorted({a.ip for a in listening})
        res.check(all(a.ip in ("127.0.0.1", "::1") for a in listening), f"gate listens beyond loopback: {listening}")
        # schema rejects a desired file naming a command or a path
        for name, body in (("command", b"model: gpt-oss\ncommand: [sh, -c, 'touch /tmp/pwned']\n"),
                           ("path", b"model: /bin/sh\n")):
            write_atomic(stack.desired, body)
            try:
                wait_for(f"desired with a {name} rejected", lambda: (stack.status().get("last_error") or {})
                         .get("reason") == "InvalidDesiredState", REPORT_LIMIT_S)
            except TimeoutError as exc:
                res.problems.append(str(exc))
        gen = toggle(stack, VLLM)  # an engine's output folder and file exist too
        census = Census(namespace_of(stack.state_dir))
        wait_for("READY", lambda: converged(stack, census, VLLM, gen), CONVERGE_LIMIT_S)
        world = []
        for path in [stack.state_dir, *stack.state_dir.rglob("*")]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & stat.S_IWOTH:
                world.append(f"{path.relative_to(stack.root)} {stat.filemode(mode)}")
        res.figures["world_writable_under_umask_000"] = world
        res.check(not world, f"world-writable under umask 000: {world}")
        res.check(victim.read_text() == "precious\n", "the log was written through a planted symlink")
        res.figures["planted_log_symlink_followed"] = victim.read_text() != "precious\n"
    return res


# ----------------------------------------------------------------------------- 7. files


def _log_has(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text(errors="replace")
    except OSError:
        return False


def files() -> Result:
    """State dir removed, log file made unwritable, log rotated, all mid-run: the loop goes on and says so."""
    res = Result("files")
    engines = {VLLM: vllm_entry(free_port(), 0.2), OLLAMA: ollama_entry(free_port(), 0.2)}
    with rig(res, engines, resync_s=0.5) as stack:
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        gen = toggle(stack, VLLM)
        ready = wait_for("READY", lambda: converged(stack, census, VLLM, gen), CONVERGE_LIMIT_S)
        pid = ready["engine"]["pid"]
        state = stack.state_dir / "observed_state.json"

        # (a) the whole state dir removed under the running loop
        beat = (ready.get("reconciler") or {}).get("heartbeat")
        t0 = time.monotonic()
        shutil.rmtree(stack.state_dir)
        try:
            doc = wait_for("observed_state.json back", lambda: (d := stack.status()) and d.get("phase") == "READY"
                           and (d.get("reconciler") or {}).get("heartbeat") != beat and d, CONVERGE_LIMIT_S)
            res.figures["state_dir_recreated_after_s"] = round(time.monotonic() - t0, 2)
            json.loads(state.read_text())  # parses (status() already did; this is the figure's honesty)
            alive = census.sample()
            res.figures["engine_pid_unchanged"] = (doc.get("engine") or {}).get("pid") == pid
            res.check(res.figures["engine_pid_unchanged"] and list(alive) == [VLLM] and len(alive[VLLM]) == 1,
                      f"state dir removed: engine changed: {doc.get('engine')} {alive}")
        except TimeoutError as exc:
            res.problems.append(str(exc))
        once = stack.cli("reconcile", "--once", timeout=PROCESS_LIMIT_S)
        res.figures["second_reconciler_refused_after_state_dir_removed"] = once.returncode != 0
        res.check(once.returncode != 0, "after the state dir was removed a second reconciler ran beside the first "
                  f"(reconcile --once exited {once.returncode})")

        # (c) logrotate: the log renamed away; new lines must appear at the original path
        rotated = stack.root / "activity.log.1"
        os.rename(stack.log_file, rotated)
        t0 = time.monotonic()
        gen = toggle(stack, OLLAMA)
        try:
            wait_for("a fresh log file after rotation", lambda: _log_has(stack.log_file, OLLAMA), CONVERGE_LIMIT_S)
            res.figures["fresh_log_after_rotation_s"] = round(time.monotonic() - t0, 2)
            wait_for("READY after rotation", lambda: converged(stack, census, OLLAMA, gen), CONVERGE_LIMIT_S)
        except TimeoutError as exc:
            res.problems.append(str(exc))

        # (b) the log path made unwritable (root ignores permissions: a directory takes its place)
        out_before = len(stack.output())
        os.rename(stack.log_file, stack.root / "activity.log.2")
        stack.log_file.mkdir()
        t0 = time.monotonic()
        gen = toggle(stack, VLLM)
        try:
            wait_for("converged with the log unwritable", lambda: converged(stack, census, VLLM, gen),
                     CONVERGE_LIMIT_S)
            res.figures["toggle_converged_with_log_unwritable_s"] = round(time.monotonic() - t0, 2)
        except TimeoutError as exc:
            res.problems.append(str(exc))
        try:
            said = wait_for("the terminal says the log file failed", lambda: [
                x for x in stack.output()[out_before:].splitlines()
                if str(stack.log_file) in x and ("cannot" in x or "failed" in x or "lost" in x)], REPORT_LIMIT_S)
            res.figures["terminal_says"] = said[0].split("] ", 3)[-1][:200]
        except TimeoutError as exc:
            res.problems.append(str(exc))
        # ... and back: the directory goes, the original path is written again
        stack.log_file.rmdir()
        t0 = time.monotonic()
        gen = toggle(stack, OLLAMA)  # a READY engine's probes keep lines coming
        try:
            wait_for("the log written at its own path again", lambda: _log_has(stack.log_file, "] ["),
                     CONVERGE_LIMIT_S)
            res.figures["log_back_at_its_path_after_s"] = round(time.monotonic() - t0, 2)
            back = [x for x in stack.output()[out_before:].splitlines() if "writable again" in x]
            res.figures["terminal_on_recovery"] = back[-1].split("] ", 3)[-1][:200] if back else None
            res.check(bool(back), "the terminal never said the log file was writable again")
            fallback = stack.state_dir / "ai_layer_activity.log"
            res.figures["lines_kept_in_fallback"] = (len(fallback.read_text(errors="replace").splitlines())
                                                     if fallback.exists() else 0)
        except TimeoutError as exc:
            res.problems.append(f"{exc}; terminal: {stack.output()[out_before:][-600:]!r}")
    return res


# A tmpfs this small fills in a moment; the scenario needs root (mount) and says so when skipped.
DISK_BYTES = 256 * 1024


def diskfull() -> Result:
    """The log file's disk fills mid-run: the loop keeps converging and says how many lines it lost."""
    res = Result("diskfull")
    with tempfile.TemporaryDirectory(prefix="chaos-disk-") as mnt:
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs", mnt],
            capture_output=True, timeout=PROCESS_LIMIT_S).returncode == 0
        if not mounted:
            res.figures["skipped"] = "needs root and a tmpfs mount"
            return res
        try:
            _diskfull(res, Path(mnt))
        finally:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=PROCESS_LIMIT_S)
    return res


def _diskfull(res: Result, disk: Path) -> None:
    engines = {VLLM: vllm_entry(free_port(), 0.2), OLLAMA: ollama_entry(free_port(), 0.2)}
    log = disk / "activity.log"
    with rig(res, engines, resync_s=0.5) as stack:
        stack.top["log_file"] = str(log)
        stack.write_catalog()
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        gen = toggle(stack, VLLM)
        wait_for("READY", lambda: converged(stack, census, VLLM, gen), CONVERGE_LIMIT_S)
        out_before = len(stack.output())
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as fh:
            while True:  # bounded by the disk's size
                fh.write(b"\0" * 4096)
        t0 = time.monotonic()
        gen = toggle(stack, OLLAMA)
        try:
            wait_for("converged with the disk full", lambda: converged(stack, census, OLLAMA, gen), CONVERGE_LIMIT_S)
            res.figures["toggle_converged_with_disk_full_s"] = round(time.monotonic() - t0, 2)
            said = wait_for("the terminal says the log write failed", lambda: [
                x for x in stack.output()[out_before:].splitlines() if "failed" in x and str(log) in x],
                REPORT_LIMIT_S)
            res.figures["terminal_says"] = said[0].split("] ", 3)[-1][:200]
        except TimeoutError as exc:
            res.problems.append(str(exc))
        filler.unlink()
        t0 = time.monotonic()
        # Recovery shows at the next line written; our own probes' lines are no longer logged,
        # so make the reconciler say something: a switch back.
        toggle(stack, VLLM)
        try:
            back = wait_for("the terminal says the log recovered", lambda: [
                x for x in stack.output()[out_before:].splitlines() if "writable again" in x], CONVERGE_LIMIT_S)
            res.figures["recovered_after_s"] = round(time.monotonic() - t0, 2)
            res.figures["terminal_on_recovery"] = back[0].split("] ", 3)[-1][:200]
            lost = re.search(r"(\d+) lines were lost", back[0])
            res.figures["lines_lost_reported"] = int(lost.group(1)) if lost else None
            res.check(lost is not None and int(lost.group(1)) > 0, f"lost lines not counted: {back[0]}")
            torn = [x for x in log.read_text(errors="replace").splitlines() if not LOG_LINE.match(x)]
            res.figures["torn_log_lines"] = len(torn)
        except TimeoutError as exc:
            res.problems.append(str(exc))


# ----------------------------------------------------------------------------- 6. gate


def _raise_nofile(needed: int) -> int:
    """The soft fd limit up to the hard one if ``needed`` sockets would not fit; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


GATE_CONCURRENCY = 32
# One long-poll's wait: short enough that a lost wake-up shows as slowness, not a hang.
LONGPOLL_WAIT_S = 20


async def _idle_load(url: str, requests: int) -> tuple[dict[int, int], float, float]:
    import aiohttp

    codes: dict[int, int] = {}
    body = {"model": VLLM, "messages": [{"role": "user", "content": "hi"}]}
    todo = iter(range(requests))
    worst = 0.0
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=GATE_CONCURRENCY)) as session:
        async def worker() -> None:
            nonlocal worst
            for _ in todo:
                t = time.monotonic()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                        await resp.read()
                        codes[resp.status] = codes.get(resp.status, 0) + 1
                except (aiohttp.ClientError, TimeoutError):
                    codes[-1] = codes.get(-1, 0) + 1
                worst = max(worst, time.monotonic() - t)
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(GATE_CONCURRENCY)))
        return codes, time.monotonic() - t0, worst


async def _follow(session: Any, url: str, seen: list[tuple[int, float]]) -> None:
    """One UI: GET /status, then ?wait&since=last, forever (cancelled once everyone has the final state)."""
    since: int | None = None
    while True:
        query = "" if since is None else f"?wait={LONGPOLL_WAIT_S}s&since={since}"
        async with session.get(f"{url}/status{query}") as resp:
            doc = json.loads(await resp.read())
        since = int(doc["gate"]["revision"])
        seen.append((since, time.monotonic()))


async def _longpoll(url: str, clients: int, changes: Callable[[], tuple[int, float]]) -> dict[str, Any]:
    import aiohttp

    seen: list[list[tuple[int, float]]] = [[] for _ in range(clients)]
    timeout = aiohttp.ClientTimeout(total=LONGPOLL_WAIT_S + 30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(_follow(session, url, s)) for s in seen]
        final, t_final = await asyncio.to_thread(changes)
        deadline = time.monotonic() + CONVERGE_LIMIT_S
        while time.monotonic() < deadline and not all(
                t.done() or (s and s[-1][0] >= final) for t, s in zip(tasks, seen, strict=True)):
            await asyncio.sleep(POLL_S)  # a wait on a condition, with a deadline
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    firsts = [min((t for r, t in s if r >= final), default=None) for s in seen]
    got = [t for t in firsts if t is not None]
    return {"seen": [[r for r, _ in s] for s in seen], "errors": errors, "final": final,
            "all_seen_s": max(0.0, max(got) - t_final) if got else None}


def gate(requests: int, clients: int, changes: int) -> Result:
    """The gate beside an IDLE reconciler: a burst of refused requests, then many long-pollers across changes."""
    res = Result("gate")
    limit = _raise_nofile(clients + GATE_CONCURRENCY + 256)
    res.figures["nofile_soft_limit"] = limit
    engines = {VLLM: vllm_entry(free_port(), 0.05)}
    with rig(res, engines, resync_s=0.5) as stack:
        stack.gate_port = free_port()
        stack.write_catalog()
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        wait_for("IDLE", lambda: stack.status().get("phase") == "IDLE", CONVERGE_LIMIT_S)
        proc, url = _start_gate(stack, {})
        try:
            codes, spent, worst = asyncio.run(_idle_load(url, requests))
            res.figures.update({"idle_requests": requests, "idle_codes": {str(k): v for k, v in codes.items()},
                                "idle_req_per_s": round(requests / spent), "idle_worst_ms": round(worst * 1000, 1),
                                "concurrency": GATE_CONCURRENCY})
            res.check(codes == {428: requests}, f"while IDLE not all 428: {codes}")

            def make_changes() -> tuple[int, float]:
                model: str | None = None
                for _ in range(changes):
                    model = None if model else VLLM
                    gen = toggle(stack, model)
                    wait_for("converged", partial(converged, stack, census, model, gen), CONVERGE_LIMIT_S)
                return int(stack.status()["revision"]), time.monotonic()
            t0 = time.monotonic()
            out = asyncio.run(_longpoll(url, clients, make_changes))
            failed = out["errors"]
            seen = out["seen"]
            backwards = [s for s in seen if any(b < a for a, b in itertools.pairwise(s))]
            missed = [s for s in seen if not s or s[-1] < out["final"]]
            polls = [len(s) for s in seen]
            res.figures.update({
                "longpoll_clients": clients, "state_changes": changes, "final_revision": out["final"],
                "seconds": round(time.monotonic() - t0, 1),
                "all_clients_saw_final_after_s": None if out["all_seen_s"] is None else round(out["all_seen_s"], 3),
                "polls_per_client_median": sorted(polls)[len(polls) // 2] if polls else 0,
                "distinct_revisions_seen_median": sorted(len(set(s)) for s in seen)[len(seen) // 2] if seen else 0,
                "client_errors": len(failed), "went_backwards": len(backwards), "missed_final": len(missed),
            })
            res.check(not failed, f"long-poll clients failed: {[repr(f)[:120] for f in failed[:3]]}")
            res.check(not backwards and not missed, f"long-poll: {len(backwards)} went backwards, "
                      f"{len(missed)} missed the final revision {out['final']}")
            res.check(proc.poll() is None, "the gate died")
        finally:
            proc.terminate()
            proc.wait(PROCESS_LIMIT_S)
    return res


# ----------------------------------------------------------------------------- 4. ports


def _phase_at(stack: Stack, phase: str, generation: int) -> dict[str, Any] | None:
    """The observed state once it is ``phase`` for at least ``generation``."""
    doc = stack.status()
    return doc if doc.get("phase") == phase and doc.get("desired_generation", -1) >= generation else None


def _beat_after(stack: Stack, beat: object) -> bool:
    return (stack.status().get("reconciler") or {}).get("heartbeat") != beat


def ports(rounds: int) -> Result:
    """A foreign process on the engine's port: waited for, never killed; the engine starts soon after it leaves."""
    res = Result("ports")
    port = free_port()
    delays: list[float] = []
    to_waiting: list[float] = []
    with rig(res, {VLLM: vllm_entry(port, 0.1)}, resync_s=0.5) as stack:
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        for _ in range(rounds):
            holder = subprocess.Popen([PY, "-c", (
                "import socket,sys\n"
                "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); sys.stdin.read()")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert holder.stdout is not None and holder.stdin is not None
            try:
                res.check(holder.stdout.readline() == b"up\n", "the foreign holder could not bind")
                t_toggle = time.monotonic()
                gen = toggle(stack, VLLM)
                doc = wait_for("WAITING_PORT", partial(_phase_at, stack, "WAITING_PORT", gen), CONVERGE_LIMIT_S)
                to_waiting.append(round(time.monotonic() - t_toggle, 2))
                holders = [h.get("pid") for h in doc.get("port_holders") or []]
                res.check(holders == [holder.pid], f"port holders reported {holders}, expected {holder.pid}")
                beat = (doc.get("reconciler") or {}).get("heartbeat")
                wait_for("another pass", partial(_beat_after, stack, beat), CONVERGE_LIMIT_S)
                res.check(holder.poll() is None, "the foreign port holder was killed")
                res.check(not census.pids(), "an engine started while the port was held")
            finally:
                holder.stdin.close()
                holder.wait(PROCESS_LIMIT_S)
            released = time.time()
            pids = wait_for("engine started", census.pids, CONVERGE_LIMIT_S)
            delays.append(round(min(psutil.Process(p).create_time() for p in pids) - released, 3))
            wait_for("READY", partial(converged, stack, census, VLLM, gen), CONVERGE_LIMIT_S)
            gen = toggle(stack, None)
            wait_for("IDLE", partial(converged, stack, census, None, gen), CONVERGE_LIMIT_S)
    res.figures.update({"rounds": rounds, "start_after_release_s": delays, "toggle_to_waiting_port_s": to_waiting,
                        "median_s": sorted(delays)[len(delays) // 2] if delays else None})
    res.check(all(d < 1.0 for d in delays), f"engine started late after the port was freed: {delays}")
    return res


# ----------------------------------------------------------------------------- 6. in flight across a switch


# A request through the gate must end within this after it was sent; hitting it is a hang.
INFLIGHT_CLIENT_TIMEOUT_S = 30.0
# The engine's pace and each request's length: 20 ms a token, 500 tokens = 10 s a request,
# far longer than it takes to get every request in flight, so the toggle lands mid-request.
INFLIGHT_TOKEN_DELAY_MS = 20
INFLIGHT_MAX_TOKENS = 500
# How long all requests may take to reach the engine (200 on a loaded 2-core machine).
INFLIGHT_START_LIMIT_S = 20.0
SWITCH_REASON = "model_switched"


def _with_token_delay(entry: dict[str, Any], delay_ms: int) -> dict[str, Any]:
    command = entry["command"]
    command[command.index("--token-delay-ms") + 1] = str(delay_ms)
    return entry


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _classify_stream(raw: bytes) -> str:
    """An SSE answer: ``full`` (ends with [DONE]), ``stream_error_switch`` or ``stream_truncated``."""
    events = [x[len(b"data: "):] for x in raw.split(b"\n\n") if x.startswith(b"data: ")]
    for event in events:
        if event.strip() == b"[DONE]":
            continue
        try:
            doc = json.loads(event)
        except ValueError:
            return "stream_unparsable"
        if isinstance(doc, dict) and "error" in doc:
            code = (doc.get("error") or {}).get("code") if isinstance(doc.get("error"), dict) else None
            return "stream_error_switch" if code == SWITCH_REASON else f"stream_error_{code}"
    return "full" if events and events[-1].strip() == b"[DONE]" else "stream_truncated"


async def _inflight_requests(url: str, n: int, toggled: Callable[[], float]) -> tuple[list[tuple[str, float]], float]:
    """n requests (even ones streamed), then ``toggled()`` (returns the toggle's monotonic time);
    each request's (outcome, end time)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=INFLIGHT_CLIENT_TIMEOUT_S)
    ends: list[tuple[str, float]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int) -> None:
            stream = i % 2 == 0
            body = {"model": VLLM, "messages": [{"role": "user", "content": f"request {i}"}],
                    "max_tokens": INFLIGHT_MAX_TOKENS, "stream": stream}
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    raw = await resp.read()
                    if resp.status == 200 and stream:
                        kind = _classify_stream(raw)
                    elif resp.status == 200:
                        doc = json.loads(raw)
                        kind = "full" if doc.get("choices") else "empty_200"
                    else:
                        try:
                            err = json.loads(raw).get("error")
                            code = err.get("code") if isinstance(err, dict) else None
                        except (ValueError, AttributeError):
                            code = "no_json"
                        kind = f"{resp.status}_{'switch' if code == SWITCH_REASON else code}"
            except TimeoutError:
                kind = "hang"
            except aiohttp.ClientError as exc:
                kind = f"client_error_{type(exc).__name__}"
            ends.append((("stream " if stream else "plain ") + kind, time.monotonic()))
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        t_toggle = await asyncio.to_thread(toggled)
        await asyncio.gather(*tasks)
    return ends, t_toggle


def inflight(requests: int) -> Result:
    """Requests in flight through the gate when the model is switched: each ends, none hangs."""
    res = Result("inflight")
    _raise_nofile(2 * requests + 256)
    vport = free_port()
    engines = {VLLM: _with_token_delay(vllm_entry(vport, 0.2), INFLIGHT_TOKEN_DELAY_MS),
               OLLAMA: ollama_entry(free_port(), 0.2)}
    with rig(res, engines, resync_s=0.5) as stack:
        stack.gate_port = free_port()
        stack.write_catalog()
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        gen = toggle(stack, VLLM)
        wait_for("READY", lambda: converged(stack, census, VLLM, gen), CONVERGE_LIMIT_S)
        proc, url = _start_gate(stack, {})
        try:
            wait_for("the gate admits", lambda: (_get_json(f"{url}/v1/models") or {}).get("data"), CONVERGE_LIMIT_S)
            stats_url = f"http://127.0.0.1:{vport}/demo/stats"
            new_gen: list[int] = []
            in_flight_at_toggle: list[int] = []

            def all_in_flight_then_toggle() -> float:
                def active() -> int | None:
                    s = _get_json(stats_url) or {}
                    n = s.get("requests_started", 0) - s.get("requests_finished", 0) - s.get("requests_cancelled", 0)
                    return n if n >= requests else None
                try:
                    in_flight_at_toggle.append(wait_for("all requests in flight", active, INFLIGHT_START_LIMIT_S))
                except TimeoutError as exc:
                    res.problems.append(str(exc))
                t = time.monotonic()
                new_gen.append(toggle(stack, OLLAMA))
                return t

            ends, t_toggle = asyncio.run(_inflight_requests(url, requests, all_in_flight_then_toggle))
            try:
                wait_for("the new engine READY", lambda: converged(stack, census, OLLAMA, new_gen[0]), CONVERGE_LIMIT_S)
                res.figures["new_engine_ready_after_toggle_s"] = round(time.monotonic() - t_toggle, 2)
            except TimeoutError as exc:
                res.problems.append(str(exc))
            res.check(proc.poll() is None, "the gate died")
        finally:
            proc.terminate()
            proc.wait(PROCESS_LIMIT_S)
    counts: dict[str, int] = {}
    for kind, _ in ends:
        counts[kind] = counts.get(kind, 0) + 1
    after = sorted(round(t - t_toggle, 3) for _, t in ends)
    ok_kinds = ("full", "stream_error_switch", "503_switch")
    bad = {k: v for k, v in counts.items() if k.split(" ", 1)[1] not in ok_kinds}
    res.figures.update({
        "requests": requests, "in_flight_at_toggle": in_flight_at_toggle[0] if in_flight_at_toggle else None,
        "outcomes": counts, "hangs": sum(v for k, v in counts.items() if k.endswith(" hang")),
        "toggle_to_end_median_s": after[len(after) // 2] if after else None,
        "toggle_to_end_max_s": after[-1] if after else None,
        "client_timeout_s": INFLIGHT_CLIENT_TIMEOUT_S, "token_delay_ms": INFLIGHT_TOKEN_DELAY_MS,
        "max_tokens": INFLIGHT_MAX_TOKENS,
    })
    res.check(len(ends) == requests, f"{len(ends)} of {requests} requests ended")
    res.check(not bad, f"requests ended without a full answer or a clear switch error: {bad}")
    return res


# ----------------------------------------------------------------------------- 4. shared port, late bind


SHARED_BOOT_S = 0.5


def shared_entry(name: str, port: int) -> dict[str, Any]:
    """A vLLM-like engine serving ``demo/NAME`` on ``port``; its own command names both."""
    served = f"demo/{name}"
    return {"kind": "vllm", "served_name": served, "port": port,
            "command": ["{python}", "-m", "reconciler.engines.demo.vllm_like", "serve", served, "--host", "{host}",
                        "--port", "{port}", "--boot-seconds", str(SHARED_BOOT_S), "--token-delay-ms", "5"],
            "strays": ONLY_OWN_COMMAND,
            "ready": {"period_s": 0.1}, "liveness": {"period_s": 0.5},
            "restart_backoff": {"initial_s": 0.5, "max_s": 2}}


class _FirstAnswer(Watcher):
    """Polls ``/v1/models`` on a port until it lists ``served``; the wall time it first did."""

    def __init__(self, port: int, served: str) -> None:
        super().__init__("chaos-first-answer")
        self.url, self.served = f"http://127.0.0.1:{port}/v1/models", served
        self.at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + CONVERGE_LIMIT_S
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=0.5) as resp:
                    ids = [m.get("id") for m in json.loads(resp.read()).get("data", [])]
                if self.served in ids:
                    self.at = time.time()
                    return
            except (OSError, ValueError):
                pass
            self._stop_event.wait(SAMPLE_S)


def sharedport(switches: int) -> Result:
    """Two catalog entries on one port: switches never overlap; the engine binds only after loading."""
    from datetime import datetime

    res = Result("sharedport")
    port = free_port()
    a, b = "vllm-a", "vllm-b"
    engines = {a: shared_entry(a, port), b: shared_entry(b, port)}
    times: list[float] = []
    bind_after_spawn: list[float] = []
    with rig(res, engines, resync_s=0.5) as stack:
        census = Census(namespace_of(stack.state_dir))
        stack.start()
        gen = toggle(stack, a)
        wait_for("READY", lambda: converged(stack, census, a, gen), CONVERGE_LIMIT_S)
        with Sampler(census) as sampler:
            model = a
            for _ in range(switches):
                model = b if model == a else a
                first = _FirstAnswer(port, f"demo/{model}")
                first.start()
                t0 = time.monotonic()
                gen = toggle(stack, model)
                try:
                    doc = wait_for("switch converged", partial(converged, stack, census, model, gen),
                                   CONVERGE_LIMIT_S)
                    times.append(round(time.monotonic() - t0, 3))
                    first.join(PROCESS_LIMIT_S)
                    started = datetime.fromisoformat(doc["engine"]["started_at"]).timestamp()
                    if first.at is not None:
                        bind_after_spawn.append(round(first.at - started, 3))
                    else:
                        res.problems.append(f"the new engine {model} never answered on port {port}")
                except TimeoutError as exc:
                    res.problems.append(str(exc))
                finally:
                    first.stop()
        res.figures.update({"samples": sampler.samples, "overlaps": len(sampler.overlaps),
                            "duplicates": len(sampler.duplicates)})
        res.check(not sampler.overlaps, f"two engines alive on one port: {sampler.overlaps[:3]}")
        res.check(not sampler.duplicates, f"two instances of one engine: {sampler.duplicates[:3]}")
    res.figures.update({
        "switches": switches, "boot_s": SHARED_BOOT_S, "switch_s": times,
        "switch_median_s": sorted(times)[len(times) // 2] if times else None,
        "spawn_to_port_answering_s": bind_after_spawn,
        "spawn_to_port_answering_median_s": sorted(bind_after_spawn)[len(bind_after_spawn) // 2]
        if bind_after_spawn else None,
    })
    res.check(len(times) == switches, f"{len(times)} of {switches} switches converged")
    return res


# ----------------------------------------------------------------------------- main


# Each runs at (sizes, seed, identity mode); only flapping and sigkill depend on the mode.
SCENARIOS: dict[str, Callable[[dict[str, int], int, str], list[Result]]] = {
    "flapping": lambda s, seed, mode: [flapping(s["toggles"], seed, mode)],
    "burst": lambda s, seed, mode: [burst(s["burst_s"])],
    "sigkill": lambda s, seed, mode: [sigkill(s["kills"], seed, mode)],
    "badinput": lambda s, seed, mode: [badinput(s["bad_files"], seed)],
    "faults": lambda s, seed, mode: faults(s["restarts"]),
    "output": lambda s, seed, mode: output(s["flood_s"]),
    "security": lambda s, seed, mode: [security()],
    "files": lambda s, seed, mode: [files(), diskfull()],
    "gate": lambda s, seed, mode: [gate(s["gate_requests"], s["longpoll_clients"], s["state_changes"])],
    "ports": lambda s, seed, mode: [ports(s["port_rounds"])],
    "inflight": lambda s, seed, mode: [inflight(s["inflight_requests"])],
    "sharedport": lambda s, seed, mode: [sharedport(s["shared_switches"])],
}


def machine() -> str:
    return f"{os.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GiB, {socket.gethostname()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--full", action="store_true", help="the issue's sizes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--identity", choices=IDENTITY_MODES, default="auto",
                        help="identity.mode for the flapping and sigkill scenarios")
    ns = parser.parse_args(argv)
    sizes = SIZES["full" if ns.full else "short"]
    run_marker()
    out: list[dict[str, Any]] = []
    failed = 0
    for name in ns.scenarios or list(SCENARIOS):
        t0 = time.monotonic()
        for result in SCENARIOS[name](sizes, ns.seed, ns.identity):
            row = {"scenario": result.scenario, "size": "full" if ns.full else "short",
                   "seconds": round(time.monotonic() - t0, 1), "figures": result.figures,
                   "problems": result.problems, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
            print(json.dumps(row), flush=True)
            out.append(row)
            failed += bool(result.problems)
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
