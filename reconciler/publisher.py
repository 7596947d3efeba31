"""Every write of the observed state (observed_state.json): the reconciler's one voice.

The gate proxies, answers 503 or 428 by this file, and ``ailayer status`` and UIs show it.
Each write carries the next revision and a fresh heartbeat (a state that stops moving reads
as a dead reconciler). It is written:

* by every pass (``publish``); a pass that acts also publishes first what is about to happen,
  so the gate stops proxying to an engine before it is killed;
* while a long kill waits for the kernel (``kill_progress``): who is still alive, and since when;
* when a pass fails (``pass_failed``): the failure and the backoff, the last good state kept;
* on a clean stop (``mark_stopped``): the gate need not wait for the heartbeat to age.

Under ``ailayer up`` each write also carries the gate's facts (``gate``), which the gate's
supervisor sets from its own thread: one immutable value, swapped whole.
On a full filesystem the file is written from its reserve (reconciler/store/state_file.py),
so the heartbeat keeps flowing, and ``reconciler.state_write`` says why: a full disk is
reported as what it is, never as a dead reconciler.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.act import killer
from reconciler.domain import status
from reconciler.domain.facts import Gpu, Reason
from reconciler.domain.status import Status
from reconciler.kit import clock
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.logs import ActivityLog
from reconciler.plan.report import GateFacts, PassInput, Stamp, compose
from reconciler.store import state_file

# A pass that raises is retried after resync_interval_s, doubling up to this.
PASS_FAILURE_BACKOFF_MAX_S = 60.0
MAX_PASS_ERROR_CHARS = 300
MAX_PIDS_SHOWN = 10


class Publisher:
    def __init__(self, path: Path, log: ActivityLog) -> None:
        self.path = path
        self.log = log
        self.previous = self._load()  # the last state written (or found at start)
        self.gate: GateFacts | None = None  # `up`'s gate, set by its supervisor
        self.state_write: dict[str, Any] | None = None  # while written from the reserve

    def _load(self) -> Status | None:
        try:
            return status.from_dict(state_file.read_raw(self.path))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def publish(self, p: PassInput, gpu: Gpu) -> Status:
        """A pass's state, with what changed since the last in the log."""
        stamp = Stamp(clock.now(), os.getpid(), current_boot_id(), self.gate)
        new = compose(p, self.previous, gpu, stamp)
        old = self.previous
        if old is None or old.phase != new.phase or old.message != new.message:
            self.log.event(f"phase {new.phase.value}: {new.message}")
        if new.last_error and (old is None or old.last_error != new.last_error):
            self.log.event(f"error {new.last_error.reason}: {new.last_error.message}", "error")
        self.log.event(f"pass: phase {new.phase.value}, revision {new.revision}, recap {new.recap}",
                       "debug")
        self.previous = self._store(new, loud=True)
        return self.previous

    def kill_progress(self, alive: tuple[int, ...], waited_s: float) -> None:
        """A kill that waits long (a driver freeing tens of GB of VRAM) keeps the state
        flowing: what is still alive and for how long, with a fresh heartbeat."""
        old = self.previous
        if old is None:
            return
        shown = ", ".join(map(str, alive[:MAX_PIDS_SHOWN])) + (" …" if len(alive) > MAX_PIDS_SHOWN else "")
        message = (f"stopping: {len(alive)} process(es) still alive {waited_s:.0f} s after SIGKILL "
                   f"(pids {shown}); waiting up to {killer.KILL_VERIFY_S:g} s for the kernel to free them")
        if waited_s < 2 * killer.PROGRESS_EVERY_S:
            self.log.event(message)
        self._beat(replace(old, message=message))

    def pass_failed(self, exc: Exception, count: int, resync_interval_s: float) -> float:
        """Say it (state, log) and return the backoff: a pass that fails the same way every
        time must neither spin nor look like a dead reconciler to the gate."""
        what = f"{type(exc).__name__}: {str(exc)[:MAX_PASS_ERROR_CHARS]}"
        delay = min(resync_interval_s * 2.0 ** (count - 1), PASS_FAILURE_BACKOFF_MAX_S)
        old = self.previous
        if count == 1 or old is None or old.last_error is None or what not in old.last_error.message:
            self.log.event(f"pass failed: {what}; retrying with backoff up to {PASS_FAILURE_BACKOFF_MAX_S:g} s",
                           "error")
        if old is not None:
            message = f"a reconciler pass failed {count} time(s) in a row (next try in {delay:.0f} s): {what}"
            self._beat(replace(old, last_error=status.ErrorInfo(Reason.PASS_FAILED, message, clock.iso())))
        return delay

    def mark_stopped(self, engines_stopped: bool) -> None:
        """A clean stop leaves a state that says so: the gate and ``ailayer status`` need not
        wait for the heartbeat to age (they showed READY 32 s after Ctrl-C)."""
        if self.previous is None:
            return
        self._write(status.stopped(self.previous, clock.iso(), engines_stopped))

    def _beat(self, changed: Status) -> None:
        """``changed`` (the last state with a new message or error) with a fresh heartbeat."""
        gate = self.gate
        beat = {**changed.reconciler, "heartbeat": clock.iso(),
                **({"gate": gate.to_dict()} if gate is not None else {})}
        self._write(status.with_revision(replace(changed, reconciler=beat), self.previous))

    def _write(self, new: Status) -> None:
        self.previous = self._store(new, loud=False)

    def _store(self, new: Status, loud: bool) -> Status:
        """Write ``new`` with the state-write marking; when a write starts or stops needing
        the reserve, the marking moves and the state is written again at once with it."""
        marked = self._marked(new)
        try:
            full = state_file.write(self.path, marked)
        except OSError as exc:
            if loud:
                self.log.event(f"cannot write {self.path}: {exc}; will retry", "error")
            return marked
        if full is None:
            with contextlib.suppress(OSError):
                state_file.keep_reserve(self.path)
        if self._note(full):
            marked = self._marked(new)
            with contextlib.suppress(OSError):
                state_file.write(self.path, marked)
        return marked

    def _marked(self, new: Status) -> Status:
        """``new`` with ``reconciler.state_write`` as it stands; its coming or going bumps
        the revision, so long-polls and /events see it."""
        beat = {k: v for k, v in new.reconciler.items() if k != "state_write"}
        if self.state_write is not None:
            beat["state_write"] = self.state_write
        old = self.previous
        if (old is not None and old.reconciler.get("state_write") != beat.get("state_write")
                and new.revision == old.revision):
            new = replace(new, revision=new.revision + 1)
        return replace(new, reconciler=beat)

    def _note(self, full: OSError | None) -> bool:
        """Follow the write's outcome; True when the marking changed (logged once each way)."""
        if full is None:
            if self.state_write is None:
                return False
            self.log.event(f"{self.path} is written normally again: there is room again "
                           f"(it was written from its reserve since {self.state_write['since']})")
            self.state_write = None
            return True
        code = errno.errorcode.get(full.errno or 0, str(full.errno))
        if self.state_write is not None and self.state_write["error"] == code:
            return False
        message = (f"cannot create files in {self.path.parent} ({full.strerror}): the state is "
                   "written into the room kept for it. The reconciler runs on; engines' output "
                   "cannot be kept until there is room")
        self.log.event(f"{message} [{code}]", "error")
        self.state_write = {"error": code, "message": message, "since": clock.iso()}
        return True
