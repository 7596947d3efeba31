"""Dual-stream activity log: every line to the terminal and to the log file, one format.

``[TIMESTAMP] [MODEL_NAME] [PID] [MESSAGE]`` for engine output and for the reconciler's
own events alike. Engine bytes are neutralised first (ANSI, control characters, invalid
UTF-8) so no engine can forge a line that looks like another's or like ours. The
catalog's ``log_level`` drops our own events below it; engine output is always kept,
except the access lines of our own readiness probes (debug level: an engine probed every
second would otherwise fill half the log with them).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

from reconciler.kit import clock
from reconciler.kit.atomicfile import ensure_dir, open_append

SELF = "ailayer"
# Check whether logrotate moved the file at most this often: a stat per line would
# cost more than the write under a 100,000-lines/s flood.
ROTATE_CHECK_S = 1.0

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"

# Access lines as engines print them, client and path captured:
# uvicorn (vLLM):  INFO:     127.0.0.1:32974 - "GET /health HTTP/1.1" 200 OK
# gin (Ollama):    [GIN] 2026/12/02 - 13:22:42 | 200 |  0.623ms |  127.0.0.1 | GET  "/api/version"
# llama.cpp:       ... log_server_r: request: GET /health 127.0.0.1 200
_ACCESS = (
    re.compile(r'^(?:\([^)]*\) )?INFO:\s+(?P<client>\S+) - "GET (?P<path>[^ "?]+)[^"]*" \d{3}'),
    re.compile(r'^\[GIN\] .*\|\s*(?P<client>[^ |]+)\s*\|\s*GET\s+"(?P<path>[^"?]+)'),
    re.compile(r'request: GET (?P<path>[^ ?]+)\S* (?P<client>\S+) \d{3}'),
)
_LOOPBACK = re.compile(r"^(?:127\.\d+\.\d+\.\d+|::1|\[::1\]|localhost)(?::\d+)?$")


def is_probe_line(line: str, paths: frozenset[str]) -> bool:
    """An engine's access line for a GET of one of ``paths`` from this machine: our probe.

    A person who curls the same path from the same machine looks the same; anything else
    (another path, another client, a POST) is kept.
    """
    if "GET" not in line:
        return False
    for pattern in _ACCESS:
        match = pattern.search(line)
        if match is not None:
            return match["path"] in paths and bool(_LOOPBACK.match(match["client"]))
    return False


_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def sanitize(raw: bytes | str) -> str:
    """Printable text only: escapes dropped, other control bytes and bad UTF-8 made visible."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    text = _ANSI.sub("", text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_line(model: str, pid: int | None, message: str) -> str:
    return f"[{clock.iso()}] [{model}] [{pid if pid is not None else '-'}] {message}"


class ActivityLog:
    """Thread-safe tee. Survives logrotate, a full disk and an unwritable path, and says so."""

    def __init__(self, path: Path, fallback_dir: Path, terminal: TextIO | None = sys.stdout,
                 level: str = DEFAULT_LEVEL) -> None:
        self._lock = threading.Lock()
        self.level = level  # our own events below it are dropped (one of LEVELS)
        self._terminal = terminal
        self._fallback = fallback_dir / "ai_layer_activity.log"
        self.path = path
        self._wanted = path  # where the log belongs; the fallback is only while it cannot be written
        self._file: TextIO | None = None
        self._inode: int | None = None
        self._next_check = 0.0
        self.lost_lines = 0
        self._failing: str | None = None
        self._open(first=True)

    def _open(self, first: bool = False) -> None:
        for candidate in (self._wanted, self._fallback):
            try:
                ensure_dir(candidate.parent)
                fd = open_append(candidate)
            except OSError as exc:
                # Said at start and on every move to the fallback (not on each retry while there).
                if candidate == self._wanted and (first or self.path == self._wanted):
                    self._say(f"cannot write log file {self._wanted} ({exc.strerror}); "
                              f"falling back to {self._fallback}")
                continue
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
            self._inode = os.fstat(fd).st_ino
            if candidate == self._wanted and self.path != self._wanted and not first:
                self._say(f"log file {self._wanted} writable again (lines meanwhile are in {self.path})")
            self.path = candidate
            return
        self._file = None
        if self._failing is None:  # once, not for every line while it lasts
            self._failing = "no writable log file"
            self._say(f"no writable log file (tried {self._wanted} and {self._fallback}); terminal only")

    def _say(self, message: str) -> None:
        if self._terminal is not None:
            print(format_line(SELF, os.getpid(), message), file=self._terminal, flush=True)

    def _rotated(self) -> bool:
        """Whether to reopen: the file was moved (logrotate; one stat per write, so the first
        line after a rotation is in the new file), or, now and then, to leave the fallback."""
        if self.path != self._wanted:
            now = clock.monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + ROTATE_CHECK_S
            return True
        try:
            return os.stat(self.path).st_ino != self._inode
        except OSError:
            return True

    def write(self, model: str, pid: int | None, message: str) -> None:
        self.write_lines(model, pid, [message])

    def write_lines(self, model: str, pid: int | None, messages: list[str]) -> None:
        """Several lines of one engine, one timestamp, one write and flush per sink.

        Per-line formatting and flushing capped the follower near 13,000 lines/s; an engine
        flooding 100,000 lines/s then left the log (and the loop, waiting on the follower)
        seconds behind.
        """
        if not messages:
            return
        prefix = format_line(model, pid, "")
        block = "".join(f"{prefix}{m}\n" for m in messages)
        with self._lock:
            if self._terminal is not None:
                try:
                    self._terminal.write(block)
                    self._terminal.flush()
                except (OSError, ValueError):
                    self._terminal = None  # terminal went away (closed pipe); keep the file
            if self._file is None or self._rotated():
                self._reopen()
            if self._file is None:
                self.lost_lines += len(messages)
                return
            try:
                self._file.write(block)
                self._file.flush()
                if self._failing:
                    self._say(f"log file writable again; {self.lost_lines} lines were lost")
                    self._failing = None
            except OSError as exc:
                self.lost_lines += len(messages)
                if self._failing is None:
                    self._failing = exc.strerror or str(exc)
                    self._say(f"writing {self.path} failed ({self._failing}); lines are lost "
                              "from the file until it recovers")

    def _reopen(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._open()

    def event(self, message: str, level: str = "info") -> None:
        """The reconciler's own events, in the same format as engine lines."""
        if LEVELS.index(level) >= LEVELS.index(self.level):
            self.write(SELF, os.getpid(), sanitize(message))

    @property
    def debug(self) -> bool:
        return self.level == "debug"

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
