"""Follow the activity log for ``GET /logs`` (Server-Sent Events, the dashboard's live tail).

The reconciler writes the log; the gate only reads it, so the tail survives either process
restarting. The file is polled (one ``stat`` per tick) only while someone is watching: a gate
nobody looks at does nothing. A rotation (new inode) or a truncation starts again at the top.
Lines are handed out in batches, one per tick, so a boot that floods the log costs one event
per tick per watcher rather than one per line; a watcher too slow to keep up loses lines and
is told how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

# A new line reaches the page within one tick: well inside the dashboard's 200 ms budget.
POLL_S = 0.05
# What a new watcher gets first, so the page is never empty; read from the file's end. The
# bytes bound keeps the page's first load under its 100 KB budget however long the lines.
BACKLOG_LINES = 200
BACKLOG_BYTES = 40 * 1024
# Read at most this much per tick: a huge backlog (a tail started behind) cannot stall the loop.
MAX_READ_BYTES = 1024 * 1024
# A line longer than this is cut where it stands (nobody reads 64 KiB in a browser row).
MAX_LINE_BYTES = 64 * 1024
# Batches a watcher may have waiting before its lines are dropped (and counted).
QUEUE_BATCHES = 200

# [2026-11-26T10:00:00.123+00:00] [gemma2] [4242] msg="..."  (reconciler/kit/logs.py format_line)
_LINE = re.compile(r"^\[([^\]]*)\] \[([^\]]*)\] \[([^\]]*)\] ?(.*)$")


def parse(line: str) -> dict[str, Any]:
    """One log line as {ts, model, pid, msg}; a line in another shape keeps its text in msg."""
    match = _LINE.match(line)
    if match is None:
        return {"ts": None, "model": None, "pid": None, "msg": line}
    ts, model, pid, msg = match.groups()
    return {"ts": ts, "model": model, "pid": int(pid) if pid.isdigit() else None, "msg": msg}


@dataclass(eq=False)  # compared by identity: each one is a client
class Watcher:
    """One ``/logs`` client: its model filter, its queue of batches and what it lost."""

    model: str | None
    queue: asyncio.Queue[list[dict[str, Any]]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_BATCHES))
    dropped: int = 0

    def wants(self, line: dict[str, Any]) -> bool:
        return self.model is None or line["model"] == self.model

    def offer(self, batch: list[dict[str, Any]]) -> None:
        mine = [line for line in batch if self.wants(line)]
        if not mine:
            return
        try:
            self.queue.put_nowait(mine)
        except asyncio.QueueFull:
            self.dropped += len(mine)


class LogTail:
    """The file's last lines and its new ones, for every watcher, from one reader."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self._paths = paths
        self._watchers: set[Watcher] = set()
        self._recent: deque[dict[str, Any]] = deque(maxlen=BACKLOG_LINES)
        self._task: asyncio.Task[None] | None = None
        self._path: Path | None = None
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self.closing = False
        self._closed = asyncio.Event()

    def use(self, paths: tuple[Path, ...]) -> None:
        """Follow these files from now on (the catalog changed)."""
        self._paths = paths

    @property
    def path(self) -> Path | None:
        """The file being followed: the candidate written last (the reconciler falls back to
        the state dir while the configured file is not writable), else the first."""
        found: list[tuple[float, int, Path]] = []
        for rank, candidate in enumerate(self._paths):
            with contextlib.suppress(OSError):
                found.append((candidate.stat().st_mtime, -rank, candidate))
        if found:
            return max(found)[2]
        return self._paths[0] if self._paths else None

    # ------------------------------------------------------------------ watchers

    def subscribe(self, model: str | None) -> tuple[Watcher, list[dict[str, Any]]]:
        """A new watcher and the backlog it should show first."""
        if self._task is None:
            self._seed()
            self._task = asyncio.create_task(self._run())
        watcher = Watcher(model)
        self._watchers.add(watcher)
        return watcher, [line for line in self._recent if watcher.wants(line)]

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        if not self._watchers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Wake every watcher so its stream ends (the gate is stopping)."""
        self.closing = True
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ reading

    def _seed(self) -> None:
        """Start at the file's end, with its last lines as the backlog."""
        self._recent.clear()
        self._partial = b""
        path = self.path
        self._path, self._inode, self._offset = path, None, 0
        if path is None:
            return
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                start = max(0, stat.st_size - BACKLOG_BYTES)
                handle.seek(start)
                data = handle.read(stat.st_size - start)
        except OSError:
            return
        self._inode, self._offset = stat.st_ino, start + len(data)
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first one is cut
        self._partial = lines.pop()  # after the last newline: unfinished
        self._recent.extend(self._decode(lines))

    @staticmethod
    def _decode(raw: list[bytes]) -> list[dict[str, Any]]:
        return [parse(line[:MAX_LINE_BYTES].decode("utf-8", "replace")) for line in raw if line]

    async def _run(self) -> None:
        while True:
            try:
                batch = self._read()
            except OSError as exc:
                log.debug("activity log not readable: %s", exc)
                batch = []
            if batch:
                self._recent.extend(batch)
                for watcher in list(self._watchers):
                    watcher.offer(batch)
            await asyncio.sleep(clock.real_seconds(POLL_S))

    def _read(self) -> list[dict[str, Any]]:
        path = self.path
        if path is None:
            return []
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        if path != self._path or stat.st_ino != self._inode or stat.st_size < self._offset:
            self._path, self._inode, self._offset, self._partial = path, stat.st_ino, 0, b""
        if stat.st_size == self._offset:
            return []
        with path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(MAX_READ_BYTES)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE_BYTES:  # a line that never ends is shown in pieces
            lines.append(self._partial)
            self._partial = b""
        return self._decode(lines)
