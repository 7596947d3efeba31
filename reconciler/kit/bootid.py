"""This boot of the machine: a wish or a state written on another boot is told apart by it."""

from __future__ import annotations

import functools
from pathlib import Path

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def current_boot_id() -> str | None:
    """This boot of the machine (Linux), or None where it cannot be read."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None
