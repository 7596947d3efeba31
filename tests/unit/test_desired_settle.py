"""The settle rule on the fake clock: every absence of the desired file must last 1 s.

Drives ``plan.wish.Wishes`` only (no loop, no processes): the rule is about time and files.
"""

from __future__ import annotations

from reconciler.domain.catalog import Catalog
from reconciler.kit.clock import FakeClock
from reconciler.plan.wish import DESIRED_SETTLE_S, Wishes
from reconciler.store import desired_file


def wanted(wishes: Wishes, catalog: Catalog, fake: FakeClock) -> str | None:
    return wishes.take(desired_file.look(catalog), fake.monotonic(), None, False).desired.model


def test_every_absence_waits_its_own_full_second(wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    """missing -> invalid for 2 s -> missing for 0.4 s must not stop the model (issue 11, 5)."""
    path = catalog.desired_path
    desired_file.write(catalog, "gpt-oss")
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"
    path.unlink()
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"  # settling
    path.write_text("model: [not, a, name]\n")
    fake_clock.advance(2.0)
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"  # invalid: the last good state stays
    path.unlink()
    fake_clock.advance(0.4)
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss", "the earlier absence must not count for this one"
    fake_clock.advance(DESIRED_SETTLE_S)
    assert wanted(wishes, catalog, fake_clock) is None


def test_explicit_null_acts_at_once(wishes: Wishes, catalog: Catalog, fake_clock: FakeClock) -> None:
    desired_file.write(catalog, "gpt-oss")
    assert wanted(wishes, catalog, fake_clock) == "gpt-oss"
    desired_file.write(catalog, None)
    assert wanted(wishes, catalog, fake_clock) is None
