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


# An OSC sequence never runs past its line: in a block of lines it must not swallow the next ones.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(\x07|\x1b\\)|[@-Z\\-_])")
# Made visible, never passed through: C0 and C1 controls (a newline only inside one line),
# and what a reader may take for a line break or a reordering of the line: U+2028 and U+2029
# (str.splitlines() splits at them, so a line could carry a forged "[…] [ailayer] [1]" one)
# and the bidi controls (U+202E shows text right to left: a message that reads as another).
_INVISIBLE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\n{_INVISIBLE}]")
_CONTROL_IN_BLOCK = re.compile(f"[{_INVISIBLE}]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize(raw: bytes | str) -> str:
    """Printable text only: escapes dropped, other control bytes and bad UTF-8 made visible."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return _CONTROL.sub(_visible, _ANSI.sub("", text))


_C0_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])


def sanitize_lines(raw: bytes) -> str:
    """``sanitize`` of each of several newline-separated lines at once, the newlines kept.

    One decode and at most two regex passes over a whole block instead of per line: per line
    they held the follower to ~12 MB/s of engine output. Plain ASCII without a control byte
    (most engine output) needs neither pass: bytes.translate tells in C.
    """
    if raw.isascii() and len(raw.translate(None, _C0_BYTES)) == len(raw):
        return raw.decode("ascii")
    return _CONTROL_IN_BLOCK.sub(_visible, _ANSI.sub("", raw.decode("utf-8", "backslashreplace")))


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
        # The file's size cap between two rotations (catalog log_limits.file_max_bytes; None:
        # none): past it engine output is left out of the file, counted per model, and said.
        self.max_bytes: int | None = None
        self._size = 0
        self._left_out: dict[str, int] = {}
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
            stat = os.fstat(fd)
            self._inode, self._size = stat.st_ino, stat.st_size
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
        block = prefix + f"\n{prefix}".join(messages) + "\n"
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
            if model != SELF and self._full(model, len(block)):
                return
            try:
                self._file.write(block)
                self._size += len(block)
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

    def _full(self, model: str, size: int) -> bool:
        """Whether the file is at its cap: then ``model``'s block is left out of it, counted,
        and the first time said in the file (the terminal still gets every line)."""
        if self.max_bytes is None or self._size + size <= self.max_bytes:
            return False
        if not self._left_out:
            self._append(f"{self.path} reached its cap of {self.max_bytes:,} bytes since it was last "
                         "rotated (log_limits.file_max_bytes): engine output is left out of it until "
                         "logrotate moves it; the terminal still shows it")
        self._left_out[model] = self._left_out.get(model, 0) + size
        return True

    def _append(self, message: str) -> None:
        """One line of our own straight into the file (the lock held)."""
        if self._file is None:
            return
        line = format_line(SELF, os.getpid(), message) + "\n"
        with contextlib.suppress(OSError):
            self._file.write(line)
            self._file.flush()
            self._size += len(line)

    def _reopen(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._open()
        if self._left_out and self._file is not None:
            left = ", ".join(f"{model} {size:,}" for model, size in sorted(self._left_out.items()))
            self._left_out = {}
            self._append(f"the previous log file reached its cap; bytes of engine output left out of it: {left}")

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
