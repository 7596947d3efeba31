"""The desired generation: the number that counts toggles, and its one rule.

A frontend toggles, gets the toggle's generation back, and waits until the observed state's
``observed_generation`` reaches it, so the number must rise with every toggle, never be
shared by two toggles, and never go back. Two parties see toggles, and both number them
here, each from what the other last said, so the two can never disagree:

* the writer (``store.desired_file.write``), under its lock, so concurrent writers never
  share one; it continues above the file's number *and* above what the reconciler reported
  (a hand edit may have lowered the file's, and the loop counts toggles the file did not
  number);
* the loop (``plan.wish``), which also sees hand edits: a change of model the file did not
  number counts one, and it never reports less than the file says (nor than it reported).
"""

from __future__ import annotations


def to_write(in_file: int, reported: int) -> int:
    """The generation a writer puts in the file: one above everything either party said."""
    return max(in_file, reported) + 1


def to_report(reported: int, in_file: int | None, changed: bool) -> int:
    """The generation the loop reports once it takes a wish: the file's, or one more for a
    change of model the file did not number; never below what it reported before."""
    return max(reported + int(changed), in_file or 0)
