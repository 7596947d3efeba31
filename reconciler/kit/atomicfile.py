"""Replace a file so that readers see the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# The errors of a filesystem with no room left for us: no free blocks or inodes, or our quota.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
# renameat2(2): swap two names in one step; AT_FDCWD: paths relative to the working directory.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def padded(data: str | bytes, size: int) -> bytes:
    """``data`` ending in a newline, then carriage returns up to ``size`` bytes.

    JSON allows any whitespace after a document, so every parser reads it unchanged; the
    carriage returns keep the blocks allocated yet print as nothing, so ``cat`` shows the
    document and no screen of blanks. ``size`` must leave room for the newline.
    """
    payload = data.encode() if isinstance(data, str) else data
    if not payload.endswith(b"\n"):
        payload += b"\n"
    if len(payload) > size:
        raise ValueError(f"{len(payload)} bytes do not fit in {size}")
    return payload + b"\r" * (size - len(payload))


def exchange(a: Path, b: Path) -> None:
    """Swap the files at two names of one folder at once (``renameat2(RENAME_EXCHANGE)``).

    It needs no free block or inode, and a reader of either name sees one whole file or
    the other. OSError (EINVAL, ENOSYS) where the filesystem or the C library lacks it.
    """
    rename2 = _renameat2()
    if rename2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", str(b))
    if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+; Python has no binding), or None without it."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        function.restype = ctypes.c_int
    return function


def overwrite(path: Path, data: str | bytes, mode: int) -> None:
    """Write ``data`` over the start of an existing file of ours, padded to its size.

    No truncation and no growth: every byte lands in a block the file already owns, so it
    works on a full filesystem (tmpfs, ext4, xfs; not copy-on-write ones such as btrfs or
    zfs, which need new blocks for any write). Not atomic: a reader may see half of it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "not a regular file of ours", str(path))
        view = memoryview(padded(data, st.st_size))
        os.fchmod(fd, mode)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Reserve:
    """Room set aside so that a file can still be rewritten when its filesystem is full.

    Every write pads the file to a multiple of ``unit`` bytes, and a hidden ``spare`` of
    ``unit`` bytes waits beside it (``keep``). A write that meets ENOSPC or EDQUOT fills
    the spare in place and swaps it with the file (``exchange``): readers still see whole
    files, and the old file, as padded, is the next spare. A new file takes the spare's
    place by rename. Where there is no spare, or the swap is refused, the file is
    overwritten in place. The limit: a reader that holds the file open across two such
    writes (the second rewrites what it reads) or meets an in-place one may read half of
    one; the gate keeps its last good state on a file that does not parse.
    """

    spare: Path
    unit: int
    mode: int

    def write(self, path: Path, data: str | bytes) -> OSError | None:
        """Write as ``write_atomic`` (not fsync'd: see its ``durable``), else from the reserve.

        Returns the error that sent the write to the reserve, None for a normal write;
        raises OSError when neither can write it.
        """
        payload = data.encode() if isinstance(data, str) else data
        size = -(-(len(payload) + 1) // self.unit) * self.unit  # + 1: padded()'s newline
        try:
            write_atomic(path, padded(payload, size), self.mode, durable=False)
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            self._write_without_room(path, payload, exc)
            return exc
        return None

    def _write_without_room(self, path: Path, payload: bytes, full: OSError) -> None:
        try:
            overwrite(self.spare, payload, self.mode)
        except (OSError, ValueError):  # no spare, or one too small for the payload
            self._overwrite(path, payload, full)
            return
        if not os.path.lexists(path):
            os.rename(self.spare, path)
            return
        try:
            exchange(self.spare, path)
        except OSError:
            self._overwrite(path, payload, full)

    def _overwrite(self, path: Path, payload: bytes, full: OSError) -> None:
        """In place: the last resort, as it needs a file already there and big enough."""
        try:
            overwrite(path, payload, self.mode)
        except FileNotFoundError:
            raise full from None
        except ValueError as exc:
            raise OSError(full.errno, f"{full.strerror}; and {exc} (the room {path} owns)",
                          str(path)) from None

    def keep(self) -> bool:
        """Make the spare if it is missing or too small; False while there is no room for it."""
        with contextlib.suppress(OSError):
            st = os.stat(self.spare, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size >= self.unit:
                return True
        try:
            write_atomic(self.spare, padded(b"", self.unit), self.mode, durable=False)
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            return False
        return True

    def retire(self, path: Path) -> None:
        """Remove ``path``; while the spare is missing, it becomes the spare instead (a file
        written through this reserve owns at least ``unit`` bytes), so its room is kept."""
        if not os.path.lexists(self.spare):
            with contextlib.suppress(OSError):
                st = os.stat(path, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size >= self.unit:
                    os.rename(path, self.spare)
                    return
        os.unlink(path)
