"""Which desired state a pass acts on: the desired file's rules over time.

The file is read every pass, but what a pass acts on is not always what it says that instant:

* settle: a file that vanished or went empty while a model runs may be a non-atomic write
  (``echo model: x > desired_state.yaml`` truncates first), so it counts as IDLE only once it
  stayed so DESIRED_SETTLE_S; an explicit ``model: null`` is taken at once;
* flap window: a change of model within the window of the last one waits for the window's
  end (see FLAP_WINDOW_MIN_S);
* reboot: a model chosen before the machine booted counts as none (see ``_after_reboot``);
* a file that cannot be read keeps the last good wish, and says why.

It also numbers what it takes (the desired generation, ``reconciler.domain.generation``).
Time comes in as ``now`` (monotonic seconds), so the rules are tested from tables, without a
clock or a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.domain import generation
from reconciler.domain.desired import Desired, before_this_boot
from reconciler.domain.facts import Failure, Reason
from reconciler.domain.status import Status

# A desired file that vanished or went empty must stay so this long before a running model
# is stopped for it: a non-atomic write truncates the file for a moment.
DESIRED_SETTLE_S = 1.0
# A flapping desired file: a change of model within this window of the last one waits for
# the window's end. When more than one toggle came since the change taken last (the writer
# outruns the loop), the window doubles (to the max); one toggle resets it. So 5 s of writes
# cost a handful of engine starts, not one per write, and a toggle after the last switch
# settled costs no delay at all.
FLAP_WINDOW_MIN_S = 0.1
FLAP_WINDOW_MAX_S = 2.0


@dataclass(frozen=True)
class Taken:
    """What a pass acts on, and what it learned on the way."""

    desired: Desired
    generation: int  # the desired generation to report
    failures: tuple[Failure, ...] = ()
    recheck_in: float | None = None  # a newer wish is held back: look again this soon
    note: str | None = None  # a line for the activity log


class Wishes:
    """The desired file's rules, with the little they remember between passes."""

    def __init__(self, desired_path: Path, reported_generation: int, boot_id: str | None,
                 booted_at: float) -> None:
        self.desired_path = desired_path  # named in the settle note
        self.generation = reported_generation
        self.boot_id, self.booted_at = boot_id, booted_at
        self.last_good: Desired | None = None
        self._absent_since: float | None = None
        self._changed_at = -FLAP_WINDOW_MAX_S  # when the last change of model was taken
        self._taken_generation = 0  # and the desired file's generation then
        self.flap_window = FLAP_WINDOW_MIN_S

    def take(self, read: Desired | Failure, now: float, previous: Status | None,
             resume_after_reboot: bool) -> Taken:
        """``read``: the file this pass (or why it cannot be read); ``previous``: the last
        observed state (the reboot rule honours what this boot's state already wanted)."""
        failures: list[Failure] = []
        held: float | None = None
        note: str | None = None
        if isinstance(read, Failure):
            self._absent_since = None  # the file is there: a later absence waits its own full second
            failures.append(replace(read, message=f"{read.message}; keeping the last good desired state"))
        else:
            held, note = self._settling(read, now)
            if held is None:
                held = self._flapping(read, now)
            if held is None:
                changed = self.last_good is None or read.model != self.last_good.model
                self.generation = generation.to_report(self.generation, read.generation, changed)
                self.last_good = read
        wish = self.last_good or Desired(None)
        if self._chosen_before_reboot(wish, previous, resume_after_reboot):
            failures.append(Failure(Reason.CHOSEN_BEFORE_REBOOT,
                                    f"{wish.model!r} was chosen before this machine booted, so it is not "
                                    "loaded until someone toggles again (set resume_after_reboot: true in "
                                    "the catalog to load it anyway)"))
            wish = replace(wish, model=None)
        return Taken(wish, self.generation, tuple(failures), held, note)

    def _chosen_before_reboot(self, wish: Desired, previous: Status | None, resume_after_reboot: bool) -> bool:
        """A model chosen before the machine rebooted counts as none until someone toggles
        again (unless the catalog sets resume_after_reboot): a reboot must not start a
        35-minute load nobody asked for. It is honoured once this boot honoured it (the last
        state, of this boot, wanted it): a reconciler restart keeps and adopts as before."""
        if wish.model is None or resume_after_reboot:
            return False
        if not before_this_boot(wish, self.boot_id, self.booted_at):
            return False
        return not (previous is not None and previous.reconciler.get("boot_id") == self.boot_id
                    and previous.desired_model == wish.model)

    def _flapping(self, wish: Desired, now: float) -> float | None:
        """A change of model within the flap window of the last one is held back: how long
        until the window ends (None: take it now)."""
        if self.last_good is None:
            self._taken_generation = wish.generation or 0
            return None
        if wish.model == self.last_good.model:
            return None
        since = now - self._changed_at
        if since < self.flap_window:
            return self.flap_window - since
        # More than one toggle since the change taken last: the writer outruns the loop.
        flapping = (wish.generation or 0) - self._taken_generation > 1
        self.flap_window = min(self.flap_window * 2, FLAP_WINDOW_MAX_S) if flapping else FLAP_WINDOW_MIN_S
        self._changed_at, self._taken_generation = now, wish.generation or 0
        return None

    def _settling(self, wish: Desired, now: float) -> tuple[float | None, str | None]:
        """A missing or empty file while a model runs: how long it must still stay so before
        it is IDLE (None: take it now), and the log line when its wait begins."""
        running = self.last_good is not None and self.last_good.model is not None
        if wish.explicit or wish.model is not None or not running:
            self._absent_since = None
            return None, None
        note = None
        if self._absent_since is None:
            self._absent_since = now
            note = (f"{self.desired_path} is missing or empty; treating it as IDLE "
                    f"if it stays so for {DESIRED_SETTLE_S:g} s")
        if now - self._absent_since < DESIRED_SETTLE_S:
            return DESIRED_SETTLE_S - (now - self._absent_since), note
        self._absent_since = None
        return None, note
