"""One reconciler per state dir: two loops on the same files would fight over the engines."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from reconciler.kit.atomicfile import ensure_dir


class AlreadyRunning(RuntimeError):
    pass


class StateLock:
    """An flock on ``<state_dir>/reconciler.kit.lock``; the kernel drops it when the process dies."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "reconciler.kit.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        ensure_dir(self.path.parent)
        # An explicit mode: open("a+") would make it 0666 under a umask of 000.
        handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(
                f"another reconciler (pid {holder}) is running on {self.path.parent}; "
                "stop it first, or use `ailayer status` to watch it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def reassert(self) -> bool:
        """Take the lock again if its file was removed or replaced (the state dir deleted under us).

        An flock lives on the inode: once ``rm -rf`` took the file, a second reconciler would
        create a new one and lock it beside us. True when the lock had to be taken again;
        AlreadyRunning when another process got there first.
        """
        if self._handle is None:
            return False
        try:
            if os.stat(self.path).st_ino == os.fstat(self._handle.fileno()).st_ino:
                return False
        except FileNotFoundError:
            pass
        old = self._handle
        self._handle = None
        try:
            self.acquire()
        finally:
            if self._handle is None:
                self._handle = old  # keep what we had; the caller decides what to do
            else:
                old.close()
        return True
