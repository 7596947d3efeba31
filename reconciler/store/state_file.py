"""observed_state.json on disk: written atomically after every pass, read by the gate and the CLI.

A full filesystem must not silence it: the gate reads a state that stops moving as a dead
reconciler. So the file keeps room of its own (``Reserve``): each write pads it, and a
hidden spare beside it takes the next state when nothing new can be allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.domain.status import Status
from reconciler.kit.atomicfile import Reserve, ensure_dir

STATE_MODE = 0o640  # it holds engine output (last_log_line): not for every local user
# Room the file and its spare each keep: a state is 2 to 6 KiB (more with many strays),
# so a full disk still takes every state but one with hundreds of strays, which is then
# not written (and says so in the log).
STATE_RESERVE_BYTES = 64 << 10


def reserve(path: Path) -> Reserve:
    return Reserve(path.with_name(f".{path.name}.reserve"), STATE_RESERVE_BYTES, STATE_MODE)


def write(path: Path, status: Status) -> OSError | None:
    """Write the state; returns the error (ENOSPC, EDQUOT) that made it use the reserve.

    Raises OSError when it cannot be written at all.
    """
    ensure_dir(path.parent)
    return reserve(path).write(path, status.to_json())


def keep_reserve(path: Path) -> bool:
    """Make the spare if it is missing (False while there is no room for it)."""
    return reserve(path).keep()


def read_raw(path: Path) -> dict[str, Any]:
    """The file as a dict (for the gate and the CLI); raises OSError/ValueError on trouble."""
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or "phase" not in data:
        raise ValueError(f"{path}: not an observed-state document")
    return data
