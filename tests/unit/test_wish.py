"""The desired file's rules (reconciler.plan.wish) from tables: each case is what a row of
passes read, when, and what each pass then acts on. No files, no clock, no loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.domain.desired import Desired
from reconciler.domain.facts import Failure, Reason
from reconciler.domain.status import Phase, Status
from reconciler.plan.wish import DESIRED_SETTLE_S, FLAP_WINDOW_MIN_S, Wishes

BOOT = "this-boot"
MISSING = Desired(None, explicit=False)  # no file, or an empty one
BAD = Failure(Reason.INVALID_DESIRED_STATE, "field 'model': not a name")
UNKNOWN = Failure(Reason.UNKNOWN_MODEL, "field 'model': unknown model 'x'")


def before_boot(model: str, generation: int) -> Desired:
    return Desired(model, generation, boot_id="an-earlier-boot")


def state(desired_model: str | None, boot_id: str) -> Status:
    return Status(Phase.READY, "", desired_model, desired_model, "", reconciler={"boot_id": boot_id})


@dataclass(frozen=True)
class Pass:
    at: float  # monotonic seconds
    read: Desired | Failure
    model: str | None  # acted on
    generation: int  # reported
    held: float | None = None  # recheck_in
    reasons: tuple[Reason, ...] = ()
    note: bool = False  # the settle line for the log


@dataclass(frozen=True)
class Case:
    passes: tuple[Pass, ...]
    reported: int = 0  # the generation the last state reported
    previous: Status | None = None
    resume_after_reboot: bool = False


W = FLAP_WINDOW_MIN_S
CASES: dict[str, Case] = {
    "the first wish is taken at once, numbered as the file says": Case((
        Pass(0.0, Desired("a", 3), "a", 3),)),
    "the first wish counts one when the file has no number": Case((
        Pass(0.0, Desired("a"), "a", 1),)),
    "reading the same wish again is no toggle": Case((
        Pass(0.0, Desired("a", 5), "a", 5), Pass(1.0, Desired("a", 5), "a", 5))),
    "a change the file did not number counts one": Case((
        Pass(0.0, Desired("a"), "a", 1), Pass(1.0, Desired("b"), "b", 2))),
    "the report never goes back: a hand edit lowered the file's number": Case((
        Pass(0.0, Desired("a", 3), "a", 11), Pass(1.0, Desired("a", 2), "a", 11),
        Pass(2.0, Desired("b", 4), "b", 12)), reported=10),
    "a missing file while a model runs counts as IDLE once it stayed so": Case((
        Pass(0.0, Desired("a", 1), "a", 1),
        Pass(0.1, MISSING, "a", 1, held=DESIRED_SETTLE_S, note=True),
        Pass(0.6, MISSING, "a", 1, held=DESIRED_SETTLE_S - 0.5),
        Pass(0.1 + DESIRED_SETTLE_S, MISSING, None, 2))),
    "an explicit null is taken at once": Case((
        Pass(0.0, Desired("a", 1), "a", 1), Pass(0.1, Desired(None, 2), None, 2))),
    "a missing file while nothing runs is IDLE at once": Case((
        Pass(0.0, MISSING, None, 1),)),
    "an unreadable file keeps the last good wish and says why": Case((
        Pass(0.0, Desired("a", 1), "a", 1), Pass(0.5, BAD, "a", 1, reasons=(Reason.INVALID_DESIRED_STATE,)),
        Pass(0.6, UNKNOWN, "a", 1, reasons=(Reason.UNKNOWN_MODEL,)))),
    "a file that is there again ends the settle wait: the next absence waits in full": Case((
        Pass(0.0, Desired("a", 1), "a", 1),
        Pass(0.1, MISSING, "a", 1, held=DESIRED_SETTLE_S, note=True),
        Pass(0.5, BAD, "a", 1, reasons=(Reason.INVALID_DESIRED_STATE,)),
        Pass(0.9, MISSING, "a", 1, held=DESIRED_SETTLE_S, note=True))),
    "a change within the flap window of the last waits for its end": Case((
        Pass(0.0, Desired("a", 1), "a", 1), Pass(1.0, Desired("b", 2), "b", 2),
        Pass(1.0 + W / 4, Desired("a", 3), "b", 2, held=W * 3 / 4),
        Pass(1.0 + 2 * W, Desired("a", 3), "a", 3),
        # One toggle since the change taken last: the window stays at its least.
        Pass(1.0 + 3.5 * W, Desired("b", 4), "b", 4))),
    "the window doubles while the writer outruns the loop": Case((
        Pass(0.0, Desired("a", 1), "a", 1), Pass(1.0, Desired("b", 2), "b", 2),
        Pass(1.0 + 2 * W, Desired("a", 5), "a", 5),  # three toggles since b: the window doubles
        Pass(1.0 + 3.5 * W, Desired("b", 6), "a", 5, held=W / 2))),
    "a model chosen before this boot is not loaded": Case((
        Pass(0.0, before_boot("a", 4), None, 4, reasons=(Reason.CHOSEN_BEFORE_REBOOT,)),)),
    "nor after the file turned unreadable": Case((
        Pass(0.0, before_boot("a", 4), None, 4, reasons=(Reason.CHOSEN_BEFORE_REBOOT,)),
        Pass(1.0, BAD, None, 4, reasons=(Reason.INVALID_DESIRED_STATE, Reason.CHOSEN_BEFORE_REBOOT)))),
    "a toggle on this boot is loaded": Case((
        Pass(0.0, before_boot("a", 4), None, 4, reasons=(Reason.CHOSEN_BEFORE_REBOOT,)),
        Pass(1.0, Desired("b", 5, boot_id=BOOT), "b", 5))),
    "a model chosen before this boot is loaded where the catalog says resume": Case((
        Pass(0.0, before_boot("a", 4), "a", 4),), resume_after_reboot=True),
    "a model this boot's last state already wanted is kept (a reconciler restart)": Case((
        Pass(0.0, before_boot("a", 4), "a", 4),), previous=state("a", BOOT)),
    "a state of an earlier boot honours nothing": Case((
        Pass(0.0, before_boot("a", 4), None, 4, reasons=(Reason.CHOSEN_BEFORE_REBOOT,)),),
        previous=state("a", "an-earlier-boot")),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_wish_rules(case: Case) -> None:
    wishes = Wishes(Path("/run/wish.yaml"), case.reported, BOOT, booted_at=0.0)
    for number, step in enumerate(case.passes):
        taken = wishes.take(step.read, step.at, case.previous, case.resume_after_reboot)
        got = (taken.desired.model, taken.generation, tuple(f.reason for f in taken.failures), taken.note is not None)
        assert got == (step.model, step.generation, step.reasons, step.note), f"pass {number} at {step.at}"
        assert taken.recheck_in == pytest.approx(step.held) if step.held is not None else taken.recheck_in is None, \
            f"pass {number} at {step.at}: recheck_in {taken.recheck_in}"


def test_an_unreadable_file_says_the_last_good_wish_is_kept() -> None:
    wishes = Wishes(Path("/run/wish.yaml"), 0, BOOT, booted_at=0.0)
    (failure,) = wishes.take(BAD, 0.0, None, False).failures
    assert failure == Failure(Reason.INVALID_DESIRED_STATE,
                              "field 'model': not a name; keeping the last good desired state")


def test_the_settle_note_names_the_file_and_the_wait() -> None:
    wishes = Wishes(Path("/run/wish.yaml"), 0, BOOT, booted_at=0.0)
    wishes.take(Desired("a", 1), 0.0, None, False)
    assert wishes.take(MISSING, 1.0, None, False).note == (
        "/run/wish.yaml is missing or empty; treating it as IDLE if it stays so for 1 s")


def test_a_model_chosen_before_this_boot_says_how_to_load_it() -> None:
    wishes = Wishes(Path("/run/wish.yaml"), 0, BOOT, booted_at=0.0)
    (failure,) = wishes.take(before_boot("a", 1), 0.0, None, False).failures
    assert failure.message.startswith("'a' was chosen before this machine booted")
    assert "resume_after_reboot: true" in failure.message
