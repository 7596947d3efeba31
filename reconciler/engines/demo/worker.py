"""The worker child: the process that loads and holds the model's memory.

It is what the reconciler must find and kill: it holds memory (CUDA tensors when torch sees
a GPU, touched RAM otherwise), prints the load's progress as the real engine does, and
outlives a SIGKILLed parent, like a leaked vLLM EngineCore or Ollama runner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.engines.demo.logtext import emit, emit_progress, progress_text, traceback_lines
from reconciler.engines.demo.options import FAIL_MODES, READY_AFTER_S
from reconciler.kit import clock

MIB = 1024 * 1024
PAGE = 4096


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Flags the serving process passes down to its worker child."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--vram-mb", type=int, default=0)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--fail", choices=FAIL_MODES, default="none")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--escape", action="store_true")


def worker_flags(model: str, vram_mb: int, load_seconds: float, fail: str) -> list[str]:
    """The flags of ``add_worker_args`` a parent passes to its worker (the ready fd and
    ``--escape`` are each engine's to add)."""
    return ["--model", model, "--vram-mb", str(vram_mb), "--load-seconds", str(load_seconds), "--fail", fail]


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker loads: how long, how much memory, what to look like, how to fail."""

    vram_mb: int
    load_seconds: float
    fail: str
    ready_fd: int
    escape: bool
    progress_label: str
    steps: int
    crash_errors: Mapping[str, str]  # fail mode -> the exception line it dies with
    log: Callable[[str], None]
    # "tqdm": a bar redrawn with \r (vLLM); "dots": ``progress_label`` as a line, then one "."
    # per percent and a newline at 100 % (llama.cpp's default load callback).
    progress_style: str = "tqdm"
    # The line the real engine prints once its weights are in, given the seconds it took.
    loaded_line: Callable[[float], str] | None = None


def escape_session() -> None:
    """Leave the parent's session and shrug off SIGTERM/SIGHUP, like a badly behaved worker."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _cuda_torch() -> Any:
    """torch, when it imports and sees a GPU, so held memory shows up in NVML per process."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not stop the demo
        return None


class MemoryHold:
    """Memory a worker keeps for its whole life: CUDA tensors if possible, else touched RAM."""

    def __init__(self) -> None:
        self._torch = _cuda_torch()
        self._blocks: list[object] = []

    @property
    def device(self) -> str:
        return "cuda" if self._torch is not None else "cpu"

    def grab(self, mb: int) -> None:
        """Hold ``mb`` more MiB; RAM pages are written so RSS really grows."""
        if mb <= 0:
            return
        size = mb * MIB
        if self._torch is not None:
            self._blocks.append(self._torch.ones(size, dtype=self._torch.uint8, device="cuda"))
            return
        buf = bytearray(size)
        buf[::PAGE] = b"\x01" * len(range(0, size, PAGE))
        self._blocks.append(buf)


def _split_mb(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _crash(spec: WorkerSpec, where: str) -> int:
    emit("", sys.stderr)
    for line in traceback_lines(where, spec.crash_errors[spec.fail]):
        emit(line, sys.stderr)
    return 1


def _write_err(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def _load(spec: WorkerSpec, memory: MemoryHold) -> bool:
    """Grab memory shard by shard with a progress bar; False if told to crash mid-way."""
    steps = max(1, spec.steps)
    per_step = spec.load_seconds / steps
    start = clock.monotonic()
    dots = spec.progress_style == "dots"
    if dots:
        emit(spec.progress_label, sys.stderr)
    else:
        emit_progress(progress_text(spec.progress_label, 0, steps, 0.0, per_step))
    for done, mb in enumerate(_split_mb(spec.vram_mb, steps), start=1):
        clock.sleep(per_step)
        memory.grab(mb)
        elapsed = clock.monotonic() - start
        if dots:
            _write_err("." * (100 * done // steps - 100 * (done - 1) // steps))
        else:
            emit_progress(progress_text(spec.progress_label, done, steps, elapsed, per_step))
        if spec.fail == "crash-loading" and done >= (steps + 1) // 2:
            return False
    _write_err("\n")
    return True


def _report_ready(fd: int) -> None:
    """Tell the parent we are loaded; if it is already gone, carry on regardless."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, b"R")


def run_worker(spec: WorkerSpec, where: str) -> int:
    """Load, report ready, then hold the memory until killed.

    It deliberately never watches for its parent's death: a real vLLM EngineCore or
    Ollama runner orphaned by a SIGKILLed server keeps its VRAM, and finding and
    killing such orphans is exactly what the reconciler has to get right.
    """
    if spec.escape:
        escape_session()
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    if spec.fail == "exit-at-once":
        return 3
    memory = MemoryHold()
    spec.log(f"holding {spec.vram_mb} MiB on {memory.device} while loading")
    started = clock.monotonic()
    if not _load(spec, memory):
        return _crash(spec, where)
    took = clock.monotonic() - started
    spec.log(spec.loaded_line(took) if spec.loaded_line is not None
             else f"weights loaded: {spec.vram_mb} MiB in {took:.2f} seconds")
    _report_ready(spec.ready_fd)
    if spec.fail == "crash-ready":
        clock.sleep(READY_AFTER_S)
        return _crash(spec, where)
    while True:
        clock.sleep(3600.0)
