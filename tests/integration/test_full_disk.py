"""A full state-dir filesystem is reported as what it is, not as a dead reconciler (issue 25, item 4).

The state dir lives on a small tmpfs (desired state and activity log outside it). Filled while
an engine is READY, the gate must keep serving it past its stale limit, ``/status`` must say the
state is written from its reserve (ENOSPC) and never that the reconciler is not running, a
switch must complete while the disk is still full, and the marking must go once there is room.
Mounting needs root (CI runs as root): elsewhere these tests skip, and under CI=true they fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.kit import atomicfile
from reconciler.kit.freeport import free_port
from reconciler.store import state_file
from tests.helpers import PROBE_TIMEOUT_S, GatedStack, Stack, demo_engine, http_status, wait_until

pytestmark = pytest.mark.integration

# The gate's stale limit here (30 s by default): a heartbeat that stopped shows within it.
STALE_S = 2.0
# The reconciler's pass (and heartbeat) period: several beats per stale limit.
RESYNC_S = 0.4
# Room for the state, the records, the engines' output files and the reserves, and little
# more: the filler takes the rest.
TMPFS_BYTES = 4 << 20
# How often the filler takes back what was freed (a switch deletes the old engine's output).
TOP_UP_S = 0.01
# How often the gate's answers are sampled while the disk is full.
SAMPLE_S = 0.05
# Write sizes that fill a tmpfs to its last byte: whole chunks, then pages, then bytes.
FILL_CHUNKS = (1 << 16, 1 << 12, 1)
SERVED = {"gpt-oss": "openai/gpt-oss-20b", "gemma2": "gemma2:9b"}


@contextlib.contextmanager
def small_tmpfs(where: Path, size: int = TMPFS_BYTES) -> Iterator[None]:
    """A tmpfs of ``size`` bytes at ``where``, unmounted at the end."""
    where.mkdir(mode=0o755)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                                  str(where)], capture_output=True, text=True, check=False)
        why = mounted.stderr.strip() if mounted.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs, which CI must (it runs as root): {why}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {why}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True, check=False)


class Filler:
    """Keeps a filesystem full: fills it to the last byte, then takes back whatever is freed
    until ``free`` (a full disk stays full while the reconciler deletes files)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "filler"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._top_up, daemon=True)

    def fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for chunk in FILL_CHUNKS:
                block = b"\0" * chunk
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, block)
        finally:
            os.close(fd)

    def start(self) -> None:
        self.fill()
        self._thread.start()

    def _top_up(self) -> None:
        while not self._stop.wait(TOP_UP_S):
            self.fill()

    def free(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def is_full(folder: Path) -> bool:
    """A new page cannot be had: the filesystem is full."""
    probe = folder / "probe"
    try:
        probe.write_bytes(b"\0" * 4096)
    except OSError as exc:
        return exc.errno == errno.ENOSPC
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return False


@dataclass
class FullDiskStack(GatedStack):
    """The gated stack with a short stale limit, so a heartbeat that stops shows quickly, and
    a filler for its state dir."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.filler = Filler(self.state_dir)

    def write_catalog(self) -> None:
        self.top["gate"] = {"listen": f"127.0.0.1:{self.gate_port}", "stale_after_s": STALE_S}
        Stack.write_catalog(self)

    def gate_status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.gate_url + "/status", timeout=PROBE_TIMEOUT_S) as response:
                return dict(json.loads(response.read()))
        except (OSError, ValueError):
            return {}

    def completion(self, model: str) -> int | None:
        """The gate's status code for one short chat completion for ``model``."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = http_status(self.gate_url + "/v1/chat/completions", body)
        return None if answer is None else answer[0]


def state_write(doc: dict[str, Any]) -> dict[str, Any] | None:
    found = (doc.get("reconciler") or {}).get("state_write")
    return found if isinstance(found, dict) else None


@dataclass
class Watch:
    """Samples the gate's /status in a thread: every answer it gave while the disk was full."""

    stack: FullDiskStack
    answers: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            doc = self.stack.gate_status()
            if doc:
                self.answers.append((time.monotonic() - start, doc))

    def dead(self) -> list[str]:
        """The answers that called the reconciler stale or not running."""
        return [f"+{t:.1f}s: stale={d.get('stale')} reconciler={d['gate'].get('reconciler')} "
                f"heartbeat_age={d['gate'].get('heartbeat_age_s')}"
                for t, d in self.answers if d.get("stale") or d["gate"].get("reconciler") != "running"]


def beat_after(doc: dict[str, Any], moment: datetime) -> bool:
    beat = (doc.get("reconciler") or {}).get("heartbeat")
    return isinstance(beat, str) and datetime.fromisoformat(beat) > moment


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FullDiskStack]:
    """Two demo engines, the gate, and the state dir on a small tmpfs; torn down through the
    product (toggle none, one pass) with room again."""
    with small_tmpfs(tmp_path / "run"):
        s = FullDiskStack(tmp_path, {"gpt-oss": demo_engine("vllm", free_port()),
                                     "gemma2": demo_engine("ollama", free_port())},
                          resync_s=RESYNC_S, gate_port=free_port())
        try:
            yield s
        finally:
            s.filler.free()
            s.stop()
            s.stop_gate()
            s.toggle(None)
            result = s.cli("reconcile", "--once")
            assert result.returncode == 0, result.stdout + result.stderr


def test_a_full_state_dir_keeps_the_gate_serving_and_a_switch_completes(stack: FullDiskStack) -> None:
    stack.start()
    stack.start_gate()
    stack.toggle("gpt-oss")
    stack.wait_phase("READY", "gpt-oss")
    assert stack.completion("gpt-oss") == 200
    filler = stack.filler
    with Watch(stack) as watch:
        filler.start()
        full_at = datetime.now().astimezone()
        assert is_full(stack.state_dir)

        # Past the stale limit: the heartbeat still flows, the gate still serves, and says why.
        late = full_at + timedelta(seconds=2 * STALE_S)
        doc = wait_until("a heartbeat written twice the stale limit after the disk filled",
                         lambda: (d := stack.gate_status()) and beat_after(d, late) and d)
        mark = state_write(doc)
        assert mark is not None and mark["error"] == "ENOSPC", doc.get("reconciler")
        assert doc["stale"] is False and doc["gate"]["reconciler"] == "running", doc["gate"]
        assert doc["phase"] == "READY"
        assert stack.completion("gpt-oss") == 200

        # A switch on the full disk completes: the old engine goes, the new one serves.
        switch_started = time.monotonic()
        stack.toggle("gemma2")
        wait_until("gemma2 served through the gate on the full disk",
                   lambda: stack.completion("gemma2") == 200, timeout=30)
        switch_s = time.monotonic() - switch_started
        assert is_full(stack.state_dir)
        doc = wait_until("the new engine's state, still marked", lambda: (d := stack.gate_status())
                         and d.get("active_model") == "gemma2" and state_write(d) and d)
        assert doc["phase"] == "READY" and doc["engine"]["served_name"] == SERVED["gemma2"]
        assert len([p for p in (stack.state_dir / "instances").iterdir() if p.suffix == ".json"]) == 1
    assert not watch.dead(), watch.dead()[:5]
    print(f"\nfull disk: {len(watch.answers)} /status answers, none stale; switch took {switch_s:.2f} s")

    # Room again: the marking goes, the reserves are made again.
    filler.free()
    doc = wait_until("the state-write marking to clear", lambda: (d := stack.gate_status())
                     and d.get("reconciler") and not state_write(d) and d)
    assert doc["stale"] is False and doc["phase"] == "READY"
    spare = state_file.reserve(stack.state_dir / "observed_state.json").spare
    assert spare.stat().st_size == state_file.STATE_RESERVE_BYTES
    records_spare = stack.state_dir / "instances" / ".reserve"
    wait_until("the records' spare made again", records_spare.exists)
    log = stack.log_file.read_text()
    assert log.count("written into the room kept for it") >= 1, log[-2000:]
    assert "is written normally again" in log


def test_the_reserve_rewrites_a_file_on_a_full_tmpfs(tmp_path: Path) -> None:
    """The reserve's writes need no free block: a filled tmpfs takes a thousand states of
    changing sizes, each whole, and the spare is kept throughout."""
    folder = tmp_path / "small"
    with small_tmpfs(folder, 1 << 20):
        path = folder / "observed_state.json"
        reserve = atomicfile.Reserve(folder / ".reserve", 1 << 14, 0o644)
        assert reserve.write(path, json.dumps({"phase": "IDLE", "n": 0})) is None and reserve.keep()
        filler = Filler(folder)
        filler.fill()
        try:
            for n in range(1, 1001):
                doc = {"phase": "READY", "n": n, "pad": "x" * (n % 700)}
                problem = reserve.write(path, json.dumps(doc))
                assert problem is not None and problem.errno == errno.ENOSPC
                assert json.loads(path.read_bytes()) == doc
            assert reserve.spare.stat().st_size == 1 << 14
            assert is_full(folder)
        finally:
            filler.free()
