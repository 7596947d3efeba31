"""A serving process's hold on its worker child: one pipe that says both "loaded" and "died"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Mapping

from reconciler.kit import clock


class WorkerLink:
    """A worker child plus the pipe it reports on.

    The child gets the write end of a pipe: one byte means "loaded", end-of-file means
    it exited (the kernel closes the fd however it died), so one fd gives both readiness
    and death notice without polling, and without the child ever watching the parent.
    """

    def __init__(self, proc: subprocess.Popen[bytes], read_fd: int, escaped: bool) -> None:
        self.proc = proc
        self.escaped = escaped
        self.ready = asyncio.Event()
        self.dead = asyncio.Event()
        self._fd = read_fd
        os.set_blocking(read_fd, False)
        asyncio.get_running_loop().add_reader(read_fd, self._on_readable)

    @classmethod
    def spawn(
        cls,
        argv_for: Callable[[int], list[str]],
        *,
        escape: bool,
        env_for: Callable[[int], Mapping[str, str]] | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> WorkerLink:
        """Start a child (inheriting stdout, stderr, session and, by default, env) with a ready pipe.

        ``argv_for`` and ``env_for`` get the pipe's write fd, so each engine tells its child
        about it in its own way; ``keep_fds`` are further fds the child must hold open.
        ``escape`` says the child will leave the session and ignore SIGTERM (see ``stop``).
        """
        read_fd, write_fd = os.pipe()
        try:
            env = None if env_for is None else dict(env_for(write_fd))
            proc = subprocess.Popen(argv_for(write_fd), pass_fds=(write_fd, *keep_fds), env=env)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, read_fd, escape)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.ready.set()
            return
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.dead.set()

    async def exit_code(self, timeout_s: float = 5.0) -> int | None:
        """Reap the child once it has died; None if it has not exited within the timeout."""
        deadline = clock.monotonic() + timeout_s
        while (code := self.proc.poll()) is None and clock.monotonic() < deadline:
            await asyncio.sleep(clock.real_seconds(0.01))
        return code

    async def kill(self) -> None:
        """SIGKILL and reap: what a server does to a child it gives up on mid-load."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.exit_code()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the worker and wait; an escaped worker ignores it, so don't wait for it."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        if self.escaped:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dead.wait(), clock.real_seconds(grace_s))
        if self.proc.poll() is None and not self.dead.is_set():
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.exit_code()


async def first_set(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set (callers then check which, in priority order)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
