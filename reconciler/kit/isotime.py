"""The format of every timestamp ailayer writes, apart from the clock that reads the time:
pure code (the report) formats the times it is given and cannot read the time itself."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: datetime) -> str:
    """ISO-8601 with milliseconds and the local zone."""
    return ts.astimezone().isoformat(timespec="milliseconds")


def iso_epoch(epoch: float) -> str:
    """``iso`` of epoch seconds (the clock seam's, as in ``Observation.now``)."""
    return iso(datetime.fromtimestamp(epoch, UTC))
