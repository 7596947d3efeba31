"""Follow engines' raw output files into the activity log.

Engines write to a plain file in the state dir (never to a pipe of ours), so they never
block on their output and outlive the reconciler; a restarted reconciler resumes each file
at the offset it had reached, kept in ``log_offsets.json``. What an engine wrote while no
reconciler followed it is replayed with the pid it had (``log_pids.json``) and marked
``(replayed)``: its lines' real times are not known, only the window they fall in.
Our own readiness probes' access lines are left out unless the catalog keeps them.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from reconciler.kit import clock
from reconciler.kit.atomicfile import write_atomic
from reconciler.kit.logs import ActivityLog, is_probe_line, sanitize
from reconciler.observe import progress
from reconciler.observe.progress import BootProgress

# How often the follower looks for new output; the terminal lags the engine by at most this.
POLL_S = 0.2
# A "line" without a newline is cut here: a multi-megabyte line must not sit in memory.
MAX_LINE_BYTES = 16 * 1024
# Read at most this much per file per poll, so one flooding engine cannot starve the others.
READ_CHUNK = 1 << 20
# Persist offsets at most this often (only when they moved).
OFFSETS_EVERY_S = 1.0
CONTINUES = b" [line continues]"
REPLAYED = "(replayed) "


@dataclass
class _Tail:
    model: str
    pid: int | None
    offset: int = 0
    partial: bytes = b""
    last_line: str | None = None
    done: bool = False  # the instance is gone; drain and forget
    progress: progress.Tracker = field(default_factory=lambda: progress.Tracker("generic"))
    probe_paths: frozenset[str] = frozenset()  # our readiness probe's URL paths on this engine
    replay_end: int = 0  # bytes below this were written while no reconciler followed the file


class Follower:
    def __init__(self, log: ActivityLog, state_dir: Path) -> None:
        self._log = log
        self._offsets_path = state_dir / "log_offsets.json"
        self._dir = state_dir / "engines"
        self._tails: dict[Path, _Tail] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._pids_path = state_dir / "log_pids.json"
        self._saved: dict[str, int] = self._load(self._offsets_path)
        self._pids: dict[str, int] = self._load(self._pids_path)
        self._next_save = 0.0
        self.keep_probe_lines = False  # the catalog's log_probe_lines (or log_level debug)
        # The files there before we started, and their sizes: what lies beyond the saved
        # offset was written while no reconciler followed them.
        self._found: dict[str, int] = {}
        try:
            for found in self._dir.glob("*.log"):
                self._found[str(found)] = found.stat().st_size
        except OSError:
            pass
        try:
            self._last_saved: float | None = self._offsets_path.stat().st_mtime
        except OSError:
            self._last_saved = None

    @staticmethod
    def _load(path: Path) -> dict[str, int]:
        try:
            data = json.loads(path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def _new_tail(self, path: Path, model: str, pid: int | None, kind: str,
                  probe_paths: frozenset[str]) -> _Tail:
        key = str(path)
        offset = self._saved.get(key, 0)
        if pid is None:
            pid = self._pids.get(key)
        return _Tail(model, pid, offset, progress=progress.Tracker(kind), probe_paths=probe_paths,
                     replay_end=self._found.get(key, 0))

    def track(self, path: Path, model: str, pid: int | None, kind: str = "generic",
              probe_paths: frozenset[str] = frozenset()) -> None:
        """Start (or keep) following ``path``; resumes from the saved offset if any."""
        with self._lock:
            tail = self._tails.get(path)
            if tail is None:
                tail = self._tails[path] = self._new_tail(path, model, pid, kind, probe_paths)
            else:
                tail.pid, tail.done, tail.probe_paths = pid, False, probe_paths
                if tail.progress.kind != kind:
                    tail.progress = progress.Tracker(kind)
            if pid is not None and self._pids.get(str(path)) != pid:
                self._pids[str(path)] = pid
                self._save_pids()

    def retain(self, live: set[Path]) -> None:
        """Instances not in ``live`` are gone: drain their files, then delete them.

        Files left by instances that died while no reconciler ran are found on disk.
        """
        try:
            on_disk = set(self._dir.glob("*.log"))
        except OSError:
            on_disk = set()
        with self._lock:
            for path in on_disk - live - set(self._tails):
                model = path.name.rsplit(".", 2)[0]
                self._tails[path] = self._new_tail(path, model, None, "generic", frozenset())
            for path, tail in self._tails.items():
                if path not in live:
                    tail.done = True

    def last_line(self, path: Path) -> str | None:
        with self._lock:
            tail = self._tails.get(path)
            return tail.last_line if tail else None

    def progress(self, path: Path) -> BootProgress | None:
        """The boot progress the engine's output last reported (a bar being redrawn counts)."""
        with self._lock:
            tail = self._tails.get(path)
            return tail.progress.current if tail else None

    def poll(self, wait: bool = True) -> None:
        """Read new output. ``wait=False``: skip if another thread is already polling.

        The loop polls with ``wait=False``: behind a flooding engine a poll takes a while,
        and the loop must not stall on it (toggles and liveness checks would wait).
        """
        if not self._poll_lock.acquire(blocking=wait):  # loop and follower thread both poll
            return
        try:
            self._poll()
        finally:
            self._poll_lock.release()

    def _poll(self) -> None:
        with self._lock:
            items = list(self._tails.items())
        for path, tail in items:
            self._read(path, tail)
            if tail.done:
                self._flush_partial(tail)
                with self._lock:
                    self._tails.pop(path, None)
                path.unlink(missing_ok=True)  # every line of it is in the activity log now
                if self._pids.pop(str(path), None) is not None:
                    self._save_pids()
        self._save_offsets()

    def _read(self, path: Path, tail: _Tail) -> None:
        try:
            with path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < tail.offset:  # truncated: start over
                    tail.offset, tail.partial = 0, b""
                handle.seek(tail.offset)
                replaying = tail.offset < tail.replay_end
                data = handle.read(min(READ_CHUNK, tail.replay_end - tail.offset) if replaying
                                   else READ_CHUNK)
        except OSError:
            return
        if not data:
            return
        if replaying and tail.offset == self._saved.get(str(path), 0):
            self._say_replay(path, tail)
        tail.offset += len(data)
        buffer = tail.partial + data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = buffer.split(b"\n")
        pieces: list[bytes] = []
        for raw in lines:
            while len(raw) > MAX_LINE_BYTES:
                pieces.append(raw[:MAX_LINE_BYTES] + CONTINUES)
                raw = raw[MAX_LINE_BYTES:]
            pieces.append(raw)
        # No newline in sight: emit what we have in pieces (each marked exactly once).
        while len(rest) > MAX_LINE_BYTES:
            pieces.append(rest[:MAX_LINE_BYTES] + CONTINUES)
            rest = rest[MAX_LINE_BYTES:]
        tail.partial = rest
        self._emit(tail, *pieces, replayed=replaying)
        if rest and tail.progress.active:
            # A bar redrawn with \r, or llama.cpp's dots, shows its state before its line ends.
            tail.progress.peek(sanitize(rest).strip())

    def _emit(self, tail: _Tail, *raws: bytes, replayed: bool = False) -> None:
        dots = tail.progress.kind in progress.DOTS_KINDS
        texts = [t for raw in raws for piece in progress.unglue(sanitize(raw), dots)
                 if (t := piece.rstrip())]
        if tail.probe_paths:
            # Our own probes' access lines: never the last line (the state would change on
            # every probe), and in the log only when the catalog asks for them.
            ours = [is_probe_line(t, tail.probe_paths) for t in texts]
            seen = [t for t, probe in zip(texts, ours, strict=True) if not probe]
            if seen:
                tail.last_line = seen[-1]
            if not self.keep_probe_lines:
                texts = seen
        elif texts:
            tail.last_line = texts[-1]
        if texts:
            if tail.progress.active:
                for text in texts:
                    tail.progress.feed(text)
            if replayed:
                texts = [REPLAYED + t for t in texts]
            self._log.write_lines(tail.model, tail.pid, texts)

    def _say_replay(self, path: Path, tail: _Tail) -> None:
        """Once per file: what is about to be replayed, and the window its lines fall in."""
        since = (f"after {clock.iso(datetime.fromtimestamp(self._last_saved, UTC))}"
                 if self._last_saved is not None else "before this reconciler started")
        self._log.event(f"{tail.model}: replaying {tail.replay_end - tail.offset} bytes of "
                        f"{path.name} written while no reconciler followed it ({since}); "
                        f"their lines are marked {REPLAYED.strip()}")

    def _save_pids(self) -> None:
        with contextlib.suppress(OSError):  # the state dir may be gone; the loop says so
            write_atomic(self._pids_path, json.dumps(self._pids), durable=False)  # see _save_offsets

    def _flush_partial(self, tail: _Tail) -> None:
        if tail.partial:
            self._emit(tail, tail.partial)
            tail.partial = b""

    def _save_offsets(self) -> None:
        now = clock.monotonic()
        if now < self._next_save:
            return
        with self._lock:
            offsets = {k: v for k, v in self._saved.items() if Path(k).exists()}
            offsets.update({str(p): t.offset - len(t.partial) for p, t in self._tails.items()})
        if offsets == self._saved:
            return
        self._next_save = now + OFFSETS_EVERY_S
        try:
            # Not fsync'd: a power loss costs a replay of some lines (marked), never a loss,
            # and an fsync here was a sixth of a switch's own time.
            write_atomic(self._offsets_path, json.dumps(offsets), durable=False)
            self._saved = offsets
        except OSError:
            pass  # the state dir may be gone; the loop recreates it and says so

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()
            clock.sleep(POLL_S, stop)
        self.poll()
