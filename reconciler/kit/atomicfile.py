"""Replace a file so that readers see the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

# The state dir and the folders we create are never world-writable, whatever umask we were
# given: mkdir's mode is masked by the umask, so 0755 stays 0755 even under umask 000.
STATE_DIR_MODE = 0o755


def ensure_dir(path: Path) -> None:
    """``mkdir -p`` with STATE_DIR_MODE at every level it creates.

    ``Path.mkdir(parents=True)`` gives the parents it creates the umask's default mode, so
    under umask 000 they would be world-writable.
    """
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=STATE_DIR_MODE, exist_ok=True)


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory.

    A symlink at ``path`` is replaced, never followed: nobody can redirect our
    writes through a link planted beside the file. ``durable=False`` skips both fsyncs:
    the rename is still atomic for every reader and survives our own crash (the page cache
    does); only a power loss may lose the write. For files rewritten every pass, that a power
    loss makes moot (the observed state, instance records: their engines die with it).
    """
    payload = data.encode() if isinstance(data, str) else data
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_append(path: Path, mode: int = 0o640) -> int:
    """An fd appending to ``path``, which must be a regular file of ours reached without links.

    Root writes here on behalf of whoever set the path up: a FIFO would block the loop (so
    O_NONBLOCK: a FIFO without a reader fails at once, one with a reader is refused), a
    symlink at the file or at its folder would redirect the write, and another user's file
    (planted in a world-writable folder) is theirs to read. Each of these is an OSError.
    """
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, mode, dir_fd=parent)
    finally:
        os.close(parent)
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = (errno.EINVAL, "not a regular file")
    elif st.st_uid != os.geteuid():
        problem = (errno.EPERM, f"owned by uid {st.st_uid}, not by us")
    if problem is not None:
        os.close(fd)
        raise OSError(problem[0], problem[1], str(path))
    os.set_blocking(fd, True)
    return fd
