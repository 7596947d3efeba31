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
from enum import StrEnum
from pathlib import Path

from reconciler.domain.catalog import LogLimits
from reconciler.kit import clock
from reconciler.kit.atomicfile import write_atomic
from reconciler.kit.logs import ActivityLog, is_probe_line, sanitize, sanitize_lines
from reconciler.observe import progress
from reconciler.observe.progress import BootProgress

# How often the follower looks for new output; the terminal lags the engine by at most this.
POLL_S = 0.2
# A "line" without a newline is cut here: a multi-megabyte line must not sit in memory.
MAX_LINE_BYTES = 16 * 1024
# One read of one file; files are read in turns of this much, so one flooding engine cannot
# starve the others.
READ_CHUNK = 1 << 20
# A poll reads every file until it is caught up, up to this much in all; the next poll
# follows at once while any file is behind (one read per poll held a flood 41 s behind).
POLL_BUDGET_BYTES = 64 << 20
# Persist offsets at most this often (only when they moved).
OFFSETS_EVERY_S = 1.0
CONTINUES = b" [line continues]"
REPLAYED = "(replayed) "
# How often a continuing loss (an engine over its rate) is reported while it lasts.
LOSS_REPORT_EVERY_S = 10.0


class Loss(StrEnum):
    """Why bytes of an engine's output were not copied to the activity log and the terminal."""

    RATE_LIMIT = "over its rate limit (log_limits.engine_bytes_per_s)"
    STOPPED = "its instance was gone and this unread output was over its rate limit"


@dataclass
class _Bucket:
    """A token bucket of bytes: ``rate`` a second, up to ``burst`` at once (None: no limit)."""

    rate: float | None = None
    burst: int = 0
    tokens: float = 0.0
    at: float | None = None

    def take(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` bytes may be copied now (they are then spent)."""
        if self.rate is None:
            return wanted
        if self.at is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        allowed = min(wanted, int(self.tokens))
        self.tokens -= allowed
        return allowed


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
    bucket: _Bucket = field(default_factory=_Bucket)
    resync: bool = False  # bytes were skipped mid-line: drop up to the next line end
    lost: int = 0  # bytes not copied and not yet reported
    lost_why: Loss = Loss.RATE_LIMIT
    lost_reported_at: float | None = None


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
        self.limits = LogLimits()  # the catalog's log_limits: each engine's rate
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

    def poll(self, wait: bool = True, budget: int | None = None) -> None:
        """Read new output, up to ``budget`` bytes (default POLL_BUDGET_BYTES). ``wait=False``:
        skip if another thread is already polling.

        The loop polls with ``wait=False`` and one chunk's budget: behind a flooding engine a
        poll takes a while, and the loop must not stall on it (toggles and liveness checks
        would wait); the follower thread catches up.
        """
        if not self._poll_lock.acquire(blocking=wait):  # loop and follower thread both poll
            return
        try:
            self._poll(POLL_BUDGET_BYTES if budget is None else budget)
        finally:
            self._poll_lock.release()

    def _poll(self, budget: int) -> None:
        with self._lock:
            items = list(self._tails.items())
        behind = dict(items)
        while behind and budget > 0:  # in turns: a flooding engine cannot starve the others
            for path, tail in list(behind.items()):
                read = self._read(path, tail)
                budget -= read
                if read < READ_CHUNK:
                    del behind[path]
        for path, tail in items:
            if tail.done and path not in behind:
                self._finish(path, tail)
            self._report_loss(tail)
        self._save_offsets()

    def _finish(self, path: Path, tail: _Tail) -> None:
        """A gone instance's file, read to its end: its last words, then the file goes."""
        self._flush_partial(tail)
        self._report_loss(tail, final=True)
        with self._lock:
            self._tails.pop(path, None)
        path.unlink(missing_ok=True)  # every byte of it is in the activity log, or its loss is
        if self._pids.pop(str(path), None) is not None:
            self._save_pids()

    def behind(self) -> bool:
        """Whether the last poll stopped at its budget with output still unread."""
        return any(self.unread(path) > 0 for path in list(self._tails))

    def _read(self, path: Path, tail: _Tail) -> int:
        """Copy the next piece of ``path`` (at most READ_CHUNK) into the log; the bytes it
        consumed. Over the engine's rate, the rest of what is written so far is skipped
        unread: counted and said, never silently."""
        try:
            with path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < tail.offset:  # truncated: start over
                    tail.offset, tail.partial = 0, b""
                replaying = tail.offset < tail.replay_end
                end = tail.replay_end if replaying else size
                want = min(READ_CHUNK, end - tail.offset)
                tail.bucket.rate, tail.bucket.burst = self.limits.engine_bytes_per_s, self.limits.engine_burst_bytes
                allowed = tail.bucket.take(want, clock.monotonic())
                handle.seek(tail.offset)
                data = handle.read(allowed) if allowed > 0 else b""
        except OSError:
            return 0
        if data:
            if replaying and tail.offset == self._saved.get(str(path), 0):
                self._say_replay(path, tail)
            tail.offset += len(data)
            self._take(tail, data, replaying)
        if allowed < want:
            skipped = end - tail.offset
            self._skip(tail, skipped, Loss.STOPPED if tail.done else Loss.RATE_LIMIT)
            return len(data) + skipped
        return len(data)

    def _take(self, tail: _Tail, data: bytes, replaying: bool) -> None:
        """Cut ``data`` into lines (overlong ones into marked pieces) and emit the complete ones."""
        if tail.resync:  # the bytes before the next line end belong to a skipped line
            cut = data.find(b"\n")
            tail.lost += len(data) if cut < 0 else cut + 1
            if cut < 0:
                return
            data, tail.resync = data[cut + 1:], False
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        complete, newline, rest = (tail.partial + data).rpartition(b"\n")
        if len(complete) > MAX_LINE_BYTES and max(map(len, complete.split(b"\n"))) > MAX_LINE_BYTES:
            complete = b"\n".join(_cut_long(complete.split(b"\n")))
        # No newline in sight: emit what we have in pieces (each marked exactly once).
        pieces = [complete] if newline else []
        while len(rest) > MAX_LINE_BYTES:
            pieces.append(rest[:MAX_LINE_BYTES] + CONTINUES)
            rest = rest[MAX_LINE_BYTES:]
        tail.partial = rest
        if pieces:
            self._emit(tail, b"\n".join(pieces), replayed=replaying)
        if rest and tail.progress.active:
            # A bar redrawn with \r, or llama.cpp's dots, shows its state before its line ends.
            tail.progress.peek(sanitize(rest).strip())

    @staticmethod
    def _skip(tail: _Tail, count: int, why: Loss) -> None:
        tail.offset += count
        tail.lost += count + len(tail.partial)
        tail.lost_why = why
        tail.partial, tail.resync = b"", True

    def _report_loss(self, tail: _Tail, final: bool = False) -> None:
        """Say how many bytes of whose output were not copied, and why: once when a loss
        begins, then every LOSS_REPORT_EVERY_S while it lasts, and when the file is done."""
        if not tail.lost:
            return
        now = clock.monotonic()
        last = tail.lost_reported_at
        if not final and last is not None and now - last < LOSS_REPORT_EVERY_S:
            return
        limit = tail.bucket.rate
        rate = f" ({limit:,.0f} bytes/s)" if limit is not None else ""
        self._log.event(f"{tail.model} (pid {tail.pid if tail.pid is not None else '-'}): "
                        f"{tail.lost:,} bytes of its output were not copied to this log: "
                        f"{tail.lost_why.value}{rate}", "warning")
        tail.lost, tail.lost_reported_at = 0, now

    def _emit(self, tail: _Tail, block: bytes, replayed: bool = False) -> None:
        """Lines of one engine (``block``: raw lines joined by newlines) into the log.

        Whole blocks are sanitised and split at once; per-line work (bars, dots, progress
        rules, our probes' access lines) runs only where the block holds what it looks for.
        """
        text = sanitize_lines(block)
        dots = tail.progress.kind in progress.DOTS_KINDS
        lines = text.split("\n")
        if progress.may_glue(text, dots):
            lines = [piece for line in lines for piece in progress.unglue(line, dots)]
        if text.isascii() and " \n" not in text and "\t\n" not in text and not text.endswith((" ", "\t")):
            texts = list(filter(None, lines))  # nothing to strip: blank lines dropped in C
        else:
            texts = [t for line in lines if (t := line.rstrip())]
        if tail.probe_paths and "GET" in text:
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
            if tail.progress.active and progress.may_report(tail.progress.kind, text):
                for line in texts:
                    tail.progress.feed(line)
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
            if not self.behind():
                clock.sleep(POLL_S, stop)
        self.poll()

    def unread(self, path: Path) -> int:
        """Bytes of ``path`` not read yet (0 for a file not followed)."""
        with self._lock:
            tail = self._tails.get(path)
        if tail is None:
            return 0
        try:
            return max(0, path.stat().st_size - tail.offset)
        except OSError:
            return 0


def _cut_long(lines: list[bytes]) -> list[bytes]:
    """Lines longer than MAX_LINE_BYTES cut into pieces, each but the last marked CONTINUES."""
    out: list[bytes] = []
    for raw in lines:
        while len(raw) > MAX_LINE_BYTES:
            out.append(raw[:MAX_LINE_BYTES] + CONTINUES)
            raw = raw[MAX_LINE_BYTES:]
        out.append(raw)
    return out
