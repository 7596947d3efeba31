"""Replace a file so that readers see the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import os
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


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory.

    A symlink at ``path`` is replaced, never followed: nobody can redirect our
    writes through a link planted beside the file.
    """
    payload = data.encode() if isinstance(data, str) else data
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
